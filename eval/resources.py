"""Process memory and time figures recorded at each checkpoint of a run (``resources.jsonl``)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

try:
    import resource
except ImportError:  # Windows
    resource = None  # type: ignore[assignment]

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def rss_mb() -> float:
    """Resident set size of this process now, in MiB (Linux /proc; elsewhere the peak)."""
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return peak_rss_mb()


def peak_rss_mb() -> float:
    """Peak resident set size of this process over its life, in MiB (0.0 where the platform does not say)."""
    if resource is None:
        return 0.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # macOS: bytes; Linux: KiB


def window_peak_rss_mb() -> float:
    """Peak RSS since the last ``reset_window_peak()`` (Linux VmHWM), in MiB; the lifetime peak elsewhere."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return peak_rss_mb()


def reset_window_peak() -> bool:
    """Start a new peak-RSS window (Linux ≥ 4.0: ``echo 5 > /proc/self/clear_refs``); False where unsupported."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def release_free_heap() -> bool:
    """Return freed heap pages to the OS (glibc ``malloc_trim``) so RSS shows live memory, not fragmentation."""
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo; else ``platform.processor()``), "" where nothing says."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def matmul_gflops(seconds: float = 0.3) -> float:
    """float32 GFLOP/s of this process's torch threads on a fixed matrix product shaped like SmolLM2's MLP.

    A speed reference for the time figures beside it: rows timed on different machines (or while something
    else shared this one) differ by it, so seconds × GFLOP/s compare across sittings where seconds alone do not.
    """
    import time

    import torch

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1024, 576, generator=g), torch.randn(576, 1536, generator=g)
    torch.mm(a, b)  # warm-up: thread pool, allocation
    flops, n, began = 2 * 1024 * 576 * 1536, 0, time.perf_counter()
    while True:
        torch.mm(a, b)
        n += 1
        elapsed = time.perf_counter() - began
        if elapsed >= seconds:
            return n * flops / elapsed / 1e9


def _is_tensor(obj: object, cls: type) -> bool:
    try:
        return isinstance(obj, cls)
    except Exception:  # lazy proxies whose __class__ raises
        return False


def live_tensors() -> tuple[int, float]:
    """(number, MiB) of the torch tensors Python can reach, storages counted once: what a leak would grow."""
    import gc
    import warnings

    import torch

    count, seen, total = 0, set(), 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance on deprecated module attributes warns
        objects = [o for o in gc.get_objects() if _is_tensor(o, torch.Tensor)]
    for obj in objects:
        try:
            storage = obj.untyped_storage()
        except Exception:  # tensors without a storage (meta, some subclasses)
            continue
        count += 1
        key = (storage.data_ptr(), storage.device.type)
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return count, total / 2**20
