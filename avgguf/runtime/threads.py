"""The one owner of the CPU thread policy: how many threads llama.cpp computes with, chosen from the cores
other processes leave free, re-checked before every request and during generation.

Why not a wait policy: llama-cpp-python's llama.cpp uses OpenMP, whose threads busy-wait at every barrier.
When another process holds a core, a 2-thread decode waits for its descheduled partner at each of the
hundreds of barriers per token and speed collapses (SmolLM2 on 2 cores with two busy processes: 48 tok/s
instead of 158). OMP_WAIT_POLICY=passive holds up under load but costs 4x
on an idle machine (bench/runtime_speed.py --under-load has the table). One thread has no barriers at all,
so: as many threads as cores are free, never fewer than one. OMP_* variables the user sets still apply.

Overrides: --threads N on the CLI, or AVGGUF_THREADS=N in the environment (a fixed count; 0 = adaptive).

Several contexts decoding from several threads (the server's batching contexts, merged hot sets, PAD) each
start their own OpenMP team. Once libgomp manages more threads than there are cores it "throttles" every
barrier to ~1000 spins before a futex sleep, and ggml's per-op barrier is an OpenMP barrier: both contexts then
slow down, even used strictly one after the other (bench/openmp_contexts.py, SmolLM2, 32 tokens: 0.23 s alone,
0.36-0.39 s once a second context had run). OMP_WAIT_POLICY=active lifts the throttle, and GOMP_SPINCOUNT=300000
keeps libgomp's own default spin for an idle team (a few ms, then sleep): 0.22-0.23 s in every phase.
`openmp_defaults()` sets the two before llama.cpp loads (avgguf/__init__.py), unless the user set them.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field

from avgguf.errors import AvggufError

ENV_THREADS = "AVGGUF_THREADS"
MIN_INTERVAL = 0.1  # seconds: shorter /proc/stat windows are too coarse (10 ms ticks) to trust
HEADROOM = 0.3  # a core counts as free when others use at most 70 % of it


OPENMP_DEFAULTS = {"OMP_WAIT_POLICY": "active", "GOMP_SPINCOUNT": "300000"}


def openmp_defaults() -> None:
    """libgomp reads these once, when llama.cpp's library loads: call before the first `import llama_cpp`."""
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return  # the user's own OpenMP settings win, as a pair
    os.environ.update(OPENMP_DEFAULTS)


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class CpuMeter:
    """Cores busy with other processes since the previous reading: all CPU time from /proc/stat minus this
    process's own (all its threads, spinning OpenMP workers included). None where /proc/stat is missing."""

    def __init__(self):
        self._tick = 1.0 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01
        self._last = self._sample()
        self.last_busy: float | None = None

    def _sample(self) -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat") as f:
                fields = f.readline().split()
        except OSError:
            return None
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
        busy = (user + nice + system + irq + softirq + steal) * self._tick
        own = os.times()
        return time.monotonic(), busy, own.user + own.system

    def others_busy(self) -> float | None:
        now = self._sample()
        if now is None or self._last is None:
            return None
        wall = now[0] - self._last[0]
        if wall < MIN_INTERVAL:
            return self.last_busy
        self.last_busy = max(0.0, ((now[1] - self._last[1]) - (now[2] - self._last[2])) / wall)
        self._last = now
        return self.last_busy


def _env_threads() -> int | None:
    raw = os.environ.get(ENV_THREADS, "").strip()
    if not raw:
        return None
    if not raw.isdigit():
        raise AvggufError(f"{ENV_THREADS}={raw!r}: expected a whole number of threads (0 = adaptive)")
    return int(raw)


@dataclass
class ThreadPolicy:
    """fixed: a thread count that never changes (--threads / AVGGUF_THREADS); None: adaptive."""

    fixed: int | None = None
    cores: int = field(default_factory=available_cores)
    meter: CpuMeter | None = None

    @classmethod
    def from_settings(cls, threads: int | None = None, default: int | None = None) -> ThreadPolicy:
        """--threads wins over AVGGUF_THREADS, which wins over `default` (a modelfile's n_threads); 0 or
        nothing anywhere = adaptive."""
        for choice in (threads, _env_threads(), default):
            if choice is not None:
                fixed = choice or None
                break
        else:
            fixed = None
        return cls(fixed=fixed, meter=None if fixed else CpuMeter())

    def threads(self) -> int:
        if self.fixed:
            return self.fixed
        busy = self.meter.others_busy() if self.meter else None
        if busy is None:
            return self.cores
        return max(1, min(self.cores, math.floor(self.cores - busy + HEADROOM)))
