"""Process-wide runtime settings applied once at CLI start-up.

glibc's malloc serves large blocks (above a threshold that adapts up to 32 MiB) with
fresh ``mmap`` calls and returns freed heap to the kernel beyond ``M_TRIM_THRESHOLD``.
CNN training on the CPU allocates and frees the same large activation and gradient
buffers every step, so by default every step pays for page faults that zero those pages
again. :func:`tune_malloc` keeps such blocks on the heap and stops trimming it, so freed
buffers are reused (see ``benchmarks/bench_train.py`` for the measured effect).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt parameters from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4

_TUNED = False


def tune_malloc(trim_threshold: int = 1 << 30) -> bool:
    """Make glibc malloc keep and reuse large freed blocks (no-op elsewhere).

    Sets ``M_MMAP_MAX = 0`` (large blocks come from the heap instead of ``mmap``, so
    freeing them does not unmap the pages) and ``M_TRIM_THRESHOLD = trim_threshold``
    (up to that many free bytes stay at the top of the heap for the next step).
    The cost is resident memory that is not returned to the OS until the process exits.

    Parameters
    ----------
    trim_threshold : int, default=1 GiB
        Free bytes at the top of the heap that glibc keeps instead of returning.

    Returns
    -------
    bool
        True if glibc accepted both settings (Linux); False on macOS/Windows/musl.
    """
    global _TUNED
    if _TUNED:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, int(trim_threshold)))
    _TUNED = ok
    return ok


def passive_openmp(busy_load: float = 1.5) -> bool:
    """Let idle OpenMP threads sleep instead of spinning (``OMP_WAIT_POLICY=PASSIVE``) when the machine is busy.

    Must run before ``torch`` is imported (OpenMP reads it when it loads); a policy the
    user already set (``OMP_WAIT_POLICY``, ``GOMP_SPINCOUNT``) is kept. Which is faster depends on
    the other work on the machine, so the 1-minute load average at start decides:

    - busy (load >= ``busy_load`` x cores): spinning threads of a 2-thread torch process fight the
      other processes. Training mobilenetv2_100 at 64 px on 2 cores measured 14 img/s spinning vs
      38 img/s passive (load average 5), and timed out spinning vs 157 img/s passive at load 9;
    - otherwise OpenMP's default (spin briefly, then sleep) is kept: at 64 px a step is many small
      parallel regions, and waking sleeping threads for each cost 2.5x (220 vs 560 img/s passive vs
      default, load average 1.5-2 on 2 cores).

    Parameters
    ----------
    busy_load : float, default=1.5
        Load average per core from which the machine counts as busy.

    Returns
    -------
    bool
        True if the passive policy was set now; False if torch was already imported (too late to
        take effect), the user chose a policy, or the machine is not busy.
    """
    if "torch" in sys.modules or "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return False
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load < busy_load * cores:
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True
