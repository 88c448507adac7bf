"""Layers across machines through llama.cpp's RPC backend (ggml-rpc): keyed, probed and watched.

ggml-rpc is the engine: a server that serves one device over TCP to one client at a time, and a
client whose devices llama.cpp places layers on like local GPUs. It has no authentication, a
history of memory-safety bugs, and its client aborts the process on any failure on the wire.
llamalocal adds, around it and without changing a byte of its protocol:

- A handshake before a single byte reaches ggml. Client and worker each send a fresh 32-byte
  nonce and prove they hold the pre-shared key with HMAC-SHA256 over both nonces (mutual: a
  client does not send a model's weights to an impostor either). Without a key the same
  handshake runs unkeyed, which a worker allows on loopback only. The worker's answer carries
  its device and free memory (capped by --mem): that is how `plan --rpc` sees a worker without
  touching ggml. After the handshake the bytes are ggml's own (its HELLO/version exchange
  first), passed through untouched: authenticated at the start, not encrypted.
- Relays. A worker's ggml server listens on a loopback port behind `_WorkerRelay`, which admits
  only connections that pass the handshake; the client gives ggml the loopback port of a
  `_ClientRelay`, which does the handshake with the worker and then copies bytes both ways.
- A watch. The client's relay is the first to see a worker go (end of stream, reset, keepalive
  timeout). It keeps ggml's end open (ggml would abort on the error) and reports the loss: by
  default one line on stderr and exit status 1 at once; `serve` answers 503 instead. ggml's
  abort handler is replaced as well, so any other RPC failure also ends in one line.

Wire format of the handshake (after TCP connect; W = worker, C = client):
    C->W  MAGIC (8) | client nonce (32)
    W->C  MAGIC (8) | flags (1: bit 0 = keyed) | worker nonce (32) | HMAC(key, MAGIC "worker" cn wn) (32)
    C->W  HMAC(key, MAGIC "client" cn wn) (32) | purpose (1: "P" probe, "C" connect)
    W->C  status (1: 0 ok, 1 refused) | length (4, little-endian) | JSON (worker info, or {"error"})
then, for "C", ggml's protocol. The key is b"" when unkeyed.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import secrets
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamalocal.errors import BadInputError, LlamalocalError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 50052               # llama.cpp's rpc-server default
MAGIC = b"LLRPC/1\n"
NONCE_BYTES = 32
MIN_KEY_BYTES = 16
HANDSHAKE_TIMEOUT_S = 10.0         # a worker drops a connection that has not finished the handshake by then
CONNECT_TIMEOUT_S = 5.0
KEY_ENV = "LLAMALOCAL_RPC_KEY_FILE"
_RAW_HELLO = 14                    # ggml's RPC_CMD_HELLO: the first byte a plain llama.cpp client sends
_PROBE, _CONNECT = b"P", b"C"
_OK, _REFUSED = 0, 1
_COPY_CHUNK = 1 << 20

# how fast a client notices a worker that vanished without closing its connection (power off,
# cable out): keepalive probes after 5 s idle, every 2 s, 3 missed; unacknowledged data for 10 s
_KEEPALIVE = {"TCP_KEEPIDLE": 5, "TCP_KEEPINTVL": 2, "TCP_KEEPCNT": 3}
_USER_TIMEOUT_MS = 10_000


class RPCError(LlamalocalError):
    """A worker that cannot be reached, answers wrongly, or was lost (exit code 1)."""


class RPCAuthError(BadInputError):
    """The handshake failed on the key: missing on one side, or different (exit code 2)."""


# ---------------------------------------------------------------------------------------------
# endpoints and keys
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_endpoint(text: str) -> Endpoint:
    """'HOST:PORT', '[v6]:PORT' or a bare 'HOST' (port 50052)."""
    t = text.strip()
    host, port = t, str(DEFAULT_PORT)
    if t.startswith("["):
        host, _, rest = t[1:].partition("]")
        if rest:
            port = rest.removeprefix(":")
    elif t.count(":") == 1:
        host, port = t.split(":")
    elif ":" in t and not _is_ipv6(t):
        host = ""
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise BadInputError(f"--rpc: {text!r} is not HOST:PORT (e.g. 192.168.1.20:{DEFAULT_PORT})")
    return Endpoint(host, int(port))


def _is_ipv6(text: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(text).version == 6
    except ValueError:
        return False


def parse_endpoints(text: str) -> list[Endpoint]:
    """'HOST:PORT[,HOST:PORT...]'. A worker serves one client connection, so none twice."""
    eps = [parse_endpoint(part) for part in text.split(",") if part.strip()]
    if not eps:
        raise BadInputError("--rpc needs at least one HOST:PORT")
    seen = set()
    for ep in eps:
        if ep in seen:
            raise BadInputError(f"--rpc lists {ep} twice; a worker serves one device to one client")
        seen.add(ep)
    return eps


def read_key(path: str | Path) -> bytes:
    """The pre-shared key in a key file: its contents, surrounding whitespace stripped."""
    p = Path(path)
    try:
        key = p.read_bytes().strip()
    except OSError as e:
        raise BadInputError(f"cannot read the key file {p}: {e.strerror or e}") from None
    if len(key) < MIN_KEY_BYTES:
        raise BadInputError(f"the key file {p} holds {len(key)} bytes; use at least {MIN_KEY_BYTES} random ones, "
                            f"e.g. `openssl rand -hex 32 > {p}`, and copy that file to each machine")
    return key


def key_file_warning(path: str | Path) -> str | None:
    """A warning when other users can read the key file (POSIX permissions)."""
    try:
        mode = Path(path).stat().st_mode
    except OSError:
        return None
    if os.name == "posix" and mode & 0o077:
        return f"the key file {path} can be read by other users of this machine; chmod 600 {path}"
    return None


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------------
# the handshake
# ---------------------------------------------------------------------------------------------

def _proof(key: bytes, role: bytes, client_nonce: bytes, worker_nonce: bytes) -> bytes:
    return hmac.new(key, MAGIC + role + client_nonce + worker_nonce, hashlib.sha256).digest()


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        part = sock.recv(n - len(buf))
        if not part:
            raise ConnectionError("connection closed")
        buf += part
    return bytes(buf)


def _tune(sock: socket.socket, *, keepalive: bool = False) -> None:
    """No Nagle delay (ggml's own sockets have none either: each message waits for an answer);
    on the client's side of a worker connection, keepalive so a vanished worker is noticed."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if keepalive:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in _KEEPALIVE.items():
            if hasattr(socket, name):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
        if hasattr(socket, "TCP_USER_TIMEOUT"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, _USER_TIMEOUT_MS)


def _send_reply(sock: socket.socket, status: int, info: dict[str, Any]) -> None:
    body = json.dumps(info).encode()
    sock.sendall(bytes([status]) + struct.pack("<I", len(body)) + body)


def client_handshake(sock: socket.socket, key: bytes | None, purpose: bytes, endpoint: Endpoint) -> dict[str, Any]:
    """Authenticate to the worker on `sock` (and it to us); its info on success.

    Raises:
        RPCAuthError: a key missing on one side, or different keys.
        RPCError: not a llamalocal worker, or it hung up.
    """
    cn = secrets.token_bytes(NONCE_BYTES)
    try:
        sock.sendall(MAGIC + cn)
        head = _recv_exact(sock, len(MAGIC) + 1 + 2 * NONCE_BYTES)
    except (ConnectionError, OSError) as e:
        raise RPCError(f"RPC worker {endpoint} hung up during the handshake ({_what(e)}): is it a `llamalocal "
                       "worker`? (a plain llama.cpp rpc-server has no handshake)") from None
    if head[: len(MAGIC)] != MAGIC:
        raise RPCError(f"{endpoint} is not a llamalocal worker (it answered {head[:8]!r})")
    keyed = bool(head[len(MAGIC)] & 1)
    wn = head[len(MAGIC) + 1: len(MAGIC) + 1 + NONCE_BYTES]
    worker_proof = head[len(MAGIC) + 1 + NONCE_BYTES:]
    if key is not None and not keyed:
        raise RPCAuthError(f"RPC worker {endpoint} runs without a key but this machine has one (--rpc-key-file or "
                           f"${KEY_ENV}): refusing to send weights to an unauthenticated worker; start it with "
                           "--key-file")
    k = key or b""
    # answered even when the worker's proof is wrong, so the worker can log why it drops us
    with contextlib.suppress(OSError):
        sock.sendall(_proof(k, b"client", cn, wn) + purpose)
    if keyed and key is None:
        raise RPCAuthError(f"RPC worker {endpoint} requires a key: pass --rpc-key-file FILE (or set ${KEY_ENV}) "
                           "with the same key file the worker was started with")
    if not hmac.compare_digest(worker_proof, _proof(k, b"worker", cn, wn)):
        raise RPCAuthError(f"RPC worker {endpoint} does not hold this machine's key: the key files differ "
                           "(compare --rpc-key-file here with the worker's --key-file)")
    try:
        status = _recv_exact(sock, 1)[0]
        (n,) = struct.unpack("<I", _recv_exact(sock, 4))
        info = json.loads(_recv_exact(sock, n))
    except (ConnectionError, OSError, ValueError) as e:
        raise RPCError(f"RPC worker {endpoint} hung up during the handshake ({_what(e)})") from None
    if status != _OK:
        raise RPCAuthError(f"RPC worker {endpoint} refused this machine: {info.get('error', 'no reason given')}")
    return info


def _what(e: BaseException) -> str:
    if isinstance(e, socket.timeout | TimeoutError):
        return "timed out"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror.lower()
    return str(e) or type(e).__name__


# ---------------------------------------------------------------------------------------------
# copying bytes both ways
# ---------------------------------------------------------------------------------------------

class _Link:
    """Bytes both ways between `a` and `b`, one thread per direction, until either side ends.

    `on_b_lost(what)`: `b` ended first (it closed, reset, timed out). The link then leaves `a`
    open and only reports: on the client, `a` is ggml's connection, and ggml aborts the process
    on an error it sees. Without `on_b_lost`, or when `a` ends first, both are closed."""

    def __init__(self, a: socket.socket, b: socket.socket, *, on_b_lost: Callable[[str], None] | None = None,
                 on_end: Callable[[str], None] | None = None) -> None:
        self.a, self.b = a, b
        self.on_b_lost = on_b_lost
        self.on_end = on_end
        self._lock = threading.Lock()
        self._done = False
        self.sent = {id(a): 0, id(b): 0}  # bytes read from each side and passed on
        self.started = time.monotonic()

    def start(self) -> None:
        for src, dst in ((self.a, self.b), (self.b, self.a)):
            threading.Thread(target=self._copy, args=(src, dst), daemon=True, name="llamalocal-rpc-link").start()

    def _copy(self, src: socket.socket, dst: socket.socket) -> None:
        buf = bytearray(_COPY_CHUNK)
        view = memoryview(buf)
        while True:
            try:
                n = src.recv_into(buf)
            except OSError as e:
                return self._ended(src, _what(e))
            if n == 0:
                return self._ended(src, "closed the connection")
            try:
                dst.sendall(view[:n])
            except OSError as e:
                return self._ended(dst, _what(e))
            self.sent[id(src)] += n

    def _ended(self, side: socket.socket, what: str) -> None:
        with self._lock:
            if self._done:
                return
            self._done = True
        if side is self.b and self.on_b_lost is not None:
            self.on_b_lost(what)
            return
        for s in (self.a, self.b):
            # shutdown first: close() alone neither wakes the other direction's blocked recv nor
            # sends the FIN while that recv still holds the socket
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()
        if self.on_end is not None:
            self.on_end(what)


# ---------------------------------------------------------------------------------------------
# the worker
# ---------------------------------------------------------------------------------------------

@dataclass
class WorkerConfig:
    """What `llamalocal worker` was asked for."""

    host: str = DEFAULT_HOST        # loopback: nothing off this machine can connect
    port: int = DEFAULT_PORT        # 0 picks a free one (printed)
    threads: int | None = None      # default: the physical cores
    mem: int | None = None          # advertise at most this much memory
    cache: Path | None = None       # ggml keeps received weights here, so a reload does not resend them
    device: str = "CPU"             # ggml's device name
    key: bytes | None = None        # required for a non-loopback host
    direct: bool = False            # ggml's server on host:port itself: no relay, no key (for measurements)


def _peer(addr: Any) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _WorkerRelay:
    """The worker's front door: the handshake for every connection, then ggml's loopback port."""

    def __init__(self, listener: socket.socket, ggml_port: int, key: bytes | None,
                 info: Callable[[], dict[str, Any]], log: Callable[[str], None]) -> None:
        self.listener = listener
        self.ggml_port = ggml_port
        self.key = key
        self.info = info
        self.log = log
        self.sessions: dict[str, float] = {}  # peer -> start time, of connections handed to ggml
        self._lock = threading.Lock()

    def start(self) -> None:
        threading.Thread(target=self._accept, daemon=True, name="llamalocal-worker-accept").start()

    def _accept(self) -> None:
        while True:
            try:
                conn, addr = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn, _peer(addr)), daemon=True,
                             name="llamalocal-worker-conn").start()

    def _drop(self, conn: socket.socket, peer: str, why: str) -> None:
        self.log(f"{peer}: dropped: {why}")
        with contextlib.suppress(OSError):
            conn.close()

    def _handle(self, conn: socket.socket, peer: str) -> None:
        try:
            _tune(conn)
            conn.settimeout(HANDSHAKE_TIMEOUT_S)
            first = _recv_exact(conn, 1)
            if first[0] == _RAW_HELLO:
                if self.key is not None:
                    return self._drop(conn, peer, "a plain ggml RPC client without the handshake; this worker "
                                                  "needs the key (clients: llamalocal ... --rpc-key-file)")
                self.log(f"{peer}: plain llama.cpp RPC client (no key)")
                return self._serve(conn, peer, first)
            if first != MAGIC[:1]:
                return self._drop(conn, peer, f"not a llamalocal client (first byte 0x{first[0]:02x})")
            rest = _recv_exact(conn, len(MAGIC) - 1 + NONCE_BYTES)
            if first + rest[: len(MAGIC) - 1] != MAGIC:
                return self._drop(conn, peer, "not a llamalocal client (bad greeting)")
            cn = rest[len(MAGIC) - 1:]
            wn = secrets.token_bytes(NONCE_BYTES)
            k = self.key or b""
            conn.sendall(MAGIC + bytes([1 if self.key is not None else 0]) + wn + _proof(k, b"worker", cn, wn))
            answer = _recv_exact(conn, NONCE_BYTES + 1)
            if not hmac.compare_digest(answer[:NONCE_BYTES], _proof(k, b"client", cn, wn)):
                why = "wrong key (or none)" if self.key is not None else "bad handshake"
                _send_reply(conn, _REFUSED, {"error": why})
                return self._drop(conn, peer, why)
            purpose = answer[NONCE_BYTES:]
            if purpose == _PROBE:
                _send_reply(conn, _OK, self.info())
                conn.close()
                self.log(f"{peer}: asked for this worker's device and memory")
                return
            if purpose != _CONNECT:
                return self._drop(conn, peer, f"unknown request {purpose!r}")
            info = self.info()
            _send_reply(conn, _OK, info)
            self.log(f"{peer}: authenticated{' (no key)' if self.key is None else ''}, serving")
            self._serve(conn, peer, b"")
        except (ConnectionError, OSError) as e:
            self._drop(conn, peer, f"handshake not completed ({_what(e)})")

    def _serve(self, conn: socket.socket, peer: str, head: bytes) -> None:
        """Hand the connection to ggml. ggml serves one client at a time: a second one waits.
        The session's end is logged with the bytes each way (with --cache, a second load of the
        same model receives far fewer)."""
        try:
            up = socket.create_connection(("127.0.0.1", self.ggml_port), timeout=CONNECT_TIMEOUT_S)
        except OSError as e:
            return self._drop(conn, peer, f"ggml's RPC server did not accept the connection ({_what(e)})")
        _tune(up)
        up.settimeout(None)
        conn.settimeout(None)
        if head:
            up.sendall(head)
        with self._lock:
            self.sessions[peer] = time.time()

        def ended(what: str) -> None:
            with self._lock:
                self.sessions.pop(peer, None)
            mib_in, mib_out = link.sent[id(conn)] / 2**20, link.sent[id(up)] / 2**20
            self.log(f"{peer}: session ended ({what}; {mib_in:.2f} MiB received, {mib_out:.2f} MiB sent, "
                     f"{time.monotonic() - link.started:.1f} s)")

        link = _Link(conn, up, on_end=ended)
        link.start()

    def busy_with(self) -> str | None:
        with self._lock:
            return next(iter(self.sessions), None)


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bind_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port now, so a taken port fails before anything else starts; the
    caller listens on it (the worker's relay here, uvicorn for `serve`).

    Made with IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on accepted sockets whose proto
    says TCP (and the server's compat.ConnectionGuard sets it again on each connection, to be sure)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise BadInputError(f"cannot listen on {host}:{port} ({e.strerror or e}); "
                            "pick another --port (0 picks a free one) or --host") from None
    return sock


def _quiet_stdout() -> None:
    """ggml's server prints its banner and every connection with printf; its port there is the
    internal loopback one, which would only mislead. Send the C-level stdout to /dev/null and
    keep Python's sys.stdout on the real one."""
    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
    sys.stdout = open(saved, "w", buffering=1, closefd=True)  # noqa: SIM115  (the process's stdout from now on)


def _start_ggml_server(port: int, dev: int, threads: int, cache: str | None) -> threading.Thread | None:
    """ggml's RPC server on 127.0.0.1:port, on a thread of its own; None if it did not start."""
    from llamalocal.convert import native

    server = threading.Thread(target=native.rpc_start_server, args=(f"127.0.0.1:{port}", dev, threads, cache),
                              daemon=True, name="ggml-rpc-server")
    server.start()
    deadline = time.monotonic() + 10
    while server.is_alive():  # ready once its port accepts (ggml serves that as a client that leaves at once)
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server
        except OSError:
            if time.monotonic() > deadline:
                raise LlamalocalError("ggml's RPC server did not start within 10 s") from None
            time.sleep(0.05)
    return None  # its accept loop returned: it could not bind the port


def run_worker(cfg: WorkerConfig, *, out: Callable[[str], None], log: Callable[[str], None]) -> int:
    """Serve this machine's device to llamalocal clients until SIGINT or SIGTERM.

    Args:
        cfg: the worker's settings.
        out: receives the endpoint line (stdout: data); log: everything else (stderr).

    Returns:
        The exit status: 130 after SIGINT, 0 after SIGTERM.

    Raises:
        BadInputError: a non-loopback host without a key, an unknown device, a port in use.
        LlamalocalError: this build has no RPC backend; ggml's server did not start.
    """
    import psutil

    from llamalocal import __version__
    from llamalocal.convert import native

    if not is_loopback(cfg.host) and cfg.key is None:
        raise BadInputError(f"refusing to serve on {cfg.host} without --key-file: ggml's RPC server has no "
                            "authentication, so anyone who can reach the port could use this machine (and its "
                            "memory-safety bugs); give --key-file FILE (clients: --rpc-key-file), or keep --host "
                            f"{DEFAULT_HOST}")
    if cfg.direct and (cfg.key is not None or not is_loopback(cfg.host) or cfg.mem is not None):
        raise BadInputError("--direct serves ggml's server as it is: loopback only, no --key-file, no --mem")
    if not native.rpc_available():
        raise LlamalocalError("this llama-cpp-python build has no RPC backend (compiled without -DGGML_RPC=on); "
                              "`llamalocal doctor` prints the reinstall command")
    dev = native.device_by_name(cfg.device)
    if dev is None:
        names = ", ".join(d["name"] for d in native.backend_devices() if d["type"] != native.DEV_META)
        raise BadInputError(f"no device {cfg.device!r} in this build; choose one of: {names}")
    desc = next(d for d in native.backend_devices() if d["name"] == cfg.device)
    threads = cfg.threads or psutil.cpu_count(logical=False) or os.cpu_count() or 1
    cache = None
    if cfg.cache is not None:
        try:
            cfg.cache.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise BadInputError(f"--cache {cfg.cache}: {e.strerror or e}") from None
        cache = str(cfg.cache.resolve())

    listener = None if cfg.direct else bind_socket(cfg.host, cfg.port)
    if listener is not None:
        listener.listen(16)
    if cfg.direct:  # ggml binds IPv4 addresses only; loopback is all --direct allows anyway
        ggml_port = cfg.port or _free_loopback_port()
        endpoint = f"127.0.0.1:{ggml_port}"
    else:
        assert listener is not None
        ggml_port = _free_loopback_port()
        endpoint = str(Endpoint(cfg.host, int(listener.getsockname()[1])))

    def memory() -> tuple[int, int]:
        if desc["type"] == native.DEV_CPU:
            vm = psutil.virtual_memory()  # ggml reports a CPU's total memory as free too
            free, total = int(vm.available), int(vm.total)
        else:
            free, total = native.device_memory(dev)
        if cfg.mem is not None:
            free, total = min(free, cfg.mem), min(total, cfg.mem)
        return free, total

    relay: _WorkerRelay | None = None

    def info() -> dict[str, Any]:
        free, total = memory()
        busy = relay.busy_with() if relay is not None else None
        unified = desc["type"] == native.DEV_IGPU or desc["backend"].lower() in ("metal", "mtl")
        kind = "cpu" if desc["type"] == native.DEV_CPU else ("unified" if unified else "gpu")
        return {"llamalocal": __version__, "llama_cpp_python": native.installed_version(),
                "device": {"name": desc["name"], "description": desc["description"], "kind": kind,
                           "free_bytes": free, "total_bytes": total},
                "mem_cap": cfg.mem, "busy": busy is not None, "busy_with": busy, "cache": cache is not None,
                "threads": threads}

    _quiet_stdout()
    server = None
    for _ in range(3):  # the free port picked for ggml may be taken before ggml binds it: pick again
        server = _start_ggml_server(ggml_port, dev, threads, cache)
        if server is not None or cfg.direct:
            break
        ggml_port = _free_loopback_port()
    if server is None:
        raise LlamalocalError(f"ggml's RPC server did not start on 127.0.0.1:{ggml_port} (port taken?)")
    if listener is not None:
        relay = _WorkerRelay(listener, ggml_port, cfg.key, info, log)
        relay.start()

    stop: list[int] = []
    stopped = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.append(signum)
        stopped.set()

    for sig in (signal.SIGINT, signal.SIGTERM):  # before the endpoint is out: a client may stop us at once
        signal.signal(sig, on_signal)
    free, total = memory()
    out(f"listening on {endpoint}")
    log(f"serving {desc['name']} ({desc['description']}), {threads} threads: {free / 2**30:.2f} GiB free of "
        f"{total / 2**30:.2f} GiB{' (capped by --mem)' if cfg.mem is not None else ''}"
        f"{f'; weights cached in {cache}' if cache else ''}")
    if cfg.direct:
        log("direct: ggml's own server on this port, no handshake and no key (for measurements only)")
    elif cfg.key is not None:
        log("clients must prove they hold the key (HMAC-SHA256 challenge) before anything reaches ggml; "
            "traffic is authenticated, not encrypted")
    else:
        log("no key: loopback only (anything on this machine can connect); Ctrl-C stops")

    while not stopped.wait(0.5):
        if not server.is_alive():
            raise LlamalocalError("ggml's RPC server stopped")
    log("worker stopped")
    return 130 if stop and stop[0] == signal.SIGINT else 0


# ---------------------------------------------------------------------------------------------
# the client
# ---------------------------------------------------------------------------------------------

@dataclass
class RpcConfig:
    """Workers for a client (--rpc, --rpc-key-file, --tensor-split)."""

    endpoints: list[Endpoint] = field(default_factory=list)
    key: bytes | None = None
    tensor_split: list[float] | None = None
    # a worker's own ggml port, as `llamalocal worker --direct` serves it: no relay, no handshake,
    # no watch (a lost worker is ggml's abort, caught by the handler). For measuring the relay.
    direct: bool = False
    # (endpoint, what happened) when a worker is lost; None: one line on stderr, exit status 1
    on_lost: Callable[[str, str], None] | None = None


@dataclass
class WorkerInfo:
    endpoint: Endpoint
    name: str
    description: str
    kind: str
    free_bytes: int
    total_bytes: int
    mem_cap: int | None = None
    busy_with: str | None = None

    def device(self) -> Any:
        from llamalocal.hardware import Device

        cap = f", --mem {self.mem_cap / 2**30:g} GiB" if self.mem_cap else ""
        return Device(name=self.name, kind="rpc", total_bytes=self.total_bytes, free_bytes=self.free_bytes,
                      backend="RPC", description=f"{self.kind} {self.description}{cap}", endpoint=str(self.endpoint))


def probe(endpoint: Endpoint, key: bytes | None, timeout: float = HANDSHAKE_TIMEOUT_S) -> WorkerInfo:
    """Ask a worker for its device and free memory (through the handshake only: ggml is not
    involved, so this answers even while the worker serves another client).

    Raises:
        RPCError: unreachable, not a llamalocal worker, another llama-cpp-python.
        RPCAuthError: the keys do not match.
    """
    from llamalocal.convert import native

    try:
        sock = socket.create_connection((endpoint.host, endpoint.port), timeout=CONNECT_TIMEOUT_S)
    except OSError as e:
        raise RPCError(f"cannot reach RPC worker {endpoint} ({_what(e)}): is `llamalocal worker` running there, "
                       "on that port, and can this machine reach it?") from None
    with sock:
        sock.settimeout(timeout)
        _tune(sock)
        info = client_handshake(sock, key, _PROBE, endpoint)
    theirs, ours = info.get("llama_cpp_python"), native.installed_version()
    if theirs != ours:
        raise RPCError(f"RPC worker {endpoint} runs llama-cpp-python {theirs} but this machine {ours}: ggml's RPC "
                       f"protocol must match; install llama-cpp-python=={ours} there")
    d = info["device"]
    return WorkerInfo(endpoint=endpoint, name=d["name"], description=d["description"], kind=d["kind"],
                      free_bytes=int(d["free_bytes"]), total_bytes=int(d["total_bytes"]), mem_cap=info.get("mem_cap"),
                      busy_with=info.get("busy_with"))


class _ClientRelay:
    """A loopback port for ggml that reaches one worker through the handshake."""

    def __init__(self, endpoint: Endpoint, key: bytes | None, on_lost: Callable[[str, str], None]) -> None:
        self.endpoint = endpoint
        self.key = key
        self.on_lost = on_lost
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True, name="llamalocal-rpc-relay").start()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(down,), daemon=True, name="llamalocal-rpc-relay").start()

    def _serve(self, down: socket.socket) -> None:
        _tune(down)
        ep = str(self.endpoint)
        try:
            up = socket.create_connection((self.endpoint.host, self.endpoint.port), timeout=CONNECT_TIMEOUT_S)
            _tune(up, keepalive=True)
            up.settimeout(HANDSHAKE_TIMEOUT_S)
            client_handshake(up, self.key, _CONNECT, self.endpoint)
            up.settimeout(None)
        except (OSError, LlamalocalError) as e:
            # ggml waits on `down` for an answer; leave it waiting and report instead
            self.on_lost(ep, f"could not be reached again ({e if isinstance(e, LlamalocalError) else _what(e)})")
            return
        _Link(down, up, on_b_lost=lambda what: self.on_lost(ep, f"{what} mid-run (worker stopped, crashed or "
                                                                      "unreachable)")).start()


