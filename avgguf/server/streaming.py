"""Running one request: PAD requests on the model's runtime (a worker thread), the others on its batcher;
plain JSON or server-sent events (one writer, SSE, for both paths), usage counted in tokens, one access-log
line per request."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from starlette.background import BackgroundTask

from avgguf.runtime.batching import BatchRequest, BusyError, Event
from avgguf.runtime.engine import Perf
from avgguf.errors import AvggufError
from avgguf.runtime.session import GenerationRequest, Runtime
from avgguf.runtime.sampling import Sampling
from avgguf.server.protocol import APIError, Common

if TYPE_CHECKING:
    from avgguf.server.registry import Served


class SSE:
    """The one writer of the server-sent events of a streamed answer, for both paths (PAD and batched), in
    OpenAI's stream format: each chunk as `data: JSON`, an error as an event of its own (the headers are sent
    by then), and at the end the usage tail (only when the request asked for stream_options.include_usage)
    and `data: [DONE]`."""

    DONE = "data: [DONE]\n\n"

    def __init__(self, body: Common):
        self.include_usage = bool((body.stream_options or {}).get("include_usage"))

    @staticmethod
    def event(obj: dict) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    def error(self, message: str) -> str:
        return self.event({"error": {"message": message, "type": "server_error"}})

    def end(self, head: dict | None, usage: dict) -> list[str]:
        """The last events: the usage tail, `head` (id, created, model, object, in the caller's key order) with
        no choices, when asked for and `head` is known; then [DONE]."""
        tail = [self.event({**head, "choices": [], "usage": usage})] if self.include_usage and head is not None else []
        return [*tail, self.DONE]


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


@dataclass
class Job:
    """One generation request as the routes hand it to `generate`."""

    served: Served
    body: Common
    run: object  # (runtime, stream: bool) -> result dict or chunk iterator
    coefficients: dict[str, float]
    prompt_tokens: int
    stats: bool
    decode: str = "weights"
    t0: float = field(default_factory=time.perf_counter)

    def log(self, completion_tokens: int, status: str = "ok", slot: Runtime | None = None, stats: str | None = None) -> None:
        """One access-log line per request (stderr): model, coefficients, tokens, milliseconds; with --stats
        the request's llama.cpp timings (`stats`, else the runtime slot's counters)."""
        coefs = ",".join(f"{k}={v:g}" for k, v in self.coefficients.items()) or "-"
        print(
            f"access: {self.body.model} coefficients={coefs} prompt_tokens={self.prompt_tokens} "
            f"completion_tokens={completion_tokens} ms={1000 * (time.perf_counter() - self.t0):.0f} "
            f"stream={self.body.stream} {status}",
            file=sys.stderr,
            flush=True,
        )
        if self.stats and status == "ok":
            print(stats or (slot or self.served.runtime).stats(completion_tokens), file=sys.stderr, flush=True)


async def until_gone(request: Request) -> None:
    """Returns when the client hangs up (the body is read by then: what is left to hear is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def first(work: asyncio.Future, request: Request):
    """`work`'s result, or None when the client hangs up first (`work` goes on: cancel it by its own flag)."""
    gone = asyncio.ensure_future(until_gone(request))
    try:
        done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    return work.result() if work in done else None


async def generate(job: Job, request: Request, gen: GenerationRequest):
    """A PAD request on the model's runtime (one at a time). The slot is taken before any header is sent, so
    a full queue is a 503, streamed or not; a client that hangs up sets `gen.cancel` and the decoder stops at
    its next token, queued, prefilling or decoding."""
    waiting = asyncio.ensure_future(job.served.acquire())  # a 503 when the queue is full, before any header
    slot = await first(waiting, request)
    if slot is None:  # left while queued: the slot, once it comes, goes to the next request unused
        waiting.add_done_callback(lambda w: w.cancelled() or w.exception() or job.served.release(w.result()))
        job.log(0, "cancelled")
        return Response(status_code=499)
    job.served.inflight.add(gen.cancel)
    if not job.body.stream:
        work = asyncio.ensure_future(asyncio.to_thread(job.run, slot, False))
        work.add_done_callback(lambda _: job.served.release(slot))
        try:
            result = await first(work, request)
        except (ValueError, AvggufError) as exc:
            job.log(0, "error", slot)
            raise APIError(400, str(exc)) from None
        if result is None:
            gen.cancel.set()
            job.log(0, "cancelled", slot)
            return Response(status_code=499)
        job.log(result["usage"]["completion_tokens"], slot=slot)
        result["model"] = job.body.model
        return result
    queue: asyncio.Queue = asyncio.Queue()
    start_worker(job, slot, gen.cancel, queue)  # it returns the slot, even for a client gone before the stream
    return StreamingResponse(
        stream_events(job, queue, gen.cancel), media_type="text/event-stream", background=BackgroundTask(gen.cancel.set)
    )


def start_worker(job: Job, slot: Runtime, cancel: threading.Event, queue: asyncio.Queue) -> None:
    """A PAD stream's chunks from a worker thread on the runtime `slot`, into `queue`; a client that goes away
    sets `cancel`, and the worker stops at the next token and returns the slot itself."""
    loop = asyncio.get_running_loop()

    def worker():
        finish = None
        try:
            for chunk in job.run(slot, True):
                if cancel.is_set():
                    break
                finish = (chunk.get("choices") or [{}])[0].get("finish_reason") or finish
                chunk["model"] = job.body.model
                loop.call_soon_threadsafe(queue.put_nowait, ("chunk", chunk))
            n = slot.generated_tokens(finish, job.decode)
            job.log(n, "cancelled" if cancel.is_set() else "ok", slot)
            loop.call_soon_threadsafe(queue.put_nowait, ("done", n))
        except Exception as exc:  # noqa: BLE001 (reported in-stream: headers are already sent)
            job.log(0, "error", slot)
            loop.call_soon_threadsafe(queue.put_nowait, ("error", str(exc)))
        finally:
            loop.call_soon_threadsafe(job.served.release, slot)

    threading.Thread(target=worker, daemon=True).start()


async def stream_events(job: Job, queue: asyncio.Queue, cancel: threading.Event):
    """SSE of a PAD answer as its worker (start_worker) queues chunks; the stream's end sets `cancel`."""
    sse = SSE(job.body)
    head = None  # the last chunk's id, created and object: the usage tail's
    try:
        while True:
            kind, item = await queue.get()
            if kind == "chunk":
                head = {"object": item.get("object"), "id": item.get("id"), "created": item.get("created")}
                yield sse.event(item)
            elif kind == "error":
                yield sse.error(item)
                break
            else:
                tail = None if head is None else {**head, "model": job.body.model}
                for event in sse.end(tail, _usage(job.prompt_tokens, item)):
                    yield event
                break
    finally:
        cancel.set()


# --- continuous batching (AVs in the weights) -------------------------------------------------------------


@dataclass
class BatchJob:
    """A request for the model's batcher: prompt tokens, coefficient set, sampling, and the answer's shape."""

    job: Job
    tokens: list[int]
    key: tuple
    sampling: Sampling
    chat: bool  # chat.completion(.chunk) or text_completion
    sampler: object | None = None  # its llama.cpp chain, built off the event loop (avgguf.runtime.sampling.Sampler)

    def head(self) -> dict:
        kind = "chatcmpl" if self.chat else "cmpl"
        return {"id": f"{kind}-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": self.job.body.model}


def _logprobs(entries: list[dict], chat: bool):
    """OpenAI's logprobs: {"content": [...]} for chat, the legacy token lists for completions."""
    if chat:
        return {"content": entries}
    return {
        "tokens": [e["token"] for e in entries],
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
    }


class EventPipe:
    """Scheduler-thread events into an asyncio queue, waking the event loop as little as possible: pieces of
    a non-streamed answer gather until its end, streamed ones are handed over in bunches (one wake-up per
    bunch). Measured: one wake-up per token cost the server a fifth of its throughput at 8 clients."""

    def __init__(self, stream: bool):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.stream = stream
        self._pending: list[Event] = []
        self._lock = threading.Lock()
        self._scheduled = False

    def emit(self, ev: Event) -> None:  # scheduler thread
        with self._lock:
            self._pending.append(ev)
            if self._scheduled or (ev.kind == "piece" and not self.stream):
                return
            self._scheduled = True
        self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:  # event loop
        with self._lock:
            events, self._pending, self._scheduled = self._pending, [], False
        for ev in events:
            self.queue.put_nowait(ev)


def _submit(bj: BatchJob) -> tuple[BatchRequest, asyncio.Queue]:
    pipe = EventPipe(bj.job.body.stream)
    req = BatchRequest(bj.tokens, bj.key, bj.sampling, emit=pipe.emit, sampler=bj.sampler)
    try:
        batcher, req.key = bj.job.served.route(bj.key)
        batcher.submit(req)
        bj.job.served.inflight.add(req.cancelled)
    except BusyError as exc:
        if bj.sampler is not None:
            bj.sampler.close()
        raise APIError(503, str(exc), code="server_busy", type_="server_error") from None
    return req, pipe.queue


def _stats(ev: Event) -> str:
    return Perf(ev.evaluated, ev.prompt_ms, max(ev.tokens - 1, 0), ev.gen_ms).line(ev.tokens)


async def generate_batched(bj: BatchJob, request: Request):
    req, queue = _submit(bj)
    if bj.job.body.stream:
        # the background task runs when the response ends, even if the client left before the stream began
        return StreamingResponse(
            batched_events(bj, req, queue), media_type="text/event-stream", background=BackgroundTask(req.cancelled.set)
        )
    try:
        answer = await first(asyncio.ensure_future(_collect(queue)), request)
    finally:
        req.cancelled.set()  # a client gone, queued or mid-answer, frees its sequence at the next step
    if answer is None:
        bj.job.log(0, "cancelled")
        return Response(status_code=499)
    parts, entries, ev = answer
    if ev.kind == "error":
        bj.job.log(0, "error")
        raise APIError(500, f"generation failed: {ev.text}", type_="server_error")
    bj.job.log(ev.tokens, stats=_stats(ev))
    text = "".join(parts)
    logprobs = _logprobs(entries, bj.chat) if bj.sampling.logprobs is not None else None
    if bj.chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs, "finish_reason": ev.finish}
    else:
        choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": ev.finish}
    return {
        **bj.head(),
        "object": "chat.completion" if bj.chat else "text_completion",
        "choices": [choice],
        "usage": _usage(len(bj.tokens), ev.tokens),
    }


