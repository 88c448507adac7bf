"""Constrained output: `grammar` (GBNF) and `response_format` (any JSON, a JSON schema) to a GBNF
grammar that llama.cpp is known to accept, or ApiError(400) with llama.cpp's reason.

Why a child process: llama.cpp's grammar code answers some inputs with NULL (llama-cpp-python
then adds the NULL to its sampler: SIGSEGV), and others with an abort, an exception thrown
through its C API, a stack overflow on deep nesting, or an endless loop (`x{5,2}` repeats
"x" 2**64 times). llama-cpp-python's JSON-schema converter is Python that can fail or recurse
on odd schemas. So each new grammar is built and run once over the whole vocabulary in a
forked copy of the server, under a time and memory limit; the server itself only ever parses
text that the copy parsed (the same text, the same vocabulary: the same result). Verdicts are
cached, so a client that sends the same schema again does not pay for the fork again.
"""

from __future__ import annotations

import gc
import json
import os
import re
import select
import signal
import threading
import time
import traceback
import warnings
from collections import OrderedDict
from typing import Any

from llamalocal.server.config import GRAMMAR_CHECK_TIMEOUT_S, MAX_GRAMMAR_BYTES
from llamalocal.server.errors import bad_request
from llamalocal.server.requests import GrammarSource

MAX_GBNF_BYTES = 4 * MAX_GRAMMAR_BYTES  # a schema's grammar is a few times the schema
CHILD_MEMORY_BYTES = 1 << 30  # what the checking child may allocate beyond the server's own address space
_CACHE_SIZE = 128


def to_gbnf(source: GrammarSource) -> str:
    """The GBNF text for `source` (may raise anything on a schema the converter cannot take)."""
    from llamalocal.server import compat

    if source.kind == "gbnf":
        return source.text
    if source.kind == "json":
        return compat.JSON_GBNF
    return compat.json_schema_to_gbnf(source.text)


MAX_GROUP_DEPTH = 100  # nested parentheses; llama.cpp's parser recurses per level (a stack overflow at ~10k)


def lint(gbnf: str) -> str | None:
    """What llama.cpp would choke on rather than refuse, said plainly (None: nothing found).
    A scan outside "literals" and [classes]: parentheses nested too deeply, and `{m,n}` with
    n < m (llama.cpp computes n - m unsigned and loops ~2**64 times)."""
    depth = 0
    i, n = 0, len(gbnf)
    while i < n:
        c = gbnf[i]
        if c in "\"[":
            close = '"' if c == '"' else "]"
            i += 1
            while i < n and gbnf[i] != close:
                i += 2 if gbnf[i] == "\\" else 1
        elif c == "#":
            while i < n and gbnf[i] not in "\r\n":
                i += 1
        elif c == "(":
            depth += 1
            if depth > MAX_GROUP_DEPTH:
                return f"its groups are nested more than {MAX_GROUP_DEPTH} deep"
        elif c == ")":
            depth = max(0, depth - 1)
        elif c == "{":
            m = _REPEAT.match(gbnf, i)
            if m and m.group(2) and int(m.group(2)) < int(m.group(1)):
                return f"the repetition {m.group(0)} has its maximum below its minimum"
        i += 1
    return None


