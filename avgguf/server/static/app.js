// avgguf desktop chat: one slider per alignment vector, streamed answers rendered as sanitized markdown,
// conversations kept in this browser, compare and sweep views, save as profile.
// Model text becomes HTML only through renderMarkdown (marked, its raw HTML escaped, then DOMPurify);
// user text is always inserted with textContent.
"use strict";

const $ = (sel) => document.querySelector(sel);
const STORE = "avgguf-conversations"; // localStorage: {id: conversation}
const CURRENT = "avgguf-current"; // localStorage: the open conversation's id
const state = { models: [], model: null, conv: null, controllers: [], key: "", judge: false };

// ---- markdown -------------------------------------------------------------------------------------------

const escapeHtml = (s) =>
  String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);

function highlighted(text, lang) {
  const hl = window.hljs;
  if (!hl) return escapeHtml(text);
  if (lang && hl.getLanguage(lang)) return hl.highlight(text, { language: lang, ignoreIllegals: true }).value;
  return hl.highlightAuto(text).value;
}

const markdown =
  window.marked &&
  new marked.Marked({ gfm: true, breaks: true }).use({
    renderer: {
      html: (token) => escapeHtml(token.text || token.raw || ""), // raw HTML in the text is shown, not run
      image: (token) => escapeHtml(token.text || ""), // no remote images: offline, nothing fetched
      code(token) {
        const lang = (token.lang || "").trim().split(/\s+/)[0].toLowerCase();
        const known = lang && window.hljs && hljs.getLanguage(lang) ? " language-" + escapeHtml(lang) : "";
        return `<pre><code class="hljs${known}">${highlighted(token.text, lang)}</code></pre>`;
      },
    },
  });

const PURIFY = {
  FORBID_TAGS: ["img", "svg", "math", "style", "form", "input", "button", "textarea", "select", "iframe", "video", "audio"],
  FORBID_ATTR: ["style", "id", "name"],
  ALLOW_DATA_ATTR: false,
};
if (window.DOMPurify) {
  DOMPurify.addHook("afterSanitizeAttributes", (node) => {
    if (node.tagName === "A") {
      node.setAttribute("target", "_blank");
      node.setAttribute("rel", "noopener noreferrer");
    }
    if (node.tagName === "PRE" || node.tagName === "TABLE") node.setAttribute("tabindex", "0"); // scrolls by keys
  });
}

function renderMarkdown(text) {
  if (!markdown || !window.DOMPurify) return escapeHtml(text).replace(/\n/g, "<br>");
  return DOMPurify.sanitize(markdown.parse(text), PURIFY);
}

function setMarkdown(el, text) {
  el.innerHTML = renderMarkdown(text);
}

// ---- the server -----------------------------------------------------------------------------------------

function headers() {
  const h = { "Content-Type": "application/json" };
  if (state.key) h["Authorization"] = "Bearer " + state.key;
  return h;
}

function status(text, isError = false) {
  const el = $("#status");
  el.textContent = text;
  el.className = isError ? "error" : "";
}

async function api(path, options = {}) {
  const r = await fetch(path, { ...options, headers: headers() });
  const body = await r.json().catch(() => ({}));
  if (!r.ok) {
    const err = new Error((body.error && body.error.message) || r.statusText);
    err.status = r.status;
    throw err;
  }
  return body;
}

async function loadModels() {
  try {
    const listed = await api("/avgguf/models");
    state.models = listed.data;
    state.judge = Boolean(listed.judge);
  } catch (e) {
    if (e.status === 401) {
      $("#key-form").hidden = false; // a key set by hand (`serve --api-key...`): ask for it once
      status(
        "this server needs its API key: type it above (a page that `avgguf desktop` opens gets it by " +
          "itself; start it again for a fresh one)",
        true
      );
    } else status("could not list models: " + e.message, true);
    return;
  }
  if (!$("#key-form").hidden) status("");
  $("#key-form").hidden = true;
  const select = $("#model");
  const previous = select.value || (state.conv && state.conv.model);
  select.replaceChildren();
  for (const m of state.models) {
    for (const id of [m.id, ...Object.keys(m.profiles).map((p) => m.id + ":" + p)]) select.append(option(id));
  }
  if (previous && [...select.options].some((o) => o.value === previous)) select.value = previous;
  chooseModel();
}

