"""Load test for `llamalocal serve` under hostile traffic, on loopback.

Starts the server itself on a free loopback port (or uses --url, which must be loopback), warms
it up, then for --duration seconds runs:

- CLIENTS client threads, each cycling through normal requests (chat and completion, through the
  real `openai` client), streamed ones, abandoned ones (a stream or a long answer whose client
  hangs up early) and malformed ones (bad grammars and schemas, lone surrogates, 3000-deep JSON,
  ids outside the vocabulary, unsupported routes, no Content-Type, ...);
- SLOW uploaders that send a body one byte at a time, forever, on connections of their own
  (each is cut off with a 408 after the server's read timeout, and comes back).

It prints: requests by kind and outcome, 5xx answers (must be 0), transport failures, whether the
server process survived, how the normal requests were spread over the run (the longest gap
between two completed normal requests, completions per tenth of the run), latency p50/p95 of the
normal requests, and the server's RSS sampled through the run (after warm-up, peak, at the end,
and the median of the first and of the last tenth: flat means no leak).

    python scripts/load_serve.py MODEL.gguf                       # 32 clients + 16 slow, 60 s
    python scripts/load_serve.py MODEL.gguf --duration 10 --clients 8 --slow 4   # a smoke run
    python scripts/load_serve.py --url http://127.0.0.1:8080/v1 --api-key KEY

Exit status 0 only with no 5xx, no transport failure on a request that should have been served,
and the server alive at the end.
"""

from __future__ import annotations

import argparse
import http.client
import ipaddress
import json
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["The king", "My lord, what news?", "Good morrow, cousin.", "Speak, and tell me all.",
           "What say you to this?", "Come, let us go.", "Now is the winter", "O, what a fall was there"]
# each client's cycle of request kinds: 40% normal, 30% streamed, 15% abandoned, 15% malformed
CYCLE = ["chat", "completion-stream", "malformed", "completion", "chat-stream", "abandoned", "chat",
         "completion", "chat-stream", "malformed", "completion", "abandoned-stream", "chat", "completion-stream",
         "malformed", "chat", "chat-stream", "completion", "abandoned", "completion-stream"]
NORMAL = {"chat", "completion", "chat-stream", "completion-stream"}

# (path, body, content type): each must get a 4xx JSON error and leave the server serving
MALFORMED: list[tuple[str, bytes, str | None]] = [
    ("/v1/completions", b'{"prompt": "x", "grammar": "root ::= [a-"}', "application/json"),
    ("/v1/completions", b'{"prompt": "x", "grammar": "root ::= \\"a\\"{5,2}"}', "application/json"),
    ("/v1/completions", json.dumps({"prompt": "x", "grammar": "root ::= " + "(" * 3000 + '"a"' + ")" * 3000}).encode(),
     "application/json"),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "hi"}], "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"anyOf": []}}}}).encode(), "application/json"),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "hi"}], "response_format": {
        "type": "json_object", "schema": {"type": "object", "properties": {'a"b': {"type": "string"}}}}}).encode(),
     "application/json"),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "hi"}], "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "^(a)\\1$"}}}}).encode(),
     "application/json"),
    ("/extras/detokenize", b'{"tokens": [99999]}', "application/json"),
    ("/extras/detokenize", b'{"tokens": [-5]}', "application/json"),
    ("/v1/completions", b'{"prompt": "\\ud800"}', None),
    ("/v1/completions", b'{"prompt": "x", "stop": "\\udfff"}', "text/plain"),
    ("/v1/completions", b"[" * 3000 + b"]" * 3000, "application/x-www-form-urlencoded"),
    ("/v1/completions", b'{"prompt": "x", "logit_bias": {"abc": 1}}', "application/json"),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "hi"}], "tools": [
        {"type": "function", "function": {"name": "f"}}], "tool_choice": {"type": "function", "function": {
            "name": "g"}}}).encode(), "application/json"),
    ("/v1/engines/copilot-codex/completions", b'{"prompt": "x"}', "text/plain"),
    ("/v1/embeddings", b'{"input": "x"}', "application/json"),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 100000000}', "application/json"),
    ("/v1/completions", b'{"prompt": [1, 99999]}', "application/json"),
    ("/v1/completions", b'{"prompt": "x", ', "application/json"),
    ("/v1/completions", b'{"prompt": "x", "n": 99}', "application/json"),
]


