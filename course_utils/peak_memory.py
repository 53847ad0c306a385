"""Peak memory of a block of PyTorch code, on a CPU or a GPU: what training really holds.

On a GPU the honest number is ``torch.cuda.max_memory_allocated()``. A CPU has no such counter
and its process RSS measures something else (malloc keeps freed memory, safetensors maps the
weights), so on a CPU `PeakMemory` sums the allocations and frees that ``torch.profiler``
records (``profile_memory=True``): the bytes held by live tensors at every instant. Lessons 06,
07 and 12 measure training with it (through `course_utils.callbacks.TrainingMeter`);
``make bench`` (`course_tools.bench`) explains the method at length.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import time
from bisect import bisect_right
from collections.abc import Iterator

import torch
from torch.profiler import ProfilerActivity, profile, record_function

__all__ = ["PeakMemory", "proc_status"]


# --------------------------------------------------------------------------------------------
# Reading the process's memory (Linux; None elsewhere)
# --------------------------------------------------------------------------------------------


def proc_status(key: str) -> int | None:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM, ...) in bytes, or None off Linux."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_rss_peak() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS; False where impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------------------------
# The measuring instrument
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _c_stderr_silenced() -> Iterator[None]:
    """Send what C++ code writes to file descriptor 2 to /dev/null inside the block.

    torch's profiler (Kineto) prints a "USDT: ... profiler_start" line and a "profiler_stop"
    line there every time it starts and stops, and torch's allocator warns once per process
    about a block allocated before the profiler and freed while it runs; Jupyter shows them as
    red text under every cell that trains with ``measure_memory=True``. Python exceptions and
    Python-level output are not affected.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


class PeakMemory:
    """Peak bytes held by live torch tensors inside a ``with`` block, on CPU or CUDA.

    CPU: the running sum of the allocations and frees that ``torch.profiler`` records;
    CUDA: ``torch.cuda.max_memory_allocated``. Both count only what was allocated *inside* the
    block (``peak`` is relative to the entry level). ``phase(name)`` marks a part of the block;
    after exit ``phases[name]`` holds the live bytes at its start and end and its peak.
    ``rss_peak`` is the process's peak RSS inside the block (CPU, Linux), or the allocator's
    peak reserved bytes on CUDA.
    """

    def __init__(self, device: str | torch.device = "cpu") -> None:
        """Prepare to measure on ``device`` ('cpu' or 'cuda')."""
        if not isinstance(device, (str, torch.device)):
            raise TypeError(f"device must be 'cpu' or 'cuda', got {device!r}.")
        self.device = torch.device(device)
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"PeakMemory measures 'cpu' or 'cuda', not {self.device.type!r}.")
        self.peak: int | None = None
        self.rss_peak: int | None = None
        self.phases: dict[str, dict[str, int]] = {}
        self._marks: list[tuple[str, int, int]] = []
        self._cuda_peak = 0
        self._profiler = None
        self._start = 0

    def __enter__(self) -> PeakMemory:
        """Start counting."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            self._cuda_peak = self._start
        else:
            self._profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            older = torch.empty(1)  # a block from before the profiler, freed while it runs:
            with _c_stderr_silenced():
                self._profiler.__enter__()
                del older  # torch warns about such a block once per process: here, silenced
            _reset_rss_peak()
        return self

    def __exit__(self, *exc_info) -> None:
        """Stop counting and work out the peak and the phases."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = max(self._cuda_peak, torch.cuda.max_memory_allocated(self.device))
            self.peak = peak - self._start
            self.rss_peak = torch.cuda.max_memory_reserved(self.device)
            return
        self.rss_peak = proc_status("VmHWM")
        with _c_stderr_silenced():
            self._profiler.__exit__(*exc_info)
        events = sorted(
            (event.start_ns(), event.nbytes())
            for event in self._profiler.profiler.kineto_results.events()
            if event.name() == "[memory]"
        )
        self._profiler = None
        times = [t for t, _ in events]
        live = [0]
        for _, nbytes in events:
            live.append(live[-1] + nbytes)
        self.peak = max(live)

        for name, start_ns, end_ns in self._marks:
            first, last = bisect_right(times, start_ns), bisect_right(times, end_ns)
            self.phases[name] = {
                "start": live[first],
                "end": live[last],
                "peak": max(live[first : last + 1]),
            }

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Mark a named part of the measured block (e.g. 'forward', 'backward')."""
        if not isinstance(name, str) or not name:
            raise ValueError("phase needs a non-empty name such as 'forward'.")
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            # resetting the peak counter below forgets the maximum so far: keep it here
            self._cuda_peak = max(self._cuda_peak, torch.cuda.max_memory_allocated(self.device))
            start = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            yield
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            self._cuda_peak = max(self._cuda_peak, peak)
            self.phases[name] = {
                "start": start - self._start,
                "end": torch.cuda.memory_allocated(self.device) - self._start,
                "peak": peak - self._start,
            }
            return

        start_ns = time.time_ns()  # the profiler's clock
        with record_function(name):
            yield
        self._marks.append((name, start_ns, time.time_ns()))
