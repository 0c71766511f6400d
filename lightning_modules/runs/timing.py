"""Measuring tools: time a callable over repeats (median, quartiles), its peak memory, and this machine's float32
matrix-multiply peak, so any two pieces of code can be compared in one process on a shared machine.

    calls = {"ours": stopwatch(lambda: ours(x), device), "theirs": stopwatch(lambda: theirs(x), device)}
    lines = [Line.of(name, name, measured, items=len(x)) for name, measured in
             measure(calls, device, warmup=2, repeats=5).items()]
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels (a no-op on the CPU), so a clock read after it counts them."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resident_bytes() -> int:
    """This process's resident set size."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def release_free_heap() -> None:
    """Return freed heap pages to the OS (glibc), so a line's RSS growth is not hidden by an earlier line's frees."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def memory_method(device: torch.device) -> str:
    return "cuda max_memory_allocated" if device.type == "cuda" else "peak RSS growth (/proc/self/statm)"


class PeakMemory:
    """Peak memory growth over a block: on CUDA the allocator's peak above its start (``max_memory_allocated``), on
    the CPU the resident set size above its start, sampled by a thread every ``interval`` seconds."""

    def __init__(self, device: torch.device, interval: float):
        self.device, self.interval = device, interval
        self.method = memory_method(device)
        self.peak_bytes = 0

    def _sample(self) -> None:
        while not self._done.wait(self.interval):
            self._peak = max(self._peak, resident_bytes())

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            release_free_heap()
            self._start = self._peak = resident_bytes()
            self._done = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._start
        else:
            self._done.set()
            self._thread.join()
            self.peak_bytes = max(self._peak, resident_bytes()) - self._start


#: one call of a line: returns the seconds it counts, and records its peak memory into the ``PeakMemory`` given
Call = Callable[[PeakMemory | None], float]


def stopwatch(fn: Callable[[], object], device: torch.device) -> Call:
    """``fn`` as a ``Call``: its whole wall time counts (the device synchronized before and after)."""

    def call(memory: PeakMemory | None = None) -> float:
        with memory or contextlib.nullcontext():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            return time.perf_counter() - start

    return call


@dataclass
class Measured:
    seconds: list[float]  # what each timed call counts
    peak_memory_bytes: int  # over the last warm-up call
    first_call_seconds: float  # wall time of the first call: with its one-time work (caches, kernels, compilation)


def measure(
    calls: dict[str, Call], device: torch.device, warmup: int = 2, repeats: int = 5, memory_interval: float = 0.002
) -> dict[str, Measured]:
    """Each line's seconds over ``repeats`` rounds after ``warmup`` calls, and its peak memory in the last warm-up
    call (the first call of a line allocates one-time caches: kernels, lazily built buffers, embedding caches).

    Every round calls each line once, in reversed order every other round: the load of a shared machine drifts, and
    compared lines must see the same drift (lines run one after another can differ by more than the effect measured).
    """
    if warmup < 1 or repeats < 1:
        raise ValueError("warmup and repeats must be >= 1 (the first call fills the caches)")
    memory, first = {}, {}
    for name, call in calls.items():
        for i in range(warmup):
            last = i == warmup - 1
            memory[name] = PeakMemory(device, memory_interval) if last else None
            start = time.perf_counter()
            call(memory[name])
            if i == 0:
                first[name] = time.perf_counter() - start
    seconds = {name: [] for name in calls}
    for round_ in range(repeats):
        for name in list(calls) if round_ % 2 == 0 else reversed(list(calls)):
            seconds[name].append(calls[name]())
    return {name: Measured(seconds[name], memory[name].peak_bytes, first[name]) for name in calls}


@dataclass
class Line:
    """One measured line: the seconds of each timed repeat, each processing ``items`` images (or FLOPs)."""

    name: str
    what: str
    seconds: list[float]
    items: float
    peak_memory_bytes: int
    first_call_seconds: float
    unit: str = "images/s"

    @classmethod
    def of(cls, name: str, what: str, measured: Measured, items: float, unit: str = "images/s") -> Line:
        return cls(name, what, measured.seconds, items, measured.peak_memory_bytes, measured.first_call_seconds, unit)

    @property
    def rates(self) -> np.ndarray:
        return self.items / np.asarray(self.seconds)

    @property
    def median(self) -> float:
        return float(np.median(self.rates))

    def summary(self) -> dict:
        q1, q3 = np.percentile(self.rates, [25, 75])
        return {
            "what": self.what,
            "unit": self.unit,
            "median": self.median,
            "q1": float(q1),
            "q3": float(q3),
            "min": float(self.rates.min()),
            "max": float(self.rates.max()),
            "repeats": len(self.seconds),
            "seconds": self.seconds,
            "items_per_repeat": self.items,
            "peak_memory_mb": self.peak_memory_bytes / 2**20,
            "first_call_seconds": self.first_call_seconds,
        }


def matmul(size: int, device: torch.device, generator: torch.Generator) -> tuple[Call, float]:
    """A float32 ``torch.mm`` of two ``size`` x ``size`` random matrices and its FLOPs: timed, the best repeat is this
    machine's peak FLOP rate (its mean under load is not)."""
    a = torch.randn(size, size, generator=generator).to(device)
    b = torch.randn(size, size, generator=generator).to(device)
    return stopwatch(lambda: torch.mm(a, b), device), 2 * size**3


@contextlib.contextmanager
def cold_compile_caches(directory: str) -> Iterator[None]:
    """Compiled code cached in ``directory`` only: compilation is timed as a fresh machine pays it."""
    names = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")
    before = {name: os.environ.get(name) for name in names}
    os.environ.update({name: os.path.join(directory, name.lower()) for name in names})
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name)
            else:
                os.environ[name] = value