@dataclass
class Results:
    lock: threading.Lock = field(default_factory=threading.Lock)
    outcomes: Counter = field(default_factory=Counter)  # (kind, outcome) -> count
    statuses: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    normal_done: list[tuple[float, float]] = field(default_factory=list)  # (finished at, latency)
    slow_408: int = 0
    slow_other: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)  # the first few unexpected answers, as they came

    def add(self, kind: str, outcome: str, status: int | None = None, failure: str | None = None) -> None:
        with self.lock:
            self.outcomes[(kind, outcome)] += 1
            if status is not None:
                self.statuses[status] += 1
            if failure:
                self.failures.append(failure)


class Target:
    def __init__(self, base_url: str, api_key: str) -> None:
        u = urllib.parse.urlparse(base_url)
        self.base_url, self.api_key = base_url, api_key
        self.host, self.port = u.hostname or "127.0.0.1", u.port or 80

    def raw(self, method: str, path: str, body: bytes | None, content_type: str | None,
            timeout: float = 120) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        headers = {"Authorization": f"Bearer {self.api_key}"}
        if content_type:
            headers["Content-Type"] = content_type
        try:
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()


def openai_client(base_url: str, api_key: str):
    import openai

    return openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=120)


def normal_request(client, kind: str, prompt: str, max_tokens: int) -> None:
    """One request that must be served; raises on a bad answer as on a transport error."""
    chat = kind.startswith("chat")
    stream = kind.endswith("stream")
    if chat:
        call = client.chat.completions.create
        kw = {"messages": [{"role": "user", "content": prompt}]}
    else:
        call = client.completions.create
        kw = {"prompt": prompt}
    if stream:
        chunks = list(call(model="any", max_tokens=max_tokens, stream=True, **kw))
        finish = chunks[-1].choices[0].finish_reason if chunks and chunks[-1].choices else None
    else:
        finish = call(model="any", max_tokens=max_tokens, **kw).choices[0].finish_reason
    if finish not in ("stop", "length"):
        raise RuntimeError(f"finish_reason {finish!r}")


def abandoned_request(target: Target, stream: bool) -> None:
    """A long answer whose client hangs up after its first bytes (stream) or a moment (not)."""
    body = json.dumps({"prompt": "The king", "max_tokens": 0, "stream": stream}).encode()
    with socket.create_connection((target.host, target.port), timeout=60) as s:
        s.sendall((f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {target.api_key}\r\n"
                   f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body)
        if stream:
            head = s.recv(4096)
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"abandoned stream got {head[:40]!r}")
        else:
            time.sleep(0.05)


def client_worker(idx: int, target: Target, max_tokens: int, deadline: float, res: Results) -> None:
    client = openai_client(target.base_url, target.api_key)
    j = 0
    malformed = idx  # this client's next malformed body: every client walks the whole list
    while time.monotonic() < deadline:
        kind = CYCLE[(idx + j) % len(CYCLE)]
        j += 1
        start = time.perf_counter()
        try:
            if kind in NORMAL:
                normal_request(client, kind, PROMPTS[(idx * 3 + j) % len(PROMPTS)], max_tokens)
                with res.lock:
                    res.normal_done.append((time.monotonic(), time.perf_counter() - start))
                res.add(kind, "ok", 200)
            elif kind.startswith("abandoned"):
                abandoned_request(target, kind.endswith("stream"))
                res.add(kind, "ok")
            else:
                path, body, ctype = MALFORMED[malformed % len(MALFORMED)]
                malformed += 1
                status, reply = target.raw("POST", path, body, ctype)
                ok = 400 <= status < 500 and isinstance(json.loads(reply).get("error", {}).get("message"), str)
                res.add(kind, "ok" if ok else "bad answer", status,
                        None if ok else f"client {idx}: {path} {body[:40]!r} -> {status} {reply[:120]!r}")
        except Exception as e:  # counted, not raised: the point is to see how many fail
            status = getattr(e, "status_code", None)
            res.add(kind, "failed", status, f"client {idx} ({kind}): {type(e).__name__}: {str(e)[:200]}")


