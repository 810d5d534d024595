"""Running one request on a model's runtime slots: plain JSON or server-sent events from a worker thread,
usage counted in tokens, one access-log line per request."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fastapi.responses import StreamingResponse

from .errors import AvggufError
from .runtime import Runtime
from .server_schemas import APIError, Common

if TYPE_CHECKING:
    from .server import Served


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

    def log(self, completion_tokens: int, status: str = "ok", slot: Runtime | None = None) -> None:
        """One access-log line per request (stderr): model, coefficients, tokens, milliseconds."""
        coefs = ",".join(f"{k}={v:g}" for k, v in self.coefficients.items()) or "-"
        print(f"access: {self.body.model} coefficients={coefs} prompt_tokens={self.prompt_tokens} "
              f"completion_tokens={completion_tokens} ms={1000 * (time.perf_counter() - self.t0):.0f} "
              f"stream={self.body.stream} {status}", file=sys.stderr, flush=True)
        if self.stats:
            print((slot or self.served.runtime).stats(completion_tokens), file=sys.stderr, flush=True)


async def generate(job: Job):
    if not job.body.stream:
        slot = await job.served.acquire()
        try:
            result = await asyncio.to_thread(job.run, slot, False)
        except (ValueError, AvggufError) as exc:
            job.log(0, "error", slot)
            raise APIError(400, str(exc)) from None
        finally:
            job.served.pool.put_nowait(slot)
        job.log(result["usage"]["completion_tokens"], slot=slot)
        result["model"] = job.body.model
        return result
    return StreamingResponse(stream_events(job), media_type="text/event-stream")


async def stream_events(job: Job):
    """SSE from a worker thread. A runtime slot is taken here, when the stream starts (a client gone before
    that never holds one); a client that goes away sets `cancel`, and the worker stops at the next token and
    returns the slot itself, so the next request never waits on a dead stream."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    cancel = threading.Event()
    include_usage = bool((job.body.stream_options or {}).get("include_usage"))
    slot = await job.served.acquire()

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
            loop.call_soon_threadsafe(job.served.pool.put_nowait, slot)

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    last = None
    try:
        while True:
            kind, item = await queue.get()
            if kind == "chunk":
                last = item
                yield f"data: {json.dumps(item)}\n\n"
            elif kind == "error":
                yield f"data: {json.dumps({'error': {'message': item, 'type': 'server_error'}})}\n\n"
                break
            else:
                if include_usage and last is not None:
                    usage = {"prompt_tokens": job.prompt_tokens, "completion_tokens": item,
                             "total_tokens": job.prompt_tokens + item}
                    tail = {"object": last.get("object"), "id": last.get("id"), "created": last.get("created"),
                            "model": job.body.model, "choices": [], "usage": usage}
                    yield f"data: {json.dumps(tail)}\n\n"
                yield "data: [DONE]\n\n"
                break
    finally:
        cancel.set()