function option(value, text = value) {
  const opt = document.createElement("option");
  opt.value = value;
  opt.textContent = text;
  return opt;
}

function currentModel() {
  const [id, profile] = $("#model").value.split(/:(.*)/s);
  return { info: state.models.find((m) => m.id === id), profile: profile || null };
}

function profileCoefficients(info, profile) {
  const name = profile || info.default_profile;
  const coefs = Object.fromEntries(info.avs.map((n) => [n, 0]));
  return Object.assign(coefs, (name && info.profiles[name]) || {});
}

function chooseModel() {
  const { info, profile } = currentModel();
  if (!info) return;
  state.model = info;
  buildSliders(info, profileCoefficients(info, profile));
  $("#decode").value = (profile && info.decode[profile]) || "weights";
  $("#compare-with").replaceChildren(...["base (all 0)", ...Object.keys(info.profiles)].map((l) => option(l)));
  $("#sweep-knob").replaceChildren(...info.avs.map((n) => option(n)));
  profileEditor(info);
  showUsage();
}

function profileEditor(info) {
  const names = Object.keys(info.profiles);
  $("#profile-editor").hidden = !info.writable || !names.length;
  const pick = $("#profile-pick");
  const previous = pick.value;
  pick.replaceChildren(...names.map((n) => option(n, n === info.default_profile ? n + " (default)" : n)));
  if (names.includes(previous)) pick.value = previous;
  const isDefault = () => pick.value === info.default_profile;
  $("#profile-default").textContent = isDefault() ? "no default" : "make default";
  pick.onchange = () => ($("#profile-default").textContent = isDefault() ? "no default" : "make default");
}

async function editProfile(action) {
  const name = $("#profile-pick").value;
  const info = state.model;
  if (!name) return;
  const body = { model: info.id, action, name };
  if (action === "rename") {
    const fresh = prompt(`New name for the profile ${name}`, name);
    if (!fresh || fresh.trim() === name) return;
    body.new_name = fresh.trim();
  } else if (action === "delete" && !confirm(`Delete the profile ${name} from the modelfile?`)) return;
  else if (action === "default" && name === info.default_profile) body.name = null;
  try {
    await api("/avgguf/profiles/edit", { method: "POST", body: JSON.stringify(body) });
    await loadModels();
    if (action === "rename") $("#profile-pick").value = body.new_name;
    profileEditor(state.model);
    const done = { rename: `renamed ${name} to ${body.new_name}`, delete: `deleted profile ${name}` };
    status(done[action] || (body.name ? `${name} is the default profile` : "no default profile"));
  } catch (e) {
    status("not changed: " + e.message, true);
  }
}

// ---- sliders --------------------------------------------------------------------------------------------

const clamp = (v) => Math.max(-2, Math.min(2, Math.round((Number(v) || 0) * 100) / 100));

function knobRow(name, value, kind) {
  const row = document.createElement("div");
  row.className = "knob";
  const label = document.createElement("label");
  label.textContent = name;
  if (kind === "control vector") {
    const badge = document.createElement("small");
    badge.className = "kind";
    badge.textContent = " control vector"; // read with the name: "tone control vector"
    label.append(badge);
  }
  const range = document.createElement("input");
  Object.assign(range, { type: "range", min: -2, max: 2, step: 0.05, value });
  range.dataset.av = name;
  range.dataset.kind = kind || "LoRA";
  const number = document.createElement("input");
  Object.assign(number, { type: "number", min: -2, max: 2, step: 0.05, value });
  number.dataset.avNumber = name;
  number.setAttribute("aria-label", name + " coefficient");
  range.addEventListener("input", () => (number.value = range.value));
  range.addEventListener("keydown", (e) => {
    if (e.key !== "PageUp" && e.key !== "PageDown") return;
    e.preventDefault();
    range.value = clamp(Number(range.value) + (e.key === "PageUp" ? 0.4 : -0.4));
    range.dispatchEvent(new Event("input"));
  });
  number.addEventListener("change", () => {
    number.value = range.value = clamp(number.value);
  });
  label.htmlFor = range.id = "av-" + name;
  row.append(label, range, number);
  return row;
}

