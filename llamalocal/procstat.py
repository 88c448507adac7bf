"""Peak memory of a child process, measured the way benchmarks and tests need it.

`getrusage`/`wait4` report a child's ru_maxrss including the parent's memory at fork time, which
misleads when the parent is big (pytest with a model loaded). Linux's VmHWM in /proc/PID/status
belongs to the child's own address space after exec, so it is polled instead.
"""

from __future__ import annotations

import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class ChildRun:
    returncode: int
    seconds: float
    peak_rss: int  # bytes
    stderr: str


def _vm_hwm(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def run_measured(cmd: list[str], env: dict | None = None, poll: float = 0.02) -> ChildRun:
    """Run `cmd` to completion; its wall time and peak resident memory (Linux)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    err: list[bytes] = []
    reader = threading.Thread(target=lambda: err.append(proc.stderr.read() if proc.stderr else b""), daemon=True)
    reader.start()
    while proc.poll() is None:
        peak = max(peak, _vm_hwm(proc.pid))
        time.sleep(poll)
    seconds = time.perf_counter() - t0
    reader.join()
    return ChildRun(proc.returncode, seconds, peak, b"".join(err).decode(errors="replace"))
