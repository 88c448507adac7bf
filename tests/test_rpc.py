"""RPC workers for real: `llamalocal worker` processes on loopback (keyed), clients through their
relays, checked against llama.cpp itself (its greedy output on one machine, its own log of where
it put each layer and how big each device's buffers are) and against the failures it must survive.

Never skipped: CI builds llama-cpp-python with -DGGML_RPC=on (scripts/install.sh), and a build
without it fails `test_build_has_rpc` with the reinstall command.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llamalocal import rpc

PROMPT = "KING HENRY:\nOnce more unto the"


# ---------------------------------------------------------------------------------------------
# helpers: workers and clients as separate processes, as they run for real
# ---------------------------------------------------------------------------------------------

def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("LLAMALOCAL_RPC_KEY_FILE", None)
    return env


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # CI may start us with SIGINT ignored


class Worker:
    """A `llamalocal worker --port 0` child process; `.endpoint` as it printed it."""

    def __init__(self, tmp: Path, *args: str) -> None:
        self.log_path = tmp / f"worker-{secrets.token_hex(4)}.log"
        self.log_file = self.log_path.open("w")
        self.proc = subprocess.Popen([sys.executable, "-m", "llamalocal", "worker", "--port", "0", "--threads", "1",
                                      *args], stdout=subprocess.PIPE, stderr=self.log_file, text=True, env=_env(),
                                     preexec_fn=_default_sigint)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 60)
        line = self.proc.stdout.readline() if ready else ""
        m = re.fullmatch(r"listening on (\S+:\d+)\n", line)
        if not m:
            self.stop()
            raise AssertionError(f"worker did not start: {line!r}\n{self.log()}")
        self.endpoint = m.group(1)
        self.port = int(self.endpoint.rsplit(":", 1)[1])

    def log(self) -> str:
        if not self.log_file.closed:
            self.log_file.flush()
        return self.log_path.read_text()

    def wait_log(self, text: str, timeout: float = 10) -> str:
        deadline = time.monotonic() + timeout
        while text not in self.log():
            assert time.monotonic() < deadline, f"{text!r} not in the worker's log:\n{self.log()}"
            time.sleep(0.05)
        return self.log()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log_file.close()


def llamalocal(*args: str, timeout: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llamalocal", *args], capture_output=True, text=True,
                          timeout=timeout, env=_env() | (env or {}))


@pytest.fixture(scope="module")
def rpc_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("rpc")


@pytest.fixture(scope="module")
def key_file(rpc_dir) -> Path:
    p = rpc_dir / "rpc.key"
    p.write_text(secrets.token_hex(32) + "\n")
    p.chmod(0o600)
    return p


@pytest.fixture(scope="module")
def other_key(rpc_dir) -> Path:
    p = rpc_dir / "other.key"
    p.write_text(secrets.token_hex(32))
    p.chmod(0o600)
    return p


@pytest.fixture(scope="module")
def workers(rpc_dir, key_file):
    """Two keyed workers on loopback, for the module."""
    ws = [Worker(rpc_dir, "--key-file", str(key_file)) for _ in range(2)]
    yield ws
    for w in ws:
        w.stop()


@pytest.fixture(scope="module")
def model(converted) -> Path:
    return converted("tiny-v1", "q4_0")


def rpc_args(ws: list[Worker], key: Path) -> list[str]:
    return ["--rpc", ",".join(w.endpoint for w in ws), "--rpc-key-file", str(key)]


def generate(model: Path, *extra: str, n: int = 48, timeout: float = 120) -> subprocess.CompletedProcess:
    return llamalocal("generate", str(model), "-p", PROMPT, "-n", str(n), "--temp", "0", "--threads", "1",
                      "--ctx", "256", *extra, timeout=timeout)


def refused(port: int, data: bytes) -> bool:
    """Whether the worker closes a connection that sent `data` without answering a byte."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        try:
            return s.recv(100) == b""
        except ConnectionResetError:  # closed with our bytes unread
            return True


def one_line_error(r: subprocess.CompletedProcess) -> str:
    lines = r.stderr.strip().splitlines()
    assert "Traceback" not in r.stderr, r.stderr
    assert lines and lines[-1].startswith("Error: "), r.stderr
    return lines[-1]


# ---------------------------------------------------------------------------------------------
# the build, endpoints, keys
# ---------------------------------------------------------------------------------------------