async def _collect(queue: asyncio.Queue) -> tuple[list[str], list[dict], Event]:
    parts, entries = [], []
    while (ev := await queue.get()).kind == "piece":
        parts.append(ev.text)
        entries += ev.logprobs or []
    return parts, entries, ev


def _chunk(bj: BatchJob, head: dict, text: str | None, finish: str | None, entries=None, role: bool = False) -> dict:
    logprobs = _logprobs(entries, bj.chat) if entries else None
    if bj.chat:
        delta = {"role": "assistant"} if role else ({"content": text} if text else {})
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
    return {**head, "object": _chunk_object(bj), "choices": [choice]}


def _chunk_object(bj: BatchJob) -> str:
    return "chat.completion.chunk" if bj.chat else "text_completion"


async def batched_events(bj: BatchJob, req: BatchRequest, queue: asyncio.Queue):
    """SSE as the batcher emits; a client that goes away cancels its sequence (freed at the next step)."""
    head, sse = bj.head(), SSE(bj.job.body)
    status = "cancelled"
    try:
        if bj.chat:
            yield sse.event(_chunk(bj, head, None, None, role=True))
        while (ev := await queue.get()).kind == "piece":
            yield sse.event(_chunk(bj, head, ev.text, None, ev.logprobs))
        if ev.kind == "error":
            status = "error"
            yield sse.error(ev.text)
            return
        status = "ok"
        yield sse.event(_chunk(bj, head, None, ev.finish))
        for event in sse.end({**head, "object": _chunk_object(bj)}, _usage(len(bj.tokens), ev.tokens)):
            yield event
        bj.job.log(ev.tokens, stats=_stats(ev))
    finally:
        req.cancelled.set()
        if status != "ok":
            bj.job.log(0, status)