def slow_uploader(target: Target, deadline: float, res: Results) -> None:
    """Send a body one byte every 0.5 s, never finishing; count how the server ends it."""
    body = json.dumps({"prompt": "The king " * 50, "max_tokens": 2}).encode()
    started = time.monotonic()
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((target.host, target.port), timeout=120) as s:
                s.sendall((f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {target.api_key}\r\n"
                           f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode())
                s.settimeout(0.5)
                reply = b""
                for i in range(len(body) - 1):
                    if time.monotonic() > deadline:
                        return
                    try:
                        s.sendall(body[i:i + 1])
                        reply += s.recv(4096)
                    except (TimeoutError, BlockingIOError):
                        continue
                    except OSError:
                        break
                    if reply:
                        break
                status = int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/1.1 ") else 0
                with res.lock:
                    if status == 408:
                        res.slow_408 += 1
                    else:
                        res.slow_other[status] += 1
                        if len(res.examples) < 5:
                            res.examples.append(f"slow upload at {time.monotonic() - started:.1f} s: "
                                                f"{reply[:400].decode(errors='replace')}")
                    res.statuses[status] += 1
        except OSError as e:
            with res.lock:
                res.slow_other[type(e).__name__] += 1


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def start_server(model: str, args: argparse.Namespace, log: Path) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "llamalocal", "serve", model, "--port", "0", "--ctx", str(args.ctx),
           "--parallel", str(args.parallel or args.clients), "--api-key", args.api_key, "--no-access-log",
           "--read-timeout", str(args.read_timeout), "--connections-per-client", str(args.connections_per_client)]
    if args.threads is not None:
        cmd += ["--threads", str(args.threads)]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
        m = re.search(r"listening on (http://127\.0\.0\.1:\d+/v1)", log.read_text(errors="replace"))
        if m:
            return proc, m.group(1)
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"server did not start within 120 s:\n{log.read_text(errors='replace')}")