class RpcSession:
    """This process's workers: probed, relayed, registered with ggml, watched.

    `lost` holds the message once a worker is gone. Create one per load; its relays live as long
    as the process (ggml reconnects through them whenever it opens a connection)."""

    def __init__(self, cfg: RpcConfig, log: Callable[[str], None] | None = None) -> None:
        self.cfg = cfg
        self.log = log or (lambda msg: None)
        self.lost: str | None = None
        self.workers: list[WorkerInfo] = []
        self._relays: dict[str, _ClientRelay] = {}
        # llama-cpp-python points fd 2 at /dev/null while it loads a model: keep our own copy
        self._stderr = os.dup(2)

    # -- finding out what the workers have -------------------------------------------------

    def probe(self, *, refuse_busy: bool = True) -> list[Any]:
        """Each worker's device as a hardware.Device (kind "rpc"), asked in parallel.

        Raises:
            RPCError / RPCAuthError: for the first worker that cannot be used, naming it; with
                `refuse_busy`, a worker serving another client (a load would wait for it).
        """
        if not self.cfg.endpoints:
            return []
        if self.cfg.direct:
            self.workers = [self._probe_direct(ep) for ep in self.cfg.endpoints]
        else:
            with ThreadPoolExecutor(max_workers=len(self.cfg.endpoints)) as pool:
                futures = [pool.submit(probe, ep, self.cfg.key) for ep in self.cfg.endpoints]
                self.workers = [f.result() for f in futures]
        for w in self.workers:
            if w.busy_with:
                msg = (f"RPC worker {w.endpoint} is serving another client ({w.busy_with}); a worker serves one "
                       "client at a time: stop that one, or start another worker")
                if refuse_busy:
                    raise RPCError(msg)
                self.log(f"warning: {msg}")
        return [w.device() for w in self.workers]

    def _probe_direct(self, ep: Endpoint) -> WorkerInfo:
        from llamalocal.convert import native

        self._install_abort_handler()
        dev = native.rpc_add_server(str(ep))[0]
        free, total = native.device_memory(dev)
        return WorkerInfo(endpoint=ep, name="RPC", description="direct ggml RPC server", kind="cpu",
                          free_bytes=free, total_bytes=total)

    # -- handing them to llama.cpp ---------------------------------------------------------

    def ggml_devices(self, names: list[str]) -> Any:
        """A native.DeviceList for a plan's `split.devices` ("rpc:HOST:PORT", local ggml names, "CPU"),
        registering each worker with ggml through a relay of its own."""
        from llamalocal.convert import native

        handles = []
        for name in names:
            if name.startswith("rpc:"):
                ep = name.removeprefix("rpc:")
                target = ep if self.cfg.direct else self._relay(ep).address
                self._install_abort_handler()
                handles.append(native.rpc_add_server(target)[0])  # one device per worker
            elif name == "CPU":
                handles.append(native.cpu_device())
            else:
                dev = native.device_by_name(name)
                if dev is None:
                    raise LlamalocalError(f"ggml has no device {name!r} any more")
                handles.append(dev)
        return native.DeviceList(handles)

    def _relay(self, endpoint: str) -> _ClientRelay:
        if endpoint not in self._relays:
            ep = next(e for e in self.cfg.endpoints if str(e) == endpoint)
            self._relays[endpoint] = _ClientRelay(ep, self.cfg.key, self._lost)
        return self._relays[endpoint]

    # -- when one goes ---------------------------------------------------------------------

    def _lost(self, endpoint: str, what: str) -> None:
        if self.lost is not None:
            return
        self.lost = f"RPC worker {endpoint} {what}"
        if self.cfg.on_lost is not None:
            self.cfg.on_lost(endpoint, what)
            return
        self._exit(f"Error: {self.lost}; the layers it held are gone, stopping")

    def _install_abort_handler(self) -> None:
        from llamalocal.convert import native

        def aborted(message: str) -> None:
            why = self.lost or f"llama.cpp stopped on an RPC failure ({message.strip()})"
            self._exit(f"Error: {why}")

        native.on_ggml_abort(aborted)

    def _exit(self, line: str) -> None:
        """One line on the real stderr, then out at once: no teardown that could touch ggml."""
        try:
            os.write(self._stderr, (line + "\n").encode(errors="replace"))
        finally:
            os._exit(1)
