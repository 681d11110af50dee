"""What this machine offers: compute dtypes, the CPU's bfloat16/int8 support, devices, and the process-wide
switches (denormal flushing, glibc's allocator) that only a program's entry point may flip.

``flush_denormal``, ``reuse_freed_memory`` and ``return_freed_memory`` are explicit opt-ins for a program's
entry point (the CLI and the benchmark workers call them); no library function calls them.
"""
from __future__ import annotations

import contextlib
import os
import platform
from typing import Iterator

import torch

from .errors import FcnsegError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """A torch dtype from a name in ``DTYPES``, a torch dtype, or None (float32); else a one-line error."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise FcnsegError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}") from None


def _flushing_denormals() -> bool:
    # torch has a setter but no getter: a subnormal that comes out as zero tells
    return bool((torch.tensor([1e-40]) * 1)[0] == 0)


@contextlib.contextmanager
def flush_denormal() -> Iterator[bool]:
    """Process-wide opt-in: subnormal floats are flushed to zero inside the block (``torch.set_flush_denormal``);
    yields whether the CPU supports it, and restores the previous setting on this thread at the end.

    On x86 subnormal floats take a slow path that made a float32 EfficientNet-Lite0 FCN ten times slower;
    in inference they are noise. The setting holds for this thread and the OpenMP threads started after
    it, so enter the block before the first parallel work: this belongs to a program's entry point
    (``fcnseg`` commands and the benchmark worker use it), not to a library call.
    """
    was = _flushing_denormals()
    supported = torch.set_flush_denormal(True)
    try:
        yield supported
    finally:
        torch.set_flush_denormal(was)


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4


_reusing = False  # reuse_freed_memory() succeeded in this process


def _glibc():
    """This process's C library when it is glibc (whose malloc the functions below tune), else None."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018  (glibc only: musl and others have different semantics)
        return libc
    except (OSError, AttributeError):
        return None


def reuse_freed_memory(keep_bytes: int = 2**31 - 1, top_pad_bytes: int = 64 << 20) -> bool:
    """Process-wide opt-in, not undone: glibc's malloc keeps freed memory for the next allocation instead of
    handing it back to the OS. Returns True where it was set, False where the C library is not glibc.

    By default glibc serves each block above a threshold (at most 32 MiB) with a fresh ``mmap`` and unmaps it
    when freed, and trims freed memory off the top of the heap. A training step at CamVid's size allocates
    and frees activations of 40 MiB and more, so every step faulted in and zero-filled them anew: 4.69 against
    5.47 images/s on a 2-core Xeon (benchmarks/train_speed.py, "system_malloc" against "now"). After
    this call, blocks come from the heap (``M_MMAP_MAX`` 0), up to ``keep_bytes`` of free memory stays at its
    top (``M_TRIM_THRESHOLD``), and it grows ``top_pad_bytes`` at a time (``M_TOP_PAD``). The cost: the
    process keeps its peak memory until it exits. So it belongs to a program's entry point that runs one big
    job (``fcnseg train`` calls it unless ``--malloc system``), not to a library call.
    """
    global _reusing
    libc = _glibc()
    if libc is None:
        return False
    settings = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, keep_bytes), (_M_TOP_PAD, top_pad_bytes))
    _reusing = all(libc.mallopt(param, value) == 1 for param, value in settings)
    return _reusing


def reusing_freed_memory() -> bool:
    """Whether this process called ``reuse_freed_memory`` with success (a timing child process does the same)."""
    return _reusing


def return_freed_memory() -> None:
    """Process-wide opt-in: hand heap pages freed by a conversion (the float32 weights a bfloat16 copy
    replaced) back to the OS with glibc's ``malloc_trim``, which otherwise keeps them; no-op elsewhere."""
    libc = _glibc()
    if libc is not None:  # elsewhere: nothing to do
        libc.malloc_trim(0)


def native_bf16_cpu() -> bool:
    """Whether oneDNN runs bfloat16 on this CPU's own units (AVX512-BF16, AMX, or AVX512 at least);
    elsewhere bfloat16 is converted element by element and is slower than float32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def vnni_cpu() -> bool:
    """Whether this CPU has an int8 dot-product instruction (AVX512-VNNI or AVX-VNNI), whose sums of uint8 x int8
    products do not saturate; without it x86 CPUs use vpmaddubsw, whose 16-bit pair sums can."""
    try:
        return bool(torch.cpu._is_vnni_supported())
    except (AttributeError, RuntimeError):  # an older torch: assume the worst
        return False


def cpu_description() -> str:
    """This machine's processor as a figure should name it: the model name (``/proc/cpuinfo`` on Linux, else
    ``platform.processor()``), PyTorch's CPU capability (AVX2, AVX512, AVX512_BF16, AMX...) and the core count,
    e.g. ``"AMD EPYC 9B14, AVX512, 2 cores"``."""
    name = ""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    name = name or platform.processor() or platform.machine() or "unknown CPU"
    return f"{name}, {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count() or 1} cores"


def bf16_slowness() -> str | None:
    """Why bfloat16 would be slow on this CPU (a sentence for a warning), or None where it is native."""
    if native_bf16_cpu():
        return None
    return (f"this CPU ({torch.backends.cpu.get_cpu_capability()}) has no native bfloat16 support: "
            f"bfloat16 will run slower than float32 here")


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device