function buildSliders(info, coefs) {
  const box = $("#sliders");
  box.replaceChildren();
  if (!info.avs.length) box.textContent = "this model has no alignment vectors";
  for (const name of info.avs) box.append(knobRow(name, coefs[name], (info.kinds || {})[name]));
}

function sliderCoefficients() {
  const out = {};
  for (const r of document.querySelectorAll("input[type=range][data-av]")) out[r.dataset.av] = Number(r.value);
  return out;
}

// ---- conversations (this browser's localStorage) --------------------------------------------------------

function loadAll() {
  try {
    const all = JSON.parse(localStorage.getItem(STORE) || "{}");
    return all && typeof all === "object" && !Array.isArray(all) ? all : {};
  } catch {
    return {};
  }
}

function saveAll(all) {
  try {
    localStorage.setItem(STORE, JSON.stringify(all));
  } catch (e) {
    status("could not keep the conversation in this browser: " + e.message, true);
  }
}

const newId = () =>
  window.crypto && crypto.randomUUID ? crypto.randomUUID() : Date.now().toString(36) + Math.random().toString(36).slice(2);

function titleOf(conv) {
  if (conv.title) return conv.title;
  const first = conv.turns.find((t) => t.role === "user");
  return first ? first.content.replace(/\s+/g, " ").slice(0, 48) : "new chat";
}

function persist() {
  const conv = state.conv;
  const all = loadAll();
  if (conv.turns.length) {
    conv.updated = Date.now();
    conv.model = $("#model").value;
    all[conv.id] = conv;
  } else delete all[conv.id];
  saveAll(all);
  localStorage.setItem(CURRENT, conv.id);
  renderList();
}

function newChat() {
  stop();
  state.conv = { id: newId(), title: "", created: Date.now(), updated: Date.now(), model: $("#model").value, turns: [] };
  localStorage.setItem(CURRENT, state.conv.id);
  renderConversation();
  renderList();
  $("#prompt").focus();
}

function openConversation(id) {
  const conv = loadAll()[id];
  if (!conv) return;
  stop();
  state.conv = conv;
  localStorage.setItem(CURRENT, id);
  if (conv.model && [...$("#model").options].some((o) => o.value === conv.model) && $("#model").value !== conv.model) {
    $("#model").value = conv.model;
    chooseModel();
  }
  renderConversation();
  renderList();
}

function renderList() {
  const list = $("#conversations");
  const all = Object.values(loadAll()).sort((a, b) => b.updated - a.updated);
  list.replaceChildren();
  for (const conv of all) {
    const li = document.createElement("li");
    li.dataset.conversationId = conv.id;
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = titleOf(conv);
    button.title = new Date(conv.updated).toLocaleString();
    if (state.conv && conv.id === state.conv.id) button.setAttribute("aria-current", "true");
    button.addEventListener("click", () => openConversation(conv.id));
    li.append(button);
    list.append(li);
  }
}

function renameChat() {
  const name = prompt("Name this conversation", titleOf(state.conv));
  if (name === null) return;
  state.conv.title = name.trim().slice(0, 120);
  persist();
}

function deleteChat() {
  if (!state.conv.turns.length || !confirm(`Delete the conversation “${titleOf(state.conv)}”?`)) return;
  const all = loadAll();
  delete all[state.conv.id];
  saveAll(all);
  state.conv.deleted = true; // an answer still streaming into it is dropped, not kept
  const next = Object.values(all).sort((a, b) => b.updated - a.updated)[0];
  if (next) openConversation(next.id);
  else newChat();
  status("deleted");
}

// ---- export / import ------------------------------------------------------------------------------------

function exportJSON(conv = state.conv) {
  return JSON.stringify({ format: "avgguf-conversation", version: 1, ...conv, title: titleOf(conv) }, null, 2);
}

function exportMarkdown(conv = state.conv) {
  const out = [`# ${titleOf(conv)}`, ""];
  for (const turn of conv.turns) {
    if (turn.role === "user") out.push("## user", "", turn.content, "");
    for (const a of turn.role === "assistant" ? answersOf(turn) : []) {
      out.push(`## assistant (${describe(a.coefficients || {}, a.decode || "weights")})`, "", a.content, "");
    }
  }
  return out.join("\n");
}

