"""Shared by the tests/test_hostile_*.py modules (and scripts/fuzz_convert.py): a small valid model
folder to plant hostile files in, pickle builders, and `run_convert`, which runs the real CLI in a
child process under resource limits (address space, CPU seconds, file size) and reports its exit
status, its stderr, its peak RSS and its wall time. The peak is the child's own VmHWM, read as it
exits: wait4's ru_maxrss would also count the test process it was forked from.

`assert_refused` is the promise every hostile file is held to: exit code 2, one line `Error: ...`
on stderr, no traceback, nothing left behind, within the time and memory bounds.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from hostile_child import limits

# Peak RSS any refused file may cost. A refusal normally peaks at ~45-60 MiB (the interpreter,
# numpy, gguf, sentencepiece); the converter at work stays near 150 MiB.
MAX_REFUSED_RSS_MIB = 150
CHILD_ADDRESS_SPACE = 3 * 2**30  # RLIMIT_AS: an amplification dies here instead of swapping the machine
CHILD_CPU_S = 60  # RLIMIT_CPU
CHILD_FILE_BYTES = 512 * 2**20  # RLIMIT_FSIZE: no runaway output
MAX_REFUSAL_S = 20.0  # wall time of one refused conversion, on a loaded 2-core machine


# ---------------------------------------------------------------------------------------------
# A small valid model folder
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def base_model(tmp_path_factory) -> Path:
    """models/7B: a tiny LLaMA-1-style checkpoint in Meta's layout (one shard), built once."""
    from llamalocal.convert.params import ModelParams
    from llamalocal.convert.sample import SampleSpec, build_sample

    p = ModelParams(dim=64, n_layers=2, n_heads=2, multiple_of=32, norm_eps=1e-6)
    return build_sample(tmp_path_factory.mktemp("hostile") / "models", "7B",
                        SampleSpec(params=p, vocab_size=400))


@pytest.fixture
def model(base_model, tmp_path) -> Path:
    """A fresh writable copy of base_model (TMP/models/7B) for one test to damage."""
    root = tmp_path / "models"
    shutil.copytree(base_model.parent, root, symlinks=True)
    return root / base_model.name


def leftovers(*folders: Path) -> list[str]:
    """Anything a failed conversion could have left: outputs and partial files."""
    found = []
    for folder in folders:
        for p in folder.rglob("*"):
            if ".gguf" in p.name or p.name.endswith(".partial"):
                found.append(str(p))
    return sorted(found)


# ---------------------------------------------------------------------------------------------
# Running the CLI in a limited child
# ---------------------------------------------------------------------------------------------

@dataclass
class Run:
    code: int | None  # exit code; None if it was killed by a signal or timed out
    signal: int | None
    timed_out: bool
    stdout: str
    stderr: str
    max_rss_mib: float
    seconds: float

    def describe(self) -> str:
        return (f"code={self.code} signal={self.signal} timed_out={self.timed_out} rss={self.max_rss_mib:.0f}MiB "
                f"{self.seconds:.1f}s\nstderr: {self.stderr[-3000:]!r}")


# Two ways to run `llamalocal ARGS` in a child. Both run llamalocal.cli.main, as `python -m llamalocal`
# does, under the same limits, and report the peak RSS into a file as the child exits.
#
# The fork server (the default): one process per test session (per thread) imports the CLI and
# the converter once, then forks a child per run, so a run costs ~50 ms instead of the ~250 ms of
# starting Python and importing numpy, gguf and sentencepiece. Set HOSTILE_SUBPROCESS=1 for a fresh
# `python` per run instead (tests/test_hostile_runner.py checks both agree). A forked child's peak
# RSS reads ~10 MiB lower than a fresh process's (shared-library pages it never touches are not
# mapped into it); the memory bounds leave far more room than that.
_FORK_SERVER = r"""
import faulthandler, json, os, resource, signal, sys, time, traceback
requests, replies = os.fdopen(int(sys.argv[1]), "r"), os.fdopen(int(sys.argv[2]), "w")
sys.path.insert(0, sys.argv[3])
import hostile_child
import llamalocal.cli, llamalocal.convert.convert, llamalocal.convert.tokenizer, sentencepiece  # noqa
from llamalocal.convert import native
native.library("ggml-base")

def child(req):
    for fd, name, flags in ((0, os.devnull, os.O_RDONLY), (1, req["stdout"], os.O_WRONLY | os.O_CREAT),
                            (2, req["stderr"], os.O_WRONLY | os.O_CREAT)):
        os.dup2(os.open(name, flags, 0o644), fd)
    requests.close(); replies.close()
    if req["cwd"]:
        os.chdir(req["cwd"])
    os.environ.clear(); os.environ.update(req["env"])
    hostile_child.limits(*req["limits"], tuple(req["ignore"]))()
    faulthandler.enable()
    sys.argv = ["llamalocal", *req["args"]]
    code = 0
    try:
        llamalocal.cli.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush(); sys.stderr.flush()
    with open(req["hwm"], "w") as f:
        f.write(hostile_child.peak_rss_kib())
    os._exit(code)

for line in requests:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        try:
            child(req)
        finally:
            os._exit(70)
    replies.write(json.dumps({"pid": pid}) + "\n"); replies.flush()
    deadline, timed_out = time.monotonic() + req["timeout"], False
    while True:
        done, status, ru = os.wait4(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            timed_out = True
            done, status, ru = os.wait4(pid, 0)
            break
        time.sleep(0.005)
    replies.write(json.dumps({"status": status, "timed_out": timed_out, "maxrss": ru.ru_maxrss}) + "\n")
    replies.flush()
"""

