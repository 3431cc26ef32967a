"""What machine a benchmark ran on, for its results file, and how long a call takes on it."""

import platform
import time
from pathlib import Path

import torch


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def synchronize(device) -> None:
    """Wait for ``device``'s queued work (a CUDA device; a no-op elsewhere), so that a timer around it
    measures the work, not its launch."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fastest(fn, repeats: int, device=None):
    """(result of the first call, fastest wall seconds, process CPU seconds of that call) over
    ``repeats`` calls of ``fn()``. The minimum is the least disturbed run on a shared CPU, and CPU
    time / threads estimates the wall time on idle cores. On CUDA (``device``) one untimed warm-up
    call comes first and every call is synchronised."""
    cuda = device is not None and torch.device(device).type == "cuda"
    if cuda:
        fn()
        torch.cuda.synchronize()
    best, best_cpu, result = float("inf"), float("nan"), None
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        out = fn()
        if cuda:
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
        if wall < best:
            best, best_cpu = wall, cpu
        result = out if result is None else result
    return result, best, best_cpu