function download(text, type, ext) {
  const a = document.createElement("a");
  a.href = URL.createObjectURL(new Blob([text], { type }));
  a.download = titleOf(state.conv).replace(/[^\w.-]+/g, "-").slice(0, 60) + ext;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 1000);
}

function validTurn(t) {
  return t && (t.role === "user" || t.role === "assistant") && typeof t.content === "string";
}

const LEVELS = ["avoidance", "generic", "expert", "off-level"];

function numbers(obj) {
  const out = {};
  for (const [k, v] of Object.entries(obj && typeof obj === "object" ? obj : {})) {
    if (typeof v === "number" && Number.isFinite(v)) out[String(k)] = v;
  }
  return out;
}

function cleanAnswer(a) {
  // an imported answer: only the fields the page uses, of the types it expects
  const out = { content: String(a.content || ""), coefficients: numbers(a.coefficients) };
  out.decode = ["weights", "pad", "pad-full"].includes(a.decode) ? a.decode : "weights";
  if (a.stopped) out.stopped = true;
  if (a.usage && typeof a.usage === "object") out.usage = numbers(a.usage);
  if (LEVELS.includes(a.level)) Object.assign(out, { level: a.level, probabilities: numbers(a.probabilities) });
  return out;
}

function cleanTurn(t) {
  if (t.role === "user") return { role: "user", content: t.content };
  const answers = Array.isArray(t.answers) ? t.answers.filter(validTurnish).map(cleanAnswer) : null;
  if (!answers || !answers.length) return { role: "assistant", ...cleanAnswer(t) };
  const turn = { role: "assistant", content: answers[0].content, kind: t.kind === "sweep" ? "sweep" : "compare", answers };
  if (turn.kind === "sweep") turn.knob = String(t.knob || Object.keys(answers[0].coefficients)[0] || "");
  return turn;
}

const validTurnish = (a) => a && typeof a === "object" && typeof a.content === "string";

function importText(text) {
  const data = JSON.parse(text);
  const convs = Array.isArray(data) ? data : data.conversations || [data];
  const all = loadAll();
  let last = null;
  for (const c of convs) {
    if (!c || !Array.isArray(c.turns) || !c.turns.every(validTurn)) throw new Error("not an avgguf conversation (turns)");
    const id = typeof c.id === "string" && !all[c.id] ? c.id : newId();
    const turns = c.turns.map(cleanTurn);
    const created = Number(c.created) || Date.now();
    all[id] = { id, title: String(c.title || ""), created, updated: Number(c.updated) || Date.now(), model: String(c.model || ""), turns };
    last = id;
  }
  saveAll(all);
  if (last) openConversation(last);
  return convs.length;
}

async function importFile() {
  const file = $("#import").files[0];
  if (!file) return;
  try {
    const n = importText(await file.text());
    status(`imported ${n} conversation${n === 1 ? "" : "s"}`);
  } catch (e) {
    status("could not import " + file.name + ": " + e.message, true);
  }
  $("#import").value = "";
}

// ---- messages -------------------------------------------------------------------------------------------

const answersOf = (turn) => turn.answers || [turn];

function describe(coefs, decode) {
  const parts = Object.entries(coefs).map(([k, v]) => `${k}=${v}`);
  return (parts.join(" ") || "no AVs") + (decode && decode !== "weights" ? ` · ${decode}` : "");
}

function describeUsage(u) {
  if (!u || !u.completion) return "";
  return ` · ${u.completion} tokens` + (u.tps ? ` · ${u.tps.toFixed(1)} tok/s` : "");
}

function button(text, label, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = text;
  b.setAttribute("aria-label", label);
  b.addEventListener("click", onClick);
  return b;
}

function messageDiv(role, parent, heading = "") {
  const div = document.createElement("div");
  div.className = "message " + role;
  div.setAttribute("role", "article");
  div.setAttribute("aria-label", role === "user" ? "you" : heading ? "answer at " + heading : "answer");
  if (heading) {
    const h = document.createElement("div");
    h.className = "knob-value";
    h.textContent = heading;
    div.append(h);
  }
  const body = document.createElement("div");
  body.className = "text";
  div.append(body);
  parent.append(div);
  return div;
}