# `python -m llamalocal ARGS`, reporting the peak RSS into $HOSTILE_HWM as it exits (HOSTILE_SUBPROCESS=1)
_WRAPPER = """
import atexit, os, runpy, sys
def _report():
    try:
        with open("/proc/self/status") as f:
            hwm = next(line for line in f if line.startswith("VmHWM:")).split()[1]
    except (OSError, StopIteration):
        return
    with open(os.environ["HOSTILE_HWM"], "w") as out:
        out.write(hwm)
atexit.register(_report)
sys.argv[0] = "llamalocal"
runpy.run_module("llamalocal", run_name="__main__", alter_sys=True)
"""

_ENV = {"PYTHONUNBUFFERED": "1", "MALLOC_ARENA_MAX": "2", "OPENBLAS_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
_servers = threading.local()


class _ForkServer:
    def __init__(self) -> None:
        to_server, self._requests = os.pipe()
        self._replies_fd, from_server = os.pipe()
        self.proc = subprocess.Popen([sys.executable, "-c", _FORK_SERVER, str(to_server), str(from_server),
                                      str(Path(__file__).parent)], pass_fds=(to_server, from_server),
                                     stdin=subprocess.DEVNULL, env=dict(os.environ, **_ENV))
        os.close(to_server)
        os.close(from_server)
        self._out = os.fdopen(self._requests, "w")
        self._in = os.fdopen(self._replies_fd, "r")

    def start(self, req: dict) -> int:
        self._out.write(json.dumps(req) + "\n")
        self._out.flush()
        reply = self._in.readline()
        if not reply:
            raise RuntimeError(f"the fork server died (exit {self.proc.wait()})")
        return json.loads(reply)["pid"]

    def ready(self) -> bool:
        return bool(select.select([self._in], [], [], 0)[0])

    def wait(self) -> dict:
        return json.loads(self._in.readline())


def _server() -> _ForkServer:
    server = getattr(_servers, "server", None)
    if server is None or server.proc.poll() is not None:
        server = _servers.server = _ForkServer()
    return server


@dataclass
class Child:
    """A running `llamalocal` child: signal it, ask whether it is done, then `finish()` it."""

    pid: int
    out: Path
    t0: float
    timeout: float
    proc: subprocess.Popen | None = None  # HOSTILE_SUBPROCESS=1
    server: _ForkServer | None = None

    def done(self) -> bool:
        return self.proc.poll() is not None if self.proc is not None else self.server.ready()  # type: ignore[union-attr]

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)


def start_cli(args: list, *, env: dict[str, str] | None = None, cwd: Path | None = None,
              address_space: int = CHILD_ADDRESS_SPACE, cpu_s: int = CHILD_CPU_S,
              file_bytes: int = CHILD_FILE_BYTES, ignore: tuple[int, ...] = (), timeout: float = 60.0) -> Child:
    """Start `llamalocal ARGS` under the limits (signals in `ignore` ignored, as nohup does);
    stdout, stderr and the peak RSS go to files in a temp dir."""
    out = Path(tempfile.mkdtemp(prefix="hostile-run-"))
    args = [str(a) for a in args]
    full_env = dict(os.environ, **_ENV, HOSTILE_HWM=str(out / "hwm"), **(env or {}))
    t0 = time.monotonic()
    if os.environ.get("HOSTILE_SUBPROCESS"):
        with open(out / "stdout", "wb") as so, open(out / "stderr", "wb") as se:
            proc = subprocess.Popen([sys.executable, "-c", _WRAPPER, *args], stdout=so, stderr=se,
                                    stdin=subprocess.DEVNULL, env=full_env, cwd=cwd,
                                    preexec_fn=limits(address_space, cpu_s, file_bytes, ignore))
        return Child(proc.pid, out, t0, timeout, proc=proc)
    server = _server()
    pid = server.start({"args": args, "env": full_env, "cwd": str(cwd) if cwd else None, "timeout": timeout,
                        "limits": [address_space, cpu_s, file_bytes], "ignore": list(ignore),
                        "stdout": str(out / "stdout"), "stderr": str(out / "stderr"), "hwm": str(out / "hwm")})
    return Child(pid, out, t0, timeout, server=server)