_REPEAT = re.compile(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")


def check(model: Any, source: GrammarSource) -> dict[str, Any]:
    """{"ok": True, "gbnf": ...} or {"ok": False, "reason": ...}; may crash on a bad grammar."""
    from llamalocal.convert import native

    try:
        gbnf = to_gbnf(source)
    except RecursionError:
        return {"ok": False, "reason": "the JSON schema is nested too deeply"}
    except Exception as e:  # the converter's own failure, whatever its type: the client's schema is at fault
        return {"ok": False, "reason": f"the JSON schema cannot be turned into a grammar: {type(e).__name__}: {e}"}
    if len(gbnf.encode("utf-8")) > MAX_GBNF_BYTES:
        return {"ok": False, "reason": f"its grammar would be over {MAX_GBNF_BYTES} bytes"}
    problem = lint(gbnf)
    if problem:
        return {"ok": False, "reason": problem}
    allowed = native.grammar_allowed(model, gbnf)
    if allowed is None:
        return {"ok": False, "reason": "llama.cpp refused it"}
    if allowed == 0:
        return {"ok": False, "reason": "it allows no token this model has"}
    return {"ok": True, "gbnf": gbnf}


class GrammarChecker:
    """Checks grammars in child processes and remembers the verdicts."""

    def __init__(self, model: Any, timeout: float = GRAMMAR_CHECK_TIMEOUT_S) -> None:
        self.model = model
        self.timeout = timeout
        self._cache: OrderedDict[tuple[str, str], dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def gbnf(self, source: GrammarSource) -> str:
        """The checked GBNF for `source`, or ApiError(400) saying why not. Blocking: call it in a thread."""
        key = (source.kind, source.text)
        with self._lock:
            verdict = self._cache.get(key)
            if verdict is not None:
                self._cache.move_to_end(key)
        if verdict is None:
            verdict = self._isolated(source) if hasattr(os, "fork") else check(self.model, source)
            with self._lock:
                self._cache[key] = verdict
                while len(self._cache) > _CACHE_SIZE:
                    self._cache.popitem(last=False)
        if not verdict["ok"]:
            what = "grammar" if source.kind == "gbnf" else "response_format"
            raise bad_request(f"the {what} cannot be used: {verdict['reason']}", param=what, code="invalid_grammar")
        return str(verdict["gbnf"])

    def _isolated(self, source: GrammarSource) -> dict[str, Any]:
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # "fork() in a multi-threaded process": see _child
            pid = os.fork()
        if pid == 0:  # pragma: no cover (the child; its verdict is what the tests check)
            os.close(out_r)
            os.close(err_r)
            _child(self.model, source, out_w, err_w)
        os.close(out_w)
        os.close(err_w)
        out, err, timed_out = _read_both(out_r, err_r, self.timeout)
        if timed_out:
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        try:
            verdict = json.loads(out)
            if isinstance(verdict, dict) and "ok" in verdict:
                if not verdict["ok"]:
                    detail = _llama_reason(err)
                    verdict["reason"] += f" ({detail})" if detail else ""
                return verdict
        except ValueError:
            pass
        if timed_out:
            return {"ok": False, "reason": f"checking it took longer than {self.timeout:g} s"}
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            return {"ok": False, "reason": f"llama.cpp crashed on it ({signal.Signals(sig).name})"
                                           + (f": {_llama_reason(err)}" if _llama_reason(err) else "")}
        detail = _llama_reason(err)
        return {"ok": False, "reason": "llama.cpp could not build it within the memory allowed for checking"
                                       + (f" ({detail})" if detail else "")}


def _child(model: Any, source: GrammarSource, out_w: int, err_w: int) -> None:  # pragma: no cover
    """In the forked copy: only this thread exists, so touch nothing another thread may have
    been holding (Python logging, llama-cpp-python's log callback, stdio buffers)."""
    code = 1
    try:
        gc.disable()  # no finalizers of the parent's objects in here
        os.dup2(err_w, 2)
        if out_w != 3:
            os.dup2(out_w, 3)
            out_w = 3
        os.closerange(4, _max_fd())  # client sockets and the listening one: not this copy's to hold
        _limit_memory()
        from llamalocal.convert import native

        native.quiet_llama_log()  # llama.cpp's messages straight to fd 2, our pipe
        verdict = check(model, source)
        data = json.dumps(verdict).encode("utf-8")
        view = memoryview(data)
        while view:
            view = view[os.write(out_w, view):]
        code = 0
    except BaseException:
        os.write(2, traceback.format_exc().encode("utf-8", "replace"))
    finally:
        os._exit(code)


def _max_fd() -> int:  # pragma: no cover (runs in the child)
    try:
        return int(os.sysconf("SC_OPEN_MAX"))
    except (ValueError, OSError):
        return 4096


def _limit_memory() -> None:  # pragma: no cover (runs in the child)
    try:
        import resource

        with open("/proc/self/status") as f:
            vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
        limit = vm + CHILD_MEMORY_BYTES
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ImportError, OSError, ValueError, StopIteration):
        pass  # not Linux: the time limit still holds


def _read_both(out_fd: int, err_fd: int, timeout: float) -> tuple[bytes, bytes, bool]:
    """Everything from both pipes until the child closes them, or (…, True) at the deadline."""
    bufs = {out_fd: bytearray(), err_fd: bytearray()}
    open_fds = [out_fd, err_fd]
    deadline = time.monotonic() + timeout
    try:
        while open_fds:
            left = deadline - time.monotonic()
            if left <= 0:
                return bytes(bufs[out_fd]), bytes(bufs[err_fd]), True
            ready, _, _ = select.select(open_fds, [], [], left)
            for fd in ready:
                chunk = os.read(fd, 65536)
                if chunk:
                    if len(bufs[fd]) < 4 * MAX_GBNF_BYTES:
                        bufs[fd] += chunk
                else:
                    open_fds.remove(fd)
        return bytes(bufs[out_fd]), bytes(bufs[err_fd]), False
    finally:
        os.close(out_fd)
        os.close(err_fd)


def _llama_reason(err: bytes) -> str:
    """llama.cpp's own words from its log (the first line that says what went wrong)."""
    for line in err.decode("utf-8", "replace").splitlines():
        low = line.lower()
        if "error" in low or "unsupported" in low or "does not contain" in low or "what()" in low:
            text = line.split(": ", 1)[1] if ": " in line and line.index(": ") < 40 else line
            text = text.strip()
            return text[:200] + ("..." if len(text) > 200 else "")
    return ""