function showLevel(div, answer) {
  if (!answer.level) return;
  div.dataset.level = answer.level;
  const p = answer.probabilities || {};
  const shares = Object.entries(p)
    .sort((a, b) => b[1] - a[1])
    .filter(([, v]) => v >= 0.05)
    .map(([k, v]) => `${k} ${Math.round(v * 100)}%`);
  const el = div.querySelector(".level") || document.createElement("span");
  el.className = "level";
  el.textContent = "level: " + answer.level + (shares.length ? " (" + shares.join(" · ") + ")" : "");
  div.querySelector(".meta").after(el);
}

function finishAnswer(div, answer, index, single, j = 0) {
  div.dataset.coefficients = JSON.stringify(answer.coefficients);
  div.dataset.decode = answer.decode;
  div.dataset.turn = index;
  div.dataset.answer = j;
  if (answer.stopped) div.dataset.stopped = "true";
  setMarkdown(div.querySelector(".text"), answer.content);
  const meta = document.createElement("span");
  meta.className = "meta";
  meta.textContent = describe(answer.coefficients, answer.decode) + describeUsage(answer.usage);
  const actions = document.createElement("div");
  actions.className = "actions";
  actions.append(button("copy", "copy this answer", () => copyText(answer.content)));
  if (single) actions.append(button("regenerate", "regenerate this answer", () => regenerate(index)));
  div.append(meta, actions);
  showLevel(div, answer);
}

function renderUser(turn, index, parent) {
  const div = messageDiv("user", parent);
  div.querySelector(".text").textContent = turn.content;
  const actions = document.createElement("div");
  actions.className = "actions";
  actions.append(button("edit", "edit this message and send it again", () => editTurn(div, index)));
  div.append(actions);
}

function renderTurn(turn, index, parent = $("#messages")) {
  if (turn.role === "user") return renderUser(turn, index, parent);
  if (turn.answers) {
    const pane = document.createElement("div");
    pane.className = turn.kind === "sweep" ? "sweep" : "compare";
    parent.append(pane);
    const heading = (a) => (turn.kind === "sweep" ? `${turn.knob} = ${a.coefficients[turn.knob]}` : "");
    turn.answers.forEach((a, j) => finishAnswer(messageDiv("assistant", pane, heading(a)), a, index, false, j));
    pane.append(button("regenerate", "regenerate these answers", () => regenerate(index)));
  } else finishAnswer(messageDiv("assistant", parent), turn, index, true);
}

function renderConversation() {
  $("#messages").replaceChildren();
  state.conv.turns.forEach((t, i) => renderTurn(t, i));
  showUsage();
  const last = $("#messages").lastElementChild;
  if (last) last.scrollIntoView({ block: "end" });
}

function showUsage() {
  const n = state.model && state.model.n_ctx;
  const last = state.conv && [...state.conv.turns].reverse().find((t) => t.role === "assistant");
  const u = last && answersOf(last)[0].usage;
  const used = u && u.prompt != null ? u.prompt + u.completion : 0;
  const el = $("#usage");
  el.dataset.used = used;
  el.dataset.nCtx = n || "";
  el.textContent = n ? `context ${used} / ${n} tokens` + (u && u.tps ? ` · ${u.tps.toFixed(1)} tok/s` : "") : "";
}

async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    const area = document.createElement("textarea");
    area.value = text;
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  status("copied");
}

function editTurn(div, index) {
  if (state.controllers.length) return;
  const text = div.querySelector(".text");
  const area = document.createElement("textarea");
  area.value = state.conv.turns[index].content;
  area.rows = 3;
  area.setAttribute("aria-label", "edit the message");
  const save = button("send", "send the edited message", () => {
    if (!area.value.trim()) return;
    state.conv.turns = state.conv.turns.slice(0, index);
    state.conv.turns.push({ role: "user", content: area.value });
    renderConversation();
    generate();
  });
  const cancel = button("cancel", "cancel the edit", renderConversation);
  text.replaceChildren(area, save, cancel);
  area.focus();
}

function regenerate(index) {
  if (state.controllers.length) return;
  state.conv.turns = state.conv.turns.slice(0, index);
  renderConversation();
  generate();
}