def finish(child: Child) -> Run:
    """Wait for the child (killed after its timeout) and collect what it did."""
    if child.server is not None:
        reply = child.server.wait()
        status, timed_out, maxrss = reply["status"], reply["timed_out"], reply["maxrss"]
    else:
        assert child.proc is not None
        timed_out = False
        while True:
            pid, status, ru = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > child.t0 + child.timeout:
                child.proc.kill()
                timed_out = True
                pid, status, ru = os.wait4(child.pid, 0)
                break
            time.sleep(0.01)
        child.proc.returncode = os.waitstatus_to_exitcode(status)  # we reaped it: keep Popen consistent
        maxrss = ru.ru_maxrss
    seconds = time.monotonic() - child.t0
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
    sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
    stdout = (child.out / "stdout").read_text(errors="replace")
    stderr = (child.out / "stderr").read_text(errors="replace")
    hwm = child.out / "hwm"
    rss_kib = int(hwm.read_text()) if hwm.is_file() else maxrss  # no report: it died (or no /proc)
    shutil.rmtree(child.out, ignore_errors=True)
    return Run(code, sig, timed_out, stdout, stderr, rss_kib / 1024, seconds)


def run_cli(args: list, *, timeout: float = 60.0, **kw) -> Run:
    return finish(start_cli(args, timeout=timeout, **kw))


def run_convert(model_dir: Path, *extra, verify: bool = False, timeout: float = 60.0, **kw) -> Run:
    """`llamalocal convert MODEL_DIR --q4_0 --quiet [--no-verify] EXTRA...` in a limited child."""
    args = ["convert", model_dir, "--q4_0", "--quiet", *([] if verify else ["--no-verify"]), *extra]
    return run_cli(args, timeout=timeout, **kw)


def assert_refused(r: Run, *needles: str, clean: tuple[Path, ...] = (),
                   max_rss_mib: float = MAX_REFUSED_RSS_MIB, max_seconds: float = MAX_REFUSAL_S) -> str:
    """Exit 2, one `Error:` line naming what is wrong, no traceback, no raw control characters,
    nothing left in `clean`, within the time and memory bounds. Returns the message."""
    assert not r.timed_out, r.describe()
    assert r.signal is None, r.describe()
    assert r.code == 2, r.describe()
    assert "Traceback" not in r.stderr, r.describe()
    lines = r.stderr.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.describe()
    message = lines[0]
    if os.environ.get("HOSTILE_SHOW"):  # HOSTILE_SHOW=1 pytest -s: see every refusal's message
        print(f"\n    {message}  [{r.max_rss_mib:.0f} MiB, {r.seconds:.1f} s]")
    assert all(ch.isprintable() for ch in message), r.describe()
    for needle in needles:
        assert needle in message, r.describe()
    assert r.stdout == "", r.describe()
    assert leftovers(*clean) == [], leftovers(*clean)
    assert r.max_rss_mib <= max_rss_mib, r.describe()
    assert r.seconds <= max_seconds, r.describe()
    return message


# ---------------------------------------------------------------------------------------------
# Pickle builders (protocol 2, as torch writes state dicts)
# ---------------------------------------------------------------------------------------------

PROTO2 = b"\x80\x02"
MARK, STOP, TUPLE, EMPTY_DICT, SETITEMS, SETITEM, REDUCE = b"(", b".", b"t", b"}", b"u", b"s", b"R"
EMPTY_TUPLE, EMPTY_LIST, APPEND, APPENDS, BUILD, NEWFALSE, DUP = b")", b"]", b"a", b"e", b"b", b"\x89", b"2"
TUPLE1, TUPLE2, POP, BINPERSID = b"\x85", b"\x86", b"0", b"Q"


