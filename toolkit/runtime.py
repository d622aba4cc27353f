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
import time

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


def busy_cores(sample_s: float = 0.3) -> float:
    """Cores the machine keeps busy now: CPU time spent outside idle over ``sample_s`` seconds
    (``/proc/stat``), else the 1-minute load average (no ``/proc``: macOS, Windows: 0).

    Not the load average on Linux: it decays over minutes, so a machine whose last job ended a
    minute ago still reads about 1 on 2 cores (and a VM's kernel threads add to it while idle).
    """
    def jiffies() -> tuple[int, int]:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return sum(values) - values[3] - (values[4] if len(values) > 4 else 0), sum(values)  # minus idle, iowait

    try:
        busy0, total0 = jiffies()
        time.sleep(sample_s)
        busy1, total1 = jiffies()
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return (os.cpu_count() or 1) * (busy1 - busy0) / max(total1 - total0, 1)


def passive_openmp(busy_load: float = 0.5) -> bool:
    """Let idle OpenMP threads sleep instead of spinning (``OMP_WAIT_POLICY=PASSIVE``) unless the machine is idle.

    Must run before ``torch`` is imported (OpenMP reads it when it loads); a policy the
    user already set (``OMP_WAIT_POLICY``, ``GOMP_SPINCOUNT``) is kept. Which is faster depends on
    the other work on the machine, so the cores busy at start decide (:func:`busy_cores`):

    - idle (busy cores < ``busy_load`` x cores): OpenMP's default (spin briefly, then sleep) is kept. At
      64 px a step is many small parallel regions, and waking sleeping threads for each of them
      cost 2.5x on 2 cores (mobilenetv2_100: 220 img/s passive vs 560 default).
    - otherwise: spinning threads of a 2-thread torch process fight the other processes for the
      cores. Measured on 2 cores: a demo-sized organ's training epochs took 58 s spinning at load
      average 2.9 and 17 s passive at 3.3; 14 vs 38 img/s at load 5; spinning did not finish at load 9.

    Parameters
    ----------
    busy_load : float, default=0.5
        Busy share of the cores from which the machine counts as busy.

    Returns
    -------
    bool
        True if the passive policy was set now; False if torch was already imported (too late to
        take effect), the user chose a policy, or the machine is idle.
    """
    if "torch" in sys.modules or "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return False
    cores = os.cpu_count() or 1
    if busy_cores() < busy_load * cores:
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True
