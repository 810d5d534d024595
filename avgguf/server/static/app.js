// avgguf desktop chat: one slider per alignment vector, streamed answers, compare, save as profile.
// All user and model text is inserted with textContent, never as HTML.
"use strict";

const $ = (sel) => document.querySelector(sel);
const state = { models: [], model: null, history: [], controller: null };

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("#api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
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
  if (!r.ok) throw new Error((body.error && body.error.message) || r.statusText);
  return body;
}

async function loadModels() {
  try {
    state.models = (await api("/avgguf/models")).data;
  } catch (e) {
    status("could not list models: " + e.message, true);
    return;
  }
  const select = $("#model");
  const previous = select.value;
  select.replaceChildren();
  for (const m of state.models) {
    for (const id of [m.id, ...Object.keys(m.profiles).map((p) => m.id + ":" + p)]) {
      const opt = document.createElement("option");
      opt.value = id;
      opt.textContent = id;
      select.append(opt);
    }
  }
  if (previous && [...select.options].some((o) => o.value === previous)) select.value = previous;
  chooseModel();
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
  const decode = (profile && info.decode[profile]) || "weights";
  $("#decode").value = decode;
  const compare = $("#compare-with");
  compare.replaceChildren();
  for (const label of ["base (all 0)", ...Object.keys(info.profiles)]) {
    const opt = document.createElement("option");
    opt.value = label;
    opt.textContent = label;
    compare.append(opt);
  }
}

function buildSliders(info, coefs) {
  const box = $("#sliders");
  box.replaceChildren();
  if (!info.avs.length) {
    box.textContent = "this model has no alignment vectors";
    return;
  }
  for (const name of info.avs) {
    const row = document.createElement("div");
    row.className = "knob";
    const label = document.createElement("label");
    label.textContent = name;
    const range = document.createElement("input");
    Object.assign(range, { type: "range", min: -2, max: 2, step: 0.05, value: coefs[name] });
    range.dataset.av = name;
    const number = document.createElement("input");
    Object.assign(number, { type: "number", min: -2, max: 2, step: 0.05, value: coefs[name] });
    number.dataset.avNumber = name;
    range.addEventListener("input", () => (number.value = range.value));
    number.addEventListener("change", () => {
      const v = Math.max(-2, Math.min(2, Number(number.value) || 0));
      number.value = v;
      range.value = v;
    });
    label.htmlFor = range.id = "av-" + name;
    row.append(label, range, number);
    box.append(row);
  }
}

function sliderCoefficients() {
  const out = {};
  for (const r of document.querySelectorAll("input[type=range][data-av]")) out[r.dataset.av] = Number(r.value);
  return out;
}

function addMessage(role, text, parent = $("#messages")) {
  const div = document.createElement("div");
  div.className = "message " + role;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  div.append(body);
  parent.append(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function describe(coefs, decode) {
  const parts = Object.entries(coefs).map(([k, v]) => `${k}=${v}`);
  return (parts.join(" ") || "no AVs") + (decode !== "weights" ? ` · ${decode}` : "");
}

async function streamAnswer(div, messages, coefs, decode, signal) {
  div.dataset.coefficients = JSON.stringify(coefs);
  div.dataset.decode = decode;
  const meta = document.createElement("span");
  meta.className = "meta";
  meta.textContent = describe(coefs, decode);
  const text = div.querySelector(".text");
  const body = { model: state.model.id, messages, stream: true, avgguf: { coefficients: coefs, decode } };
  const r = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body), signal });
  if (!r.ok) {
    const err = await r.json().catch(() => ({}));
    throw new Error((err.error && err.error.message) || r.statusText);
  }
  const reader = r.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  div.classList.add("streaming");
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const line = buffer.slice(0, cut).trim();
        buffer = buffer.slice(cut + 2);
        if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
        const event = JSON.parse(line.slice(6));
        if (event.error) throw new Error(event.error.message);
        const piece = event.choices && event.choices[0] && event.choices[0].delta && event.choices[0].delta.content;
        if (piece) text.textContent += piece;
      }
    }
  } finally {
    div.classList.remove("streaming");
    div.append(meta);
  }
  return text.textContent;
}