def g(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def s(text: str) -> bytes:
    raw = text.encode("utf-8", "surrogatepass")
    return b"X" + struct.pack("<I", len(raw)) + raw


def i(n: int) -> bytes:
    """An int the way pickle protocol 2 writes it (BININT1/2, BININT or LONG1)."""
    if 0 <= n < 256:
        return b"K" + bytes([n])
    if 0 <= n < 65536:
        return b"M" + struct.pack("<H", n)
    if -2**31 <= n < 2**31:
        return b"J" + struct.pack("<i", n)
    raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def put(n: int) -> bytes:
    return b"r" + struct.pack("<I", n)


def get(n: int) -> bytes:
    return b"j" + struct.pack("<I", n)


def tup(*items: bytes) -> bytes:
    return MARK + b"".join(items) + TUPLE


def storage(key: str = "0", numel: int = 4, cls: str = "FloatStorage") -> bytes:
    """A persistent storage reference ('storage', torch.<cls>, key, 'cpu', numel)."""
    return tup(s("storage"), g("torch", cls), s(key), s("cpu"), i(numel)) + BINPERSID


def tensor(shape: tuple = (4,), *, key: str = "0", numel: int | None = None, offset: int = 0,
           stride: tuple | None = None, cls: str = "FloatStorage", raw_shape: bytes | None = None,
           raw_stride: bytes | None = None) -> bytes:
    """_rebuild_tensor_v2(storage, offset, shape, stride, False, OrderedDict()), as torch writes it."""
    if stride is None:
        contiguous: list[int] = []
        n = 1
        for d in reversed(shape):
            contiguous.insert(0, n)
            n *= d
        stride = tuple(contiguous)
    if numel is None:
        numel = 1
        for d in shape:
            numel *= d
    shape_b = raw_shape if raw_shape is not None else tup(*(i(d) for d in shape))
    stride_b = raw_stride if raw_stride is not None else tup(*(i(d) for d in stride))
    return (g("torch._utils", "_rebuild_tensor_v2")
            + tup(storage(key, numel, cls), i(offset), shape_b, stride_b, NEWFALSE,
                  g("collections", "OrderedDict") + EMPTY_TUPLE + REDUCE)
            + REDUCE)


def state(*items: tuple[bytes, bytes]) -> bytes:
    """{key: value, ...} from already-pickled keys and values, then STOP."""
    return PROTO2 + EMPTY_DICT + MARK + b"".join(k + v for k, v in items) + SETITEMS + STOP


def write_shard(model_dir: Path, pickle_bytes: bytes, storages: dict[str, bytes] | None = None,
                name: str = "consolidated.00.pth") -> Path:
    """Replace MODEL_DIR's shard with a torch zip around `pickle_bytes`."""
    from llamalocal.convert.torch_save import write_raw_checkpoint

    path = model_dir / name
    path.unlink(missing_ok=True)
    write_raw_checkpoint(path, pickle_bytes, storages or {})
    return path


# ---------------------------------------------------------------------------------------------
# Zip surgery: the fields of a record's central-directory entry and local header
# ---------------------------------------------------------------------------------------------

# offsets inside a central directory entry ("PK\1\2") and a local header ("PK\3\4")
CENTRAL = {"extract_version": (6, "<H"), "flag_bits": (8, "<H"), "compress_type": (10, "<H"),
           "crc": (16, "<I"), "compress_size": (20, "<I"), "file_size": (24, "<I"), "header_offset": (42, "<I")}
LOCAL = {"extract_version": (4, "<H"), "flag_bits": (6, "<H"), "compress_type": (8, "<H")}


def central_entries(data: bytes) -> dict[str, int]:
    """Record name -> offset of its central directory entry, for a zip torch_save wrote."""
    eocd = data.rfind(b"PK\x05\x06")
    cd_size, cd_offset = struct.unpack_from("<II", data, eocd + 12)
    entries, at = {}, cd_offset
    while at < cd_offset + cd_size:
        assert data[at:at + 4] == b"PK\x01\x02"
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", data, at + 28)
        entries[data[at + 46:at + 46 + name_len].decode()] = at
        at += 46 + name_len + extra_len + comment_len
    return entries


def patch_record(path: Path, suffix: str, *, local: bool = True, **fields: int) -> None:
    """Set `fields` of the record whose name ends with `suffix`, in its central directory entry and
    (where the field exists there, and `local`) its local header."""
    data = bytearray(path.read_bytes())
    entries = central_entries(bytes(data))
    (name, at), = [(n, a) for n, a in entries.items() if n.endswith(suffix)]
    header = struct.unpack_from("<I", data, at + 42)[0]
    for field, value in fields.items():
        off, fmt = CENTRAL[field]
        struct.pack_into(fmt, data, at + off, value)
        if local and field in LOCAL:
            off, fmt = LOCAL[field]
            struct.pack_into(fmt, data, header + off, value)
    path.write_bytes(bytes(data))


def shift_directory(path: Path, by: int) -> None:
    """Claim the central directory starts `by` bytes later than it does (in the zip64 end record and
    the classic one): zipfile then takes the difference for a prefix glued before the zip and
    subtracts it from every record's offset, which makes the first records' offsets negative."""
    data = bytearray(path.read_bytes())
    eocd = data.rfind(b"PK\x05\x06")
    struct.pack_into("<I", data, eocd + 16, struct.unpack_from("<I", data, eocd + 16)[0] + by)
    z64 = data.rfind(b"PK\x06\x06")
    if z64 >= 0:
        struct.pack_into("<Q", data, z64 + 48, struct.unpack_from("<Q", data, z64 + 48)[0] + by)
    path.write_bytes(bytes(data))