def wait_ready(base_url: str, api_key: str, timeout: float = 60) -> None:
    import openai

    client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=10)
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.models.list()
            return
        except openai.APIConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", help="GGUF to serve (not needed with --url)")
    ap.add_argument("--url", help="use a running server at this loopback base URL instead of starting one")
    ap.add_argument("--api-key", default="load-test-key")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--slow", type=int, default=16, help="slow uploaders")
    ap.add_argument("--duration", type=float, default=60, help="seconds of traffic")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--parallel", type=int, default=None, help="server --parallel (default: --clients)")
    ap.add_argument("--read-timeout", type=float, default=5.0, help="server --read-timeout")
    ap.add_argument("--connections-per-client", type=int, default=128, help="server --connections-per-client")
    ap.add_argument("--threads", type=int, default=None, help="server threads (default: the planner's choice)")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args()
    if not 1 <= args.clients <= 128 or not 0 <= args.slow <= 64 or not 1 <= args.duration <= 3600:
        ap.error("--clients must be 1..128, --slow 0..64, --duration 1..3600")

    import psutil

    proc = None
    if args.url:
        host = urllib.parse.urlparse(args.url).hostname or ""
        if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
            ap.error("--url must be a loopback address: this load test is not for other machines")
        base_url = args.url.rstrip("/")
    else:
        if not args.model:
            ap.error("give a MODEL to serve, or --url of a running server")
        log = Path(tempfile.mkstemp(prefix="load_serve_", suffix=".log")[1])
        print(f"starting the server (log: {log})", file=sys.stderr)
        proc, base_url = start_server(args.model, args, log)
    target = Target(base_url, args.api_key)
    samples: list[tuple[float, int]] = []
    res = Results()
    try:
        wait_ready(base_url, args.api_key)

        def rss() -> int | None:
            try:
                return psutil.Process(proc.pid).memory_info().rss if proc else None
            except psutil.NoSuchProcess:
                return None

        warm = openai_client(base_url, args.api_key)
        for kind in sorted(NORMAL):  # every code path once, so its buffers exist before memory is measured
            normal_request(warm, kind, PROMPTS[0], args.max_tokens)
        for path, body, ctype in MALFORMED:
            target.raw("POST", path, body, ctype)
        rss_warm = rss()
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.5):
                value = rss()
                if value is not None:
                    samples.append((time.monotonic(), value))

        peaks = {"connections": 0, "admitted": 0}
        refused = [0]  # connections the server refused over the per-client cap, as /health last said

        def watch_health() -> None:  # the server's own counts: how close the run came to its caps
            while not stop.wait(0.25):
                try:
                    status, reply = target.raw("GET", "/health", None, None, timeout=10)
                    health = json.loads(reply) if status == 200 else {}
                except (OSError, ValueError):
                    continue
                for key in peaks:
                    if isinstance(health.get(key), int):
                        peaks[key] = max(peaks[key], health[key])
                if isinstance(health.get("connections_refused"), int):
                    refused[0] = health["connections_refused"]

        sampler = threading.Thread(target=sample, daemon=True)
        if proc:
            sampler.start()
        threading.Thread(target=watch_health, daemon=True).start()
        start = time.monotonic()
        deadline = start + args.duration
        threads = [threading.Thread(target=client_worker, args=(i, target, args.max_tokens, deadline, res))
                   for i in range(args.clients)]
        threads += [threading.Thread(target=slow_uploader, args=(target, deadline, res)) for _ in range(args.slow)]
        for t in threads:
            t.start()
        # the slow uploaders too: one still sending when the server is stopped below would get its
        # (correct) "shutting down" 503 and count it as the run's
        for t in threads:
            t.join()
        wall = time.monotonic() - start
        stop.set()
        rss_end = rss()
        alive = proc.poll() is None if proc else True
        # and it still answers
        try:
            normal_request(warm, "chat", PROMPTS[1], args.max_tokens)
            answers_after = True
        except Exception:
            answers_after = False
    finally:
        if proc:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def mib(b: float | None) -> float | None:
        return None if b is None else round(b / 2**20, 1)

    done = sorted(t for t, _ in res.normal_done)
    edges = [start, *done, start + wall]
    gaps = [b - a for a, b in zip(edges, edges[1:], strict=False)]
    tenths = [sum(1 for t in done if start + k * wall / 10 <= t < start + (k + 1) * wall / 10) for k in range(10)]
    rss_values = [v for _, v in samples]
    tenth = max(1, len(rss_values) // 10)
    five_xx = sum(n for status, n in res.statuses.items() if isinstance(status, int) and status >= 500)
    transport = sum(n for (kind, outcome), n in res.outcomes.items() if outcome == "failed")
    latencies = [lat for _, lat in res.normal_done]
    figures = {
        "clients": args.clients, "slow_uploaders": args.slow, "duration_s": round(wall, 1),
        "requests": {f"{k}/{o}": n for (k, o), n in sorted(res.outcomes.items())},
        "statuses": {str(k): n for k, n in sorted(res.statuses.items(), key=lambda kv: str(kv[0]))},
        "responses_5xx": five_xx, "failed_requests": transport,
        "normal_served": len(done), "normal_per_tenth_of_run": tenths,
        "longest_gap_between_normal_s": round(max(gaps), 2) if gaps else None,
        "normal_p50_s": round(percentile(latencies, 0.5), 3), "normal_p95_s": round(percentile(latencies, 0.95), 3),
        "slow_uploads_cut_with_408": res.slow_408, "slow_uploads_other": dict(res.slow_other),
        "unexpected_answers": res.examples,
        "peak_connections_open": peaks["connections"], "connections_per_client_cap": args.connections_per_client,
        "connections_refused_by_cap": refused[0],
        "peak_admitted": peaks["admitted"], "parallel": args.parallel or args.clients,
        "rss_after_warmup_mib": mib(rss_warm), "rss_peak_mib": mib(max(rss_values)) if rss_values else None,
        "rss_end_mib": mib(rss_end),
        "rss_first_tenth_median_mib": mib(statistics.median(rss_values[:tenth])) if rss_values else None,
        "rss_last_tenth_median_mib": mib(statistics.median(rss_values[-tenth:])) if rss_values else None,
        "server_alive_at_end": alive, "answers_after_the_run": answers_after,
        "server_exit_code_after_sigterm": proc.returncode if proc else None,
    }
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        for key, value in figures.items():
            print(f"{key}: {value}")
    for f in res.failures[:10]:
        print("  failure: " + f, file=sys.stderr)
    ok = five_xx == 0 and transport == 0 and alive and answers_after and (proc is None or proc.returncode == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