def test_build_has_rpc():
    from llamalocal.cli.plan_cmd import reinstall_command
    from llamalocal.convert import native

    assert native.rpc_available(), ("this llama-cpp-python has no RPC backend; the RPC tests must run, not "
                                    f"skip: {reinstall_command('')}")
    assert native.library_file("ggml-rpc") is not None


def test_endpoints():
    assert rpc.parse_endpoints("10.0.0.2:50052, host:1,[::1]:7") == [
        rpc.Endpoint("10.0.0.2", 50052), rpc.Endpoint("host", 1), rpc.Endpoint("::1", 7)]
    assert str(rpc.parse_endpoint("[::1]:7")) == "[::1]:7" and rpc.parse_endpoint("box").port == 50052
    for bad in ("", "host:", "host:99999", "a:b:c"):
        with pytest.raises(rpc.BadInputError):
            rpc.parse_endpoints(bad)
    with pytest.raises(rpc.BadInputError, match="twice"):
        rpc.parse_endpoints("h:1,h:1")


def test_key_files(tmp_path):
    short = tmp_path / "short"
    short.write_text("abc\n")
    with pytest.raises(rpc.BadInputError, match="holds 3 bytes"):
        rpc.read_key(short)
    with pytest.raises(rpc.BadInputError, match="cannot read the key file"):
        rpc.read_key(tmp_path / "missing")
    good = tmp_path / "good"
    good.write_text(" " + "k" * 40 + "\n")
    good.chmod(0o644)
    assert rpc.read_key(good) == b"k" * 40
    assert "chmod 600" in (rpc.key_file_warning(good) or "")
    good.chmod(0o600)
    assert rpc.key_file_warning(good) is None


def test_worker_refuses_an_open_port_without_a_key(key_file):
    r = llamalocal("worker", "--host", "0.0.0.0", "--port", "0")
    assert r.returncode == 2 and "without --key-file" in one_line_error(r)
    r = llamalocal("worker", "--device", "NoSuchGPU", "--port", "0", "--key-file", str(key_file))
    assert r.returncode == 2 and "no device 'NoSuchGPU'" in one_line_error(r)
    r = llamalocal("worker", "--help")
    assert r.returncode == 0 and "authenticated, not encrypted" in " ".join(r.stdout.split())


# ---------------------------------------------------------------------------------------------
# the handshake
# ---------------------------------------------------------------------------------------------

def test_probe_and_refusals(workers, key_file, other_key):
    w = workers[0]
    ep = rpc.parse_endpoint(w.endpoint)
    info = rpc.probe(ep, rpc.read_key(key_file))
    assert info.name == "CPU" and info.kind == "cpu" and 0 < info.free_bytes <= info.total_bytes
    with pytest.raises(rpc.RPCAuthError, match="requires a key"):
        rpc.probe(ep, None)
    with pytest.raises(rpc.RPCAuthError, match="key files differ"):
        rpc.probe(ep, rpc.read_key(other_key))
    w.wait_log("dropped: wrong key")

    # a plain ggml client (its HELLO: command 14, 8-byte size, 24 bytes of capabilities) gets nothing
    assert refused(w.port, bytes([14]) + (24).to_bytes(8, "little") + bytes(24))
    w.wait_log("dropped: a plain ggml RPC client")
    assert refused(w.port, b"GET / HTTP/1.1\r\n\r\n")
    w.wait_log("not a llamalocal client")
    # ...and the worker still serves the right client
    assert rpc.probe(ep, rpc.read_key(key_file)).free_bytes > 0
    assert w.proc.poll() is None


def test_mem_caps_what_a_worker_advertises(rpc_dir):
    w = Worker(rpc_dir, "--mem", "1GiB")
    try:
        info = rpc.probe(rpc.parse_endpoint(w.endpoint), None)
        assert info.free_bytes == 2**30 and info.total_bytes <= 2**30 and info.mem_cap == 2**30
    finally:
        w.stop()


def test_client_with_a_key_refuses_an_unkeyed_worker(rpc_dir, key_file, model):
    w = Worker(rpc_dir)
    try:
        r = generate(model, "--rpc", w.endpoint, "--rpc-key-file", str(key_file))
        assert r.returncode == 2 and "runs without a key" in one_line_error(r)
    finally:
        w.stop()


# ---------------------------------------------------------------------------------------------
# a model split over this machine and two workers
# ---------------------------------------------------------------------------------------------