// ---- streaming ------------------------------------------------------------------------------------------

function readEvents(buffer, onEvent) {
  let cut;
  while ((cut = buffer.indexOf("\n\n")) >= 0) {
    const line = buffer.slice(0, cut).trim();
    buffer = buffer.slice(cut + 2);
    if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
    const event = JSON.parse(line.slice(6));
    if (event.error) throw new Error(event.error.message);
    onEvent(event);
  }
  return buffer;
}

async function streamAnswer(div, messages, coefs, decode, signal) {
  const answer = { content: "", coefficients: coefs, decode, usage: null };
  div.dataset.coefficients = JSON.stringify(coefs);
  const text = div.querySelector(".text");
  const body = {
    model: state.model.id,
    messages,
    stream: true,
    stream_options: { include_usage: true },
    avgguf: { coefficients: coefs, decode },
  };
  const t0 = performance.now();
  let first = null;
  let pending = false;
  const paint = () => {
    pending = false;
    setMarkdown(text, answer.content);
  };
  const onEvent = (event) => {
    if (event.usage) answer.usage = { prompt: event.usage.prompt_tokens, completion: event.usage.completion_tokens };
    const piece = event.choices && event.choices[0] && event.choices[0].delta && event.choices[0].delta.content;
    if (!piece) return;
    if (first === null) first = performance.now();
    answer.content += piece;
    if (!pending) (pending = true), requestAnimationFrame(paint);
  };
  div.classList.add("streaming");
  try {
    const r = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body), signal });
    if (!r.ok) {
      const err = await r.json().catch(() => ({}));
      throw new Error((err.error && err.error.message) || r.statusText);
    }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer = readEvents(buffer + decoder.decode(value, { stream: true }), onEvent);
    }
  } catch (e) {
    if (e.name !== "AbortError") throw e;
    answer.stopped = true;
  } finally {
    div.classList.remove("streaming");
  }
  const seconds = (performance.now() - (first || t0)) / 1000;
  if (answer.usage && answer.usage.completion > 1 && seconds > 0) answer.usage.tps = (answer.usage.completion - 1) / seconds;
  answer.seconds = (performance.now() - t0) / 1000;
  return answer;
}

function compareCoefficients() {
  const choice = $("#compare-with").value;
  const info = state.model;
  if (choice === "base (all 0)") return Object.fromEntries(info.avs.map((n) => [n, 0]));
  return profileCoefficients(info, choice);
}

function sweepValues() {
  const values = $("#sweep-values")
    .value.split(/[\s,;]+/)
    .filter(Boolean)
    .map(Number);
  if (values.length < 2 || values.length > 6 || !values.every((v) => Number.isFinite(v) && v >= -2 && v <= 2)) {
    throw new Error("sweep values: give 3 to 5 numbers between -2 and 2, comma separated (e.g. -2, -1, 0, 1, 2)");
  }
  return values;
}

function plan() {
  const coefs = sliderCoefficients();
  if ($("#sweep").checked) {
    const knob = $("#sweep-knob").value;
    if (!knob) throw new Error("this model has no knob to sweep");
    return { kind: "sweep", knob, sets: sweepValues().map((v) => ({ ...coefs, [knob]: v })) };
  }
  if ($("#compare").checked) return { kind: "compare", sets: [coefs, compareCoefficients()] };
  return { kind: null, sets: [coefs] };
}

function busy(on) {
  $("#send").disabled = on;
  $("#stop").disabled = !on;
  if (!on) state.controllers = [];
}

async function generate() {
  let p;
  try {
    p = plan();
  } catch (e) {
    return status(e.message, true);
  }
  const conv = state.conv;
  const index = conv.turns.length;
  const messages = conv.turns.map((t) => ({ role: t.role, content: t.content }));
  const decode = $("#decode").value;
  let parent = $("#messages");
  if (p.kind) {
    parent = document.createElement("div");
    parent.className = p.kind;
    if (p.kind === "sweep") parent.dataset.knob = p.knob;
    $("#messages").append(parent);
  }
  const divs = p.sets.map((c) => messageDiv("assistant", parent, p.kind === "sweep" ? `${p.knob} = ${c[p.knob]}` : ""));
  divs[divs.length - 1].scrollIntoView({ block: "end" });
  state.controllers = p.sets.map(() => new AbortController());
  busy(true);
  status("generating…");
  const t0 = performance.now();
  const results = await Promise.allSettled(
    p.sets.map((c, i) => streamAnswer(divs[i], messages, c, decode, state.controllers[i].signal))
  );
  const seconds = (performance.now() - t0) / 1000;
  busy(false);
  (parent === $("#messages") ? divs : [parent]).forEach((el) => el.remove()); // drawn again, finished
  finishTurn(p, results, index, seconds, conv);
}

