"""What a `llamalocal` child of the hostile tests applies to itself (no pytest import: the fork
server in tests/hostile.py imports this before it forks)."""

from __future__ import annotations

import resource
import signal


def limits(address_space: int, cpu_s: int, file_bytes: int, ignore: tuple[int, ...] = ()):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 5))
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_bytes, file_bytes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        # the test runner may have started us with these ignored (a background job)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN if sig in ignore else signal.SIG_DFL)
    return apply


def peak_rss_kib() -> str:
    """This process's peak RSS (VmHWM). A forked or exec'd child's ru_maxrss would include the
    process it was forked from; VmHWM is its own."""
    with open("/proc/self/status") as f:
        return next(line for line in f if line.startswith("VmHWM:")).split()[1]