def test_split_generation_is_the_local_generation(workers, key_file, model):
    local = generate(model)
    split = generate(model, *rpc_args(workers, key_file), "--tensor-split", "1,1,1")
    assert local.returncode == 0 and split.returncode == 0, split.stderr
    assert split.stdout == local.stdout and local.stdout.strip()
    assert "layers over 3 devices" in split.stderr
    for w in workers:
        assert "authenticated, serving" in w.log()


def test_plan_json_shows_three_devices_holding_layers(workers, key_file, model):
    r = llamalocal("plan", str(model), *rpc_args(workers, key_file), "--tensor-split", "1,1,1", "--json")
    assert r.returncode == 0, r.stderr
    j = json.loads(r.stdout)
    devs = j["devices"]
    assert j["fits"] == "rpc" and len(devs) == 3 and all(d["n_layers"] >= 1 for d in devs)
    assert [d.get("endpoint") for d in devs] == [None, workers[0].endpoint, workers[1].endpoint]
    assert devs[0]["kind"] == "cpu" and devs[0]["has_output"] and [d["kind"] for d in devs[1:]] == ["rpc", "rpc"]
    # and by budget, without --tensor-split: every device still gets layers (they all have room);
    # the key from $LLAMALOCAL_RPC_KEY_FILE this time
    r = llamalocal("plan", str(model), "--rpc", ",".join(w.endpoint for w in workers),
                   env={"LLAMALOCAL_RPC_KEY_FILE": str(key_file)})
    assert r.returncode == 0 and f"worker {workers[1].endpoint}: layer" in r.stdout, r.stdout + r.stderr


_ASSIGNED = re.compile(r"layer +(\d+) assigned to device (\S+),")
_USING = re.compile(r"using device (RPC\d+) \((\S+)\)")       # RPC devices and the endpoint ggml was given
_BUFFER = re.compile(r"RPC\d+\[(\S+)\] (model|KV) buffer size = +([\d.]+) MiB")  # buffers, by endpoint


def test_llama_cpp_places_layers_and_sizes_buffers_as_planned(workers, key_file, model):
    """llama.cpp's own log of the load is the reference: which device got each layer, and the
    size of each device's weights and KV buffers."""
    code = f"""
import sys
from llamalocal.rpc import RpcConfig, parse_endpoints, read_key
from llamalocal.runner import load_model
cfg = RpcConfig(parse_endpoints({",".join(w.endpoint for w in workers)!r}), read_key({str(key_file)!r}),
                tensor_split=[1, 1, 1])
loaded = load_model({str(model)!r}, n_ctx=256, threads=1, verbose=True, rpc=cfg)
import json
print("PLAN " + json.dumps(loaded.plan.to_json()), file=sys.stderr)
loaded.close()
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=_env())
    assert r.returncode == 0, r.stderr[-3000:]
    plan = json.loads(next(line[5:] for line in r.stderr.splitlines() if line.startswith("PLAN ")))
    # llama.cpp names RPC devices in the order they were registered (RPC0, RPC1: the --rpc order);
    # their buffers are named by the endpoint it was given (the local relays' ports)
    using = _USING.findall(r.stderr)
    assert [name for name, _ in using] == ["RPC0", "RPC1"], r.stderr[-3000:]
    names = {"CPU": 0, "RPC0": 1, "RPC1": 2}
    index_of = {ep: names[name] for name, ep in using}
    where = {int(il): names[dev] for il, dev in _ASSIGNED.findall(r.stderr)}
    n = plan["n_layers"]
    assert len(where) == n + 1, r.stderr[-3000:]
    planned = [i for i, d in enumerate(plan["devices"]) for _ in range(d["n_layers"])]
    assert [where[il] for il in range(n)] == planned
    assert where[n] == 0  # the output layer stays here
    sizes: dict[tuple[int, str], float] = {}
    for ep, kind, mib in _BUFFER.findall(r.stderr):
        sizes[(index_of[ep], kind)] = sizes.get((index_of[ep], kind), 0.0) + float(mib)
    for i in (1, 2):
        d = plan["devices"][i]
        assert sizes[(i, "model")] * 2**20 == pytest.approx(d["weights_bytes"], rel=0.02, abs=64 * 1024)
        assert sizes[(i, "KV")] * 2**20 == pytest.approx(d["kv_bytes"], rel=0.02)


def test_direct_client_through_an_unkeyed_worker(rpc_dir, model):
    """llama.cpp's own RPC client, straight to an unkeyed loopback worker (its relay lets a plain
    ggml client through there), gives the same text as the local run."""
    w = Worker(rpc_dir)
    try:
        code = f"""
