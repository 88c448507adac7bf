"""Load test for `llamalocal serve`: concurrent clients, mixed streaming and not, on loopback.

Starts the server itself on a free loopback port (or uses --url, which must be loopback),
warms it up, then runs CLIENTS threads x REQUESTS requests each through the real `openai`
client, cycling through chat/completion x streamed/not with small max_tokens. Prints
requests/s, p50/p95 latency, failures, and the server's RSS after warm-up, at its peak and at
the end (only when it started the server, so it knows the process).

    python scripts/load_serve.py MODEL.gguf                 # 8 clients x 25 requests
    python scripts/load_serve.py --url http://127.0.0.1:8080/v1 --api-key KEY

Bounded: every request has a timeout, and no new request starts after --time-limit seconds.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KINDS = ("chat", "chat-stream", "completion", "completion-stream")
PROMPTS = ["The king", "My lord, what news?", "Good morrow, cousin.", "Speak, and tell me all.",
           "What say you to this?", "Come, let us go.", "Now is the winter", "O, what a fall was there"]


@dataclass
class Results:
    latencies: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    tokens: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def one_request(client, kind: str, prompt: str, max_tokens: int) -> int:
    """Send one request; returns completion tokens (counted as chunks when streamed). Raises on a
    bad answer as well as on a transport error."""
    if kind.startswith("chat"):
        messages = [{"role": "user", "content": prompt}]
        if kind.endswith("stream"):
            chunks = list(client.chat.completions.create(model="any", messages=messages, max_tokens=max_tokens,
                                                         stream=True))
            if not chunks or chunks[-1].choices[0].finish_reason not in ("stop", "length"):
                raise RuntimeError("stream ended without a finish_reason")
            return sum(1 for c in chunks if c.choices[0].delta.content)
        r = client.chat.completions.create(model="any", messages=messages, max_tokens=max_tokens)
        if r.choices[0].finish_reason not in ("stop", "length"):
            raise RuntimeError(f"finish_reason {r.choices[0].finish_reason!r}")
        return r.usage.completion_tokens
    if kind.endswith("stream"):
        chunks = list(client.completions.create(model="any", prompt=prompt, max_tokens=max_tokens, stream=True))
        if not chunks or chunks[-1].choices[0].finish_reason not in ("stop", "length"):
            raise RuntimeError("stream ended without a finish_reason")
        return sum(1 for c in chunks if c.choices[0].text)
    r = client.completions.create(model="any", prompt=prompt, max_tokens=max_tokens)
    if r.choices[0].finish_reason not in ("stop", "length"):
        raise RuntimeError(f"finish_reason {r.choices[0].finish_reason!r}")
    return r.usage.completion_tokens


def openai_client(base_url: str, api_key: str):
    import openai

    return openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=120)


def worker(idx: int, base_url: str, api_key: str, n: int, max_tokens: int, deadline: float, res: Results) -> None:
    client = openai_client(base_url, api_key)
    for j in range(n):
        if time.monotonic() > deadline:
            with res.lock:
                res.failures.append(f"client {idx}: time limit reached before request {j}")
            continue
        kind = KINDS[(idx + j) % len(KINDS)]
        start = time.perf_counter()
        try:
            toks = one_request(client, kind, PROMPTS[(idx * 3 + j) % len(PROMPTS)], max_tokens)
        except Exception as e:  # counted, not raised: the point is to see how many fail
            with res.lock:
                res.failures.append(f"client {idx} request {j} ({kind}): {type(e).__name__}: {e}")
            continue
        with res.lock:
            res.latencies.append(time.perf_counter() - start)
            res.tokens += toks


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def start_server(model: str, ctx: int, parallel: int, api_key: str, log: Path,
                 threads: int | None) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "llamalocal", "serve", model, "--port", "0", "--ctx", str(ctx),
           "--parallel", str(parallel), "--api-key", api_key, "--no-access-log"]
    if threads is not None:
        cmd += ["--threads", str(threads)]
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
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=25, help="per client")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None, help="server threads (default: the planner's choice)")
    ap.add_argument("--time-limit", type=float, default=300, help="no new request after this many seconds")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args()
    if args.clients < 1 or args.requests < 1 or args.clients > 64 or args.requests > 1000:
        ap.error("--clients must be 1..64 and --requests 1..1000")

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
        proc, base_url = start_server(args.model, args.ctx, args.clients, args.api_key, log, args.threads)
    try:
        wait_ready(base_url, args.api_key)
        def rss() -> int | None:
            return psutil.Process(proc.pid).memory_info().rss if proc else None

        warm_client = openai_client(base_url, args.api_key)
        for kind in KINDS:  # every code path once, so its buffers exist before memory is measured
            one_request(warm_client, kind, PROMPTS[0], args.max_tokens)
        rss_warm = rss()
        peak = [rss_warm or 0]
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.25):
                peak[0] = max(peak[0], rss() or 0)

        sampler = threading.Thread(target=sample, daemon=True)
        if proc:
            sampler.start()
        res = Results()
        deadline = time.monotonic() + args.time_limit
        start = time.perf_counter()
        threads = [threading.Thread(target=worker, args=(i, base_url, args.api_key, args.requests, args.max_tokens,
                                                         deadline, res)) for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
        stop.set()
        rss_end = rss()
        alive = proc.poll() is None if proc else True
    finally:
        if proc:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    total = args.clients * args.requests

    def mib(b: int | None) -> float | None:
        return None if b is None else round(b / 2**20, 1)

    figures = {
        "clients": args.clients, "requests": total, "completed": len(res.latencies), "failures": len(res.failures),
        "wall_s": round(wall, 2), "requests_per_s": round(len(res.latencies) / wall, 2),
        "tokens_per_s": round(res.tokens / wall, 1),
        "p50_s": round(percentile(res.latencies, 0.50), 3), "p95_s": round(percentile(res.latencies, 0.95), 3),
        "rss_after_warmup_mib": mib(rss_warm), "rss_peak_mib": mib(peak[0] if proc else None),
        "rss_end_mib": mib(rss_end), "server_alive_at_end": alive,
        "server_exit_code": proc.returncode if proc else None,
    }
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        print(f"{figures['completed']}/{total} requests from {args.clients} clients in {figures['wall_s']} s: "
              f"{figures['requests_per_s']} requests/s, {figures['tokens_per_s']} tokens/s")
        print(f"latency p50 {figures['p50_s']} s, p95 {figures['p95_s']} s; failures: {figures['failures']}")
        if proc:
            print(f"server RSS: {figures['rss_after_warmup_mib']} MiB after warm-up, {figures['rss_peak_mib']} MiB "
                  f"peak, {figures['rss_end_mib']} MiB at the end; alive at the end: {alive}; "
                  f"exit code after SIGTERM: {proc.returncode}")
    for f in res.failures[:10]:
        print("  failure: " + f, file=sys.stderr)
    return 0 if not res.failures and alive else 1


if __name__ == "__main__":
    sys.exit(main())