function compareCoefficients() {
  const choice = $("#compare-with").value;
  const info = state.model;
  if (choice === "base (all 0)") return Object.fromEntries(info.avs.map((n) => [n, 0]));
  return profileCoefficients(info, choice);
}

async function send(event) {
  event.preventDefault();
  const prompt = $("#prompt").value;
  if (!prompt.trim() || state.controller || !state.model) return;
  $("#prompt").value = "";
  addMessage("user", prompt);
  state.history.push({ role: "user", content: prompt });
  const coefs = sliderCoefficients();
  const decode = $("#decode").value;
  state.controller = new AbortController();
  $("#send").disabled = true;
  $("#stop").disabled = false;
  status("generating…");
  try {
    if ($("#compare").checked) {
      const pane = document.createElement("div");
      pane.className = "compare";
      $("#messages").append(pane);
      const a = addMessage("assistant", "", pane);
      const b = addMessage("assistant", "", pane);
      const first = await streamAnswer(a, state.history, coefs, decode, state.controller.signal);
      await streamAnswer(b, state.history, compareCoefficients(), decode, state.controller.signal);
      state.history.push({ role: "assistant", content: first });
    } else {
      const div = addMessage("assistant", "");
      const answer = await streamAnswer(div, state.history, coefs, decode, state.controller.signal);
      state.history.push({ role: "assistant", content: answer });
    }
    status("");
  } catch (e) {
    if (e.name === "AbortError") {
      status("stopped");
      const last = [...document.querySelectorAll(".message.assistant")].pop();
      if (last) {
        last.dataset.stopped = "true";
        state.history.push({ role: "assistant", content: last.querySelector(".text").textContent });
      }
    } else {
      status(e.message, true);
      state.history.pop();
    }
  } finally {
    state.controller = null;
    $("#send").disabled = false;
    $("#stop").disabled = true;
  }
}

async function saveProfile() {
  const name = $("#profile-name").value.trim();
  if (!name) return status("give the profile a name", true);
  if (name in (state.model.profiles || {}) && !confirm(`Replace the profile ${name}?`)) {
    return status(`not saved: ${name} kept as it was`);
  }
  try {
    const body = { model: state.model.id, name, coefficients: sliderCoefficients(), decode: $("#decode").value };
    const saved = await api("/avgguf/profiles", { method: "POST", body: JSON.stringify(body) });
    status(saved.replaced ? `replaced profile ${name}` : `saved profile ${name}`);
    await loadModels();
  } catch (e) {
    status("not saved: " + e.message, true);
  }
}

$("#model").addEventListener("change", chooseModel);
$("#reset-knobs").addEventListener("click", chooseModel);
$("#composer").addEventListener("submit", send);
$("#stop").addEventListener("click", () => state.controller && state.controller.abort());
$("#reset").addEventListener("click", () => {
  state.history = [];
  $("#messages").replaceChildren();
});
$("#save-profile").addEventListener("click", saveProfile);
$("#prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) send(e);
});
// `avgguf desktop` opens this page with a one-time code in the URL's fragment (never sent to any server as
// part of the URL): trade it once for the API key, keep the key for this tab only (sessionStorage, not
// localStorage) and drop the code from the address bar and history.
async function redeemCode() {
  const code = new URLSearchParams(location.hash.slice(1)).get("code");
  if (!code) return;
  history.replaceState(null, "", location.pathname + location.search);
  try {
    const body = await api("/avgguf/session", { method: "POST", body: JSON.stringify({ code }) });
    sessionStorage.setItem("avgguf-key", body.key);
  } catch (e) {
    status("could not get the API key from avgguf desktop: " + e.message + " (type it above)", true);
  }
}
$("#api-key").addEventListener("change", () => {
  sessionStorage.setItem("avgguf-key", $("#api-key").value);
  loadModels();
});
redeemCode().then(() => {
  $("#api-key").value = sessionStorage.getItem("avgguf-key") || "";
  loadModels();
});
