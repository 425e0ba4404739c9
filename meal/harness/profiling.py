"""Time and peak memory per phase of an iteration (``time/<phase>``, ``memory/<phase>_mb``).

Peak memory is measured over the phase: on CUDA, ``torch.cuda.max_memory_allocated`` (reset at
the start of each phase); on the CPU, the resident set size sampled every millisecond by a
background thread. ``memory/<phase>_mb`` is the phase's peak *above* the memory resident when the
phase began: the activations and temporaries the phase needs, weights excluded. (For CPU numbers
that track freed memory, run with ``MALLOC_MMAP_THRESHOLD_=65536`` as ``make bench`` does.)
"""

from __future__ import annotations

import contextlib
import os
import platform
import threading
import time

import torch

from meal.policy.model import cpu_supports_bf16

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def machine() -> str:
    """What a measurement ran on, for results files: the GPU, or the CPU cores, model and whether they have bf16
    arithmetic (what ``policy.dtype=auto`` picks there; a run's own dtype is in its config), the torch threads
    when fewer than the cores (a one-thread run stands in for a slower machine, BENCHMARKS.md), with the torch and
    Python versions."""
    if torch.cuda.is_available():
        dev = f"{torch.cuda.get_device_name(0)} GPU"
    else:
        cpu = "unknown CPU"
        try:
            with open("/proc/cpuinfo") as f:
                cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
        except OSError:
            pass
        bf16 = ("with bf16 arithmetic: policy.dtype=auto runs bf16" if cpu_supports_bf16()
                else "no AVX-512 BF16: policy.dtype=auto runs float32")
        threads = torch.get_num_threads()
        used = f", {threads} torch thread{'s' if threads > 1 else ''}" if threads < (os.cpu_count() or 1) else ""
        dev = f"{os.cpu_count()} CPU cores ({cpu}, {bf16}){used}, no GPU"
    return f"{dev}, torch {torch.__version__}, Python {platform.python_version()}"


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return 0


class PhaseMeter:
    """Context managers ``phase(name)`` accumulating seconds and peak memory for the current iteration."""

    def __init__(self, device: torch.device | None = None, sample_every: float = 0.001):
        self.cuda = device is not None and device.type == "cuda"
        self.sample_every = sample_every
        self.seconds: dict[str, float] = {}
        self.peak_mb: dict[str, float] = {}
        self._peak = 0
        self._stop = threading.Event()
        self._thread = None

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, rss_bytes())
            time.sleep(self.sample_every)

    @contextlib.contextmanager
    def phase(self, name: str):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base = self._peak = rss_bytes()
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        tic = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated()
            else:
                self._stop.set()
                self._thread.join()
                peak = max(self._peak, rss_bytes())
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - tic
            self.peak_mb[name] = max(self.peak_mb.get(name, 0.0), (peak - base) / 2 ** 20)

    def pop(self) -> dict[str, float]:
        """The iteration's metrics, then reset."""
        out = {f"time/{k}": v for k, v in self.seconds.items()}
        out.update({f"memory/{k}_mb": v for k, v in self.peak_mb.items()})
        self.seconds, self.peak_mb = {}, {}
        return out


class NoMeter:
    """Measures nothing (the default of library functions called outside the trainer)."""

    @contextlib.contextmanager
    def phase(self, name: str):
        yield