from llamalocal.rpc import RpcConfig, parse_endpoints
from llamalocal.runner import load_model, stream_tokens, tokenize_prompt, Sampling
loaded = load_model({str(model)!r}, n_ctx=256, threads=1, rpc=RpcConfig(parse_endpoints({w.endpoint!r}),
                    tensor_split=[1, 1], direct=True))
tokens = tokenize_prompt(loaded.llm, {PROMPT!r})
print("".join(stream_tokens(loaded.llm, tokens, max_tokens=48, sampling=Sampling(temp=0))), end="")
"""
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=_env())
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout == generate(model).stdout
        assert "plain llama.cpp RPC client" in w.log()
    finally:
        w.stop()


# ---------------------------------------------------------------------------------------------
# faults
# ---------------------------------------------------------------------------------------------

def test_a_worker_gone_before_the_run(model):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    start = time.monotonic()
    r = generate(model, "--rpc", f"127.0.0.1:{port}")
    assert r.returncode == 1 and f"cannot reach RPC worker 127.0.0.1:{port}" in one_line_error(r)
    assert time.monotonic() - start < 20


def test_a_worker_killed_mid_generation(rpc_dir, key_file, model, workers):
    doomed = Worker(rpc_dir, "--key-file", str(key_file))
    proc = subprocess.Popen([sys.executable, "-m", "llamalocal", "generate", str(model), "-p", PROMPT, "-n", "1900",
                             "--temp", "0", "--threads", "1", "--rpc", f"{workers[0].endpoint},{doomed.endpoint}",
                             "--rpc-key-file", str(key_file), "--tensor-split", "1,1,1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        assert ready and os.read(proc.stdout.fileno(), 64)  # type: ignore[union-attr]  # generating
        doomed.kill()
        killed = time.monotonic()
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        doomed.stop()
    took = time.monotonic() - killed
    r = subprocess.CompletedProcess(proc.args, proc.returncode, out.decode(), err.decode())
    line = one_line_error(r)
    # exit status 1, not a signal (ggml's abort would be SIGABRT and a core dump), within seconds
    assert r.returncode == 1 and took < 10, (r.returncode, took)
    assert line.startswith(f"Error: RPC worker {doomed.endpoint}") and "mid-run" in line
    assert "1900" not in r.stderr.splitlines()[-1]
    # the surviving worker saw its client go and serves the next one
    workers[0].wait_log("session ended")
    assert rpc.probe(rpc.parse_endpoint(workers[0].endpoint), rpc.read_key(key_file)).busy_with is None


class Serving:
    """`llamalocal serve --port 0` on the workers given, its stderr in a file; `.url` once it listens."""

    def __init__(self, tmp: Path, model: Path, endpoints: list[str], key_file: Path, *extra: str) -> None:
        self.log_path = tmp / f"serve-{secrets.token_hex(4)}.log"
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "llamalocal", "serve", str(model), "--port", "0",
                                          "--threads", "1", "--ctx", "512", "--rpc", ",".join(endpoints),
                                          "--rpc-key-file", str(key_file), *extra],
                                         stdout=subprocess.DEVNULL, stderr=log, env=_env(), preexec_fn=_default_sigint)
        deadline = time.monotonic() + 90
        m = None
        while m is None and time.monotonic() < deadline and self.proc.poll() is None:
            time.sleep(0.1)
            m = re.search(r"listening on (http://\S+/v1)", self.log())
        if m is None:
            self.stop()
            raise AssertionError(f"serve did not start:\n{self.log()}")
        self.url = m.group(1)
        self.port = int(self.url.rsplit(":", 1)[1].split("/")[0])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def post(self, path: str, body: dict, timeout: float = 30) -> tuple[int, dict]:
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read())
        finally:
            conn.close()

    def get(self, path: str) -> tuple[int, dict]:
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read())
        finally:
            conn.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def test_serve_answers_503_after_a_lost_worker(rpc_dir, key_file, model, workers, tmp_path):
    pytest.importorskip("uvicorn", reason="the server extra is not installed (pip install -e '.[server]')")
    from openai import APIStatusError, OpenAI

    doomed = Worker(rpc_dir, "--key-file", str(key_file))
    srv = Serving(tmp_path, model, [workers[1].endpoint, doomed.endpoint], key_file)
    try:
        client = OpenAI(base_url=srv.url, api_key="none", max_retries=0, timeout=30)
        ok = client.completions.create(model="m", prompt=PROMPT, max_tokens=8, temperature=0)
        assert ok.choices[0].text
        doomed.kill()
        time.sleep(0.5)
        start = time.monotonic()
        with pytest.raises(APIStatusError) as e:
            client.completions.create(model="m", prompt=PROMPT, max_tokens=8, temperature=0)
        assert e.value.status_code == 503 and time.monotonic() - start < 10
        body = e.value.response.json()["error"]
        assert body["code"] == "rpc_worker_lost" and doomed.endpoint in body["message"]
        assert client.models.list().data  # the server itself is still up
        assert f"error: RPC worker {doomed.endpoint}" in srv.log() and "answering 503 from now on" in srv.log()
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(20) == 0
    finally:
        srv.stop()
        doomed.stop()


_EOS = "tokenizer.ggml.eos_token_id"


def test_serve_ends_what_a_lost_worker_left_under_way(rpc_dir, key_file, model, workers, tmp_path):
    """A worker killed while a stream is generating (the engine's thread then waits inside
    llama.cpp for good): the stream ends with an error event and [DONE], a request queued behind
    it gets 503, so does every request that needs the model; /health and /v1/models answer, and
    SIGTERM still stops the server at once, exit status 0."""
    pytest.importorskip("uvicorn", reason="the server extra is not installed (pip install -e '.[server]')")
    import threading

    from openai import APIError, APIStatusError, OpenAI

    from llamalocal.gguf_header import header_values

    doomed = Worker(rpc_dir, "--key-file", str(key_file))
    srv = Serving(tmp_path, model, [workers[1].endpoint, doomed.endpoint], key_file, "--ctx", "2048")
    try:
        client = OpenAI(base_url=srv.url, api_key="none", max_retries=0, timeout=30)
        # end-of-text is barred, so the stream runs until the worker goes
        eos = (header_values(model, [_EOS]) or {})[_EOS]
        stream = client.completions.create(model="m", prompt=PROMPT, max_tokens=1900, temperature=0, stream=True,
                                           logit_bias={str(eos): -100})
        pieces = iter(stream)
        assert next(pieces).choices[0].text is not None  # generating

        queued: list[BaseException] = []

        def behind() -> None:  # admitted, then waiting on the engine behind the stream
            try:
                client.completions.create(model="m", prompt="queued", max_tokens=4, temperature=0)
            except BaseException as e:  # noqa: BLE001
                queued.append(e)

        t = threading.Thread(target=behind)
        t.start()
        deadline = time.monotonic() + 10
        while srv.get("/health")[1]["admitted"] < 2:
            assert time.monotonic() < deadline, srv.get("/health")
            time.sleep(0.05)
        doomed.kill()
        killed = time.monotonic()
        with pytest.raises(APIError) as e:
            for _ in pieces:
                pass
        assert time.monotonic() - killed < 15
        assert e.value.code == "rpc_worker_lost" and doomed.endpoint in e.value.message, e.value
        t.join(15)
        assert not t.is_alive() and len(queued) == 1 and isinstance(queued[0], APIStatusError), queued
        assert queued[0].status_code == 503 and queued[0].code == "rpc_worker_lost"

        # every route that needs the model: 503, at once
        for path, body in (("/v1/completions", {"prompt": "a", "max_tokens": 2}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "stream": True}),
                           ("/extras/tokenize", {"input": "a"}), ("/extras/detokenize", {"tokens": [1]})):
            status, reply = srv.post(path, body, timeout=10)
            assert status == 503 and reply["error"]["code"] == "rpc_worker_lost", (path, status, reply)
        status, health = srv.get("/health")
        assert status == 200 and health["status"] == "rpc_worker_lost" and doomed.endpoint in health["error"]
        assert health["admitted"] == 0  # nothing left holding a slot
        assert client.models.list().data[0].id
        log = srv.log()
        assert log.count(f"error: RPC worker {doomed.endpoint}") == 1 and "answering 503 from now on" in log

        srv.proc.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        assert srv.proc.wait(20) == 0
        # the engine's thread, stuck in llama.cpp, is not waited for (that would be GRACEFUL_SHUTDOWN_S, 5 s)
        assert time.monotonic() - stopped < 3
        assert "server stopped" in srv.log() and "Traceback" not in srv.log()
    finally:
        srv.stop()
        doomed.stop()


def test_a_worker_too_small_is_caught_by_the_plan(rpc_dir, model):
    small = Worker(rpc_dir, "--mem", "258MiB")  # 2 MiB of budget: not even one layer's compute buffer
    try:
        r = generate(model, "--rpc", small.endpoint, "--tensor-split", "0,1")
        assert r.returncode == 2 and f"worker {small.endpoint} cannot hold its 4 layers" in one_line_error(r)
        assert "authenticated, serving" not in small.log()  # refused before anything was loaded
        r = generate(model, "--rpc", small.endpoint)  # by budget it gets nothing, and the run works here
        assert r.returncode == 0 and f"worker {small.endpoint}: no layers" in r.stderr, r.stderr
    finally:
        small.stop()


def test_sigterm_and_ctrl_c_stop_a_worker(rpc_dir):
    for sig, code in ((signal.SIGTERM, 0), (signal.SIGINT, 130)):
        w = Worker(rpc_dir)
        w.proc.send_signal(sig)
        assert w.proc.wait(10) == code
        w.stop()
        assert "worker stopped" in w.log() and "Traceback" not in w.log()


@pytest.mark.slow
def test_cache_keeps_weights_on_the_worker(rpc_dir, tmp_path, key_file):
    """ggml's cache (--cache) holds tensors over 10 MiB: a second load of the same model sends
    the worker a fraction of the first's bytes (the worker logs each session's bytes)."""
    from llamalocal.convert.convert import convert
    from llamalocal.convert.params import ModelParams
    from llamalocal.convert.sample import SampleSpec, build_sample

    spec = SampleSpec(params=ModelParams(dim=1024, n_layers=2, n_heads=8, multiple_of=256, norm_eps=1e-5))
    build_sample(tmp_path, "wide", spec)
    path = convert(tmp_path / "wide", "f32", tmp_path / "wide.gguf").path
    cache = tmp_path / "cache"
    w = Worker(rpc_dir, "--key-file", str(key_file), "--cache", str(cache))
    try:
        received = []
        for _ in range(2):
            before = w.log().count("session ended")
            r = llamalocal("generate", str(path), "-p", "a", "-n", "2", "--threads", "1", "--ctx", "64",
                           "--rpc", w.endpoint, "--rpc-key-file", str(key_file), "--tensor-split", "0,1")
            assert r.returncode == 0, r.stderr
            deadline = time.monotonic() + 10
            while w.log().count("session ended") == before and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.5)
            sessions = w.log().split("session ended")[before + 1:]
            received.append(sum(float(m) for s in sessions for m in re.findall(r"; ([\d.]+) MiB received", s)))
        # ggml wrote the worker's tensors over its 10 MiB threshold there, named by their hash, and
        # the second load sent only their hashes
        import gguf

        big = [t for t in gguf.GGUFReader(path).tensors if t.name.startswith("blk.") and t.n_bytes > 10 * 2**20]
        assert len(list(cache.iterdir())) == len(big) > 0
        saved = sum(t.n_bytes for t in big) / 2**20
        assert received[0] - received[1] == pytest.approx(saved, rel=0.02), (received, saved)
    finally:
        w.stop()


def test_without_the_relay_ggml_abort_is_still_one_line(rpc_dir, model):
    """With ggml's client straight on a worker (no relay to notice first), ggml itself aborts on
    the lost connection: its abort handler is replaced, so that too is one line and status 1."""
    w = Worker(rpc_dir, "--direct")
    code = f"""
import sys
from llamalocal.rpc import RpcConfig, parse_endpoints
from llamalocal.runner import load_model, stream_tokens, tokenize_prompt, Sampling
loaded = load_model({str(model)!r}, threads=1, rpc=RpcConfig(parse_endpoints({w.endpoint!r}), tensor_split=[1, 1],
                    direct=True))
for piece in stream_tokens(loaded.llm, tokenize_prompt(loaded.llm, {PROMPT!r}), max_tokens=1900,
                           sampling=Sampling(temp=0)):
    sys.stdout.write(piece)
    sys.stdout.flush()
"""
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        assert ready and os.read(proc.stdout.fileno(), 64)
        w.kill()
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        w.stop()
    r = subprocess.CompletedProcess(proc.args, proc.returncode, out.decode(), err.decode())
    assert r.returncode == 1 and "Error: llama.cpp stopped on an RPC failure" in one_line_error(r), r.stderr
