"""Process-wide runtime settings, checked in fresh interpreters where they can still take effect."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _python(script: str, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=ROOT,
        env={**clean, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip()


CLI_START = """
    import os, sys
    import toolkit.runtime
    toolkit.runtime.busy_cores = lambda: {load}  # the machine's load at start decides the policy
    sys.argv = ["toolkit", "--version"]
    from toolkit.cli import main
    try:
        main()
    except SystemExit:
        pass
    # OpenMP reads the policy once, when torch loads: the CLI must set it before anything imports torch.
    print("torch" in sys.modules, os.environ.get("OMP_WAIT_POLICY"))
"""


def test_cli_start_sets_passive_openmp_before_torch_loads_on_a_busy_machine() -> None:
    busy = 2.0 * (os.cpu_count() or 1)
    assert _python(CLI_START.format(load=busy)).splitlines()[-1] == "False PASSIVE"


def test_cli_start_keeps_openmps_default_on_an_idle_machine() -> None:
    assert _python(CLI_START.format(load=0.0)).splitlines()[-1] == "False None"


def test_cli_start_keeps_the_users_openmp_policy() -> None:
    busy = 2.0 * (os.cpu_count() or 1)
    assert _python(CLI_START.format(load=busy), OMP_WAIT_POLICY="ACTIVE").splitlines()[-1] == "False ACTIVE"


def test_busy_cores_sees_this_process_keep_a_core_busy() -> None:
    script = """
        import threading, time
        from toolkit.runtime import busy_cores

        stop = time.perf_counter() + 1.0
        spinner = threading.Thread(target=lambda: [None for _ in iter(lambda: time.perf_counter() > stop, True)])
        spinner.start()
        print(busy_cores(0.5))
        spinner.join()
    """
    assert 0.6 < float(_python(script)) <= (os.cpu_count() or 1) + 0.1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc (Linux) only")
@pytest.mark.parametrize("tuned", [False, True])
def test_tune_malloc_keeps_freed_large_buffers_resident(tuned: bool) -> None:
    """What training relies on: a freed 64 MiB buffer stays mapped for the next step instead of going back."""
    script = f"""
        import numpy as np
        from toolkit.runtime import tune_malloc

        def resident_mib():
            return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

        if {tuned}:
            assert tune_malloc()
        buffer = np.ones(64 << 20, np.uint8)  # touched, so its pages are resident
        held = resident_mib()
        del buffer
        print(held - resident_mib())
    """
    released = float(_python(script))
    if tuned:
        assert released < 8, f"{released:.0f} MiB returned to the OS after free despite tune_malloc()"
    else:  # glibc's default: a block this large is mmap'ed and unmapped on free
        assert released > 56, f"only {released:.0f} MiB returned without tuning; the check above proves nothing"