function keepAway(conv, turn) {
  // the answer of a conversation that is no longer open (new chat or another one opened while it streamed)
  if (!turn || conv.deleted) return;
  conv.turns.push(turn);
  conv.updated = Date.now();
  saveAll({ ...loadAll(), [conv.id]: conv });
  renderList();
}

function finishTurn(p, results, index, seconds, conv) {
  const failed = results.find((r) => r.status === "rejected");
  const answers = results.filter((r) => r.status === "fulfilled").map((r) => r.value);
  const turn = !answers.length
    ? null
    : p.kind
      ? { role: "assistant", content: answers[0].content, kind: p.kind, answers, seconds }
      : { role: "assistant", ...answers[0], seconds };
  if (turn && p.kind === "sweep") turn.knob = p.knob;
  if (conv !== state.conv) return keepAway(conv, turn);
  if (failed && !answers.length) {
    const question = state.conv.turns.pop(); // the question goes back into the box
    if (question && question.role === "user" && !$("#prompt").value) $("#prompt").value = question.content;
    renderConversation();
    return status(failed.reason.message, true);
  }
  state.conv.turns.push(turn);
  renderTurn(turn, index);
  $("#messages").lastElementChild.scrollIntoView({ block: "end" });
  persist();
  showUsage();
  judgeTurn(turn, index);
  if (failed) status(failed.reason.message, true);
  else status(answers.some((a) => a.stopped) ? "stopped" : p.kind === "sweep" ? `sweep: ${seconds.toFixed(1)} s` : "");
}

// the level judge's reading of each answer (the server's /avgguf/judge, when it has the judge)
function domainOf(turn, answer) {
  if (turn.knob) return turn.knob;
  const entries = Object.entries(answer.coefficients || {}).sort((a, b) => Math.abs(b[1]) - Math.abs(a[1]));
  return entries.length ? entries[0][0] : "general";
}

async function judgeTurn(turn, index) {
  const question = state.conv.turns[index - 1];
  const conv = state.conv;
  if (!state.judge || !question) return;
  const list = answersOf(turn);
  const rows = list.map((a) => ({ domain: domainOf(turn, a), query: question.content, answer: a.content }));
  try {
    const judged = (await api("/avgguf/judge", { method: "POST", body: JSON.stringify({ rows }) })).data;
    judged.forEach((j, k) => Object.assign(list[k], { level: j.level, probabilities: j.probabilities }));
  } catch (e) {
    return status("the level judge: " + e.message, true);
  }
  const all = loadAll();
  if (all[conv.id]) saveAll({ ...all, [conv.id]: conv });
  if (conv !== state.conv || conv.turns[index] !== turn) return; // another chat is open now: kept, not drawn
  list.forEach((a, k) => {
    const div = document.querySelector(`.message.assistant[data-turn="${index}"][data-answer="${k}"]`);
    if (div) showLevel(div, a);
  });
}

function send(event) {
  event.preventDefault();
  const prompt = $("#prompt").value;
  if (!prompt.trim() || state.controllers.length || !state.model) return;
  $("#prompt").value = "";
  state.conv.turns.push({ role: "user", content: prompt });
  renderTurn(state.conv.turns[state.conv.turns.length - 1], state.conv.turns.length - 1);
  generate();
}

function stop() {
  for (const c of state.controllers) c.abort();
}

// ---- profiles -------------------------------------------------------------------------------------------

async function saveProfile() {
  const name = $("#profile-name").value.trim();
  if (!name) return status("give the profile a name", true);
  if (name in (state.model.profiles || {}) && !confirm(`Replace the profile ${name}?`)) {
    return status(`not saved: ${name} kept as it was`);
  }
  try {
    const body = { model: state.model.id, name, coefficients: sliderCoefficients(), decode: $("#decode").value };
    const saved = await api("/avgguf/profiles", { method: "POST", body: JSON.stringify(body) });
    await loadModels();
    status(saved.replaced ? `replaced profile ${name}` : `saved profile ${name}`);
  } catch (e) {
    status("not saved: " + e.message, true);
  }
}

// ---- keyboard and wiring --------------------------------------------------------------------------------

const typing = (el) => el && (el.tagName === "TEXTAREA" || (el.tagName === "INPUT" && el.type !== "range" && el.type !== "checkbox"));

function shortcuts(e) {
  if (e.ctrlKey && e.shiftKey && e.key.toLowerCase() === "o") {
    e.preventDefault();
    newChat();
  } else if (e.key === "Escape" && e.shiftKey) {
    e.preventDefault();
    $("#prompt").focus();
  } else if (e.key === "Escape" && state.controllers.length) {
    e.preventDefault();
    stop();
  } else if (e.key === "/" && !typing(e.target) && !e.ctrlKey && !e.metaKey) {
    e.preventDefault();
    $("#prompt").focus();
  }
}

function exclusive(a, b) {
  $(a).addEventListener("change", () => $(a).checked && ($(b).checked = false));
}

function wire() {
  $("#model").addEventListener("change", chooseModel);
  $("#reset-knobs").addEventListener("click", chooseModel);
  $("#composer").addEventListener("submit", send);
  $("#stop").addEventListener("click", stop);
  $("#reset").addEventListener("click", newChat);
  $("#new-chat").addEventListener("click", newChat);
  $("#rename-chat").addEventListener("click", renameChat);
  $("#delete-chat").addEventListener("click", deleteChat);
  $("#export-md").addEventListener("click", () => download(exportMarkdown(), "text/markdown", ".md"));
  $("#export-json").addEventListener("click", () => download(exportJSON(), "application/json", ".json"));
  $("#import").addEventListener("change", importFile);
  $("#save-profile").addEventListener("click", saveProfile);
  $("#profile-rename").addEventListener("click", () => editProfile("rename"));
  $("#profile-delete").addEventListener("click", () => editProfile("delete"));
  $("#profile-default").addEventListener("click", () => editProfile("default"));
  exclusive("#compare", "#sweep");
  exclusive("#sweep", "#compare");
  $("#prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) send(e);
  });
  $("#help-toggle").addEventListener("click", () => {
    const help = $("#help");
    help.hidden = !help.hidden;
    $("#help-toggle").setAttribute("aria-expanded", String(!help.hidden));
  });
  $("#key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    state.key = $("#api-key").value.trim();
    sessionStorage.setItem("avgguf-key", state.key);
    $("#api-key").value = "";
    status("checking the key…");
    loadModels();
  });
  document.addEventListener("keydown", shortcuts);
}

// `avgguf desktop` opens this page with a one-time code in the URL's fragment (never sent to any server as
// part of the URL): trade it once for the API key, keep the key for this tab only (sessionStorage, not
// localStorage) and drop the code from the address bar and history. No code and no key: no key box either,
// unless the server answers 401 (a key set by hand: `avgguf serve --api-key-file ...`).
async function redeemCode() {
  const code = new URLSearchParams(location.hash.slice(1)).get("code");
  if (!code) return;
  history.replaceState(null, "", location.pathname + location.search);
  try {
    const body = await api("/avgguf/session", { method: "POST", body: JSON.stringify({ code }) });
    sessionStorage.setItem("avgguf-key", body.key);
  } catch (e) {
    status("could not get the API key from avgguf desktop: " + e.message, true);
  }
}

function start() {
  wire();
  const all = loadAll();
  const current = all[localStorage.getItem(CURRENT)];
  state.conv = current || { id: newId(), title: "", created: Date.now(), updated: Date.now(), model: "", turns: [] };
  renderConversation();
  renderList();
  redeemCode().then(() => {
    state.key = sessionStorage.getItem("avgguf-key") || "";
    loadModels();
  });
}

window.avgguf = { renderMarkdown, exportJSON, exportMarkdown, importText, state }; // for tests and the console
start();
