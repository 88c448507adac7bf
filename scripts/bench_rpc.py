"""What splitting a model over RPC workers costs, and what llamalocal's relays cost on top of RPC.

    python scripts/bench_rpc.py [MODEL.gguf] [--threads 1] [-p 128] [-n 64] [-r 3] [--rounds 3]
                                [--dim 1024 --layers 8 --preset q4_0]

Three configurations of the same model, measured by `llamalocal.bench.bench` (llama-bench's pp/tg)
in a fresh process each:

  local   everything on this machine
  relay   split over this machine and two keyed `llamalocal worker`s on loopback (--tensor-split
          1,1,1): ggml's RPC through both relays (the client's and the worker's) after the handshake
  direct  the same split over two `llamalocal worker --direct` (ggml's RPC server as it is, no relay,
          no key), ggml's client straight to them

Rounds rotate the order so load from other processes hits all alike. Prints each round, then per
test the ratios relay/direct (the relays' cost; goal >= 0.9 for tg) and relay/local (the cost of
the split itself, which on one machine is all overhead: the "workers" share its cores), as min and
median over rounds and best/best. Without MODEL a synthetic model of --dim/--layers is built.
Absolute numbers on a loaded machine mean little; the ratios measured in one run do.
"""

from __future__ import annotations

import argparse
import json
import re
import secrets
import select
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

_MEASURE = """
import json, sys
from llamalocal.bench import bench
from llamalocal.rpc import RpcConfig, parse_endpoints, read_key
a = json.loads(sys.argv[1])
rpc = None
if a["endpoints"]:
    rpc = RpcConfig(parse_endpoints(a["endpoints"]), read_key(a["key"]) if a["key"] else None,
                    tensor_split=[1.0] * (a["endpoints"].count(",") + 2), direct=a["direct"])
r = bench(a["model"], threads=a["threads"], n_prompt=a["p"], n_gen=a["n"], repetitions=a["r"], bandwidth_mib=0,
          rpc=rpc)
print(json.dumps({"pp": r.pp.mean if r.pp else None, "tg": r.tg.mean if r.tg else None}))
"""


def start_worker(threads: int, *args: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "llamalocal", "worker", "--port", "0", "--threads", str(threads),
                             *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 60)
    line = proc.stdout.readline() if ready else ""
    m = re.fullmatch(r"listening on (\S+:\d+)\n", line)
    if not m:
        proc.kill()
        raise SystemExit(f"worker did not start: {line!r}")
    return proc, m.group(1)


def measure(model: Path, threads: int, p: int, n: int, r: int, endpoints: str = "", key: str = "",
            direct: bool = False) -> dict[str, float]:
    args = {"model": str(model), "threads": threads, "p": p, "n": n, "r": r, "endpoints": endpoints, "key": key,
            "direct": direct}
    out = subprocess.run([sys.executable, "-c", _MEASURE, json.dumps(args)], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"measurement failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def synthetic(folder: Path, dim: int, layers: int, preset: str) -> Path:
    from llamalocal.convert.convert import convert
    from llamalocal.convert.params import ModelParams
    from llamalocal.convert.sample import SampleSpec, build_sample

    spec = SampleSpec(params=ModelParams(dim=dim, n_layers=layers, n_heads=max(1, dim // 128), multiple_of=256,
                                         norm_eps=1e-5))
    build_sample(folder, "bench", spec)
    return convert(folder / "bench", preset, folder / f"bench-{preset}.gguf").path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", type=Path)
    ap.add_argument("--threads", type=int, default=1, help="threads of the client and of each worker")
    ap.add_argument("-p", type=int, default=128, help="prompt tokens (pp test)")
    ap.add_argument("-n", type=int, default=64, help="generated tokens (tg test)")
    ap.add_argument("-r", type=int, default=3, help="timed repetitions per test, after a warm-up")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dim", type=int, default=1024, help="synthetic model width (without MODEL)")
    ap.add_argument("--layers", type=int, default=8, help="synthetic model depth (without MODEL)")
    ap.add_argument("--preset", default="q4_0", help="synthetic model preset (without MODEL)")
    a = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-rpc-") as tmp:
        folder = Path(tmp)
        model = a.model or synthetic(folder, a.dim, a.layers, a.preset)
        key = folder / "rpc.key"
        key.write_text(secrets.token_hex(32))
        key.chmod(0o600)
        procs = []
        try:
            keyed = [start_worker(a.threads, "--key-file", str(key)) for _ in range(2)]
            direct = [start_worker(a.threads, "--direct") for _ in range(2)]
            procs = [p for p, _ in keyed + direct]
            configs = {
                "local": {},
                "relay": {"endpoints": ",".join(e for _, e in keyed), "key": str(key)},
                "direct": {"endpoints": ",".join(e for _, e in direct), "direct": True},
            }
            print(f"{model.name}: threads {a.threads} (client and each worker), pp{a.p} / tg{a.n}, {a.r} repetitions, "
                  f"{a.rounds} rounds; split 1,1,1 over this machine and two loopback workers")
            runs: dict[str, dict[str, list[float]]] = {c: {"pp": [], "tg": []} for c in configs}
            names = list(configs)
            for rnd in range(a.rounds):
                order = names[rnd % len(names):] + names[: rnd % len(names)]
                for name in order:
                    res = measure(model, a.threads, a.p, a.n, a.r, **configs[name])  # type: ignore[arg-type]
                    for test in ("pp", "tg"):
                        runs[name][test].append(res[test])
                print(f"round {rnd + 1}: " + "  ".join(
                    f"{c} pp {runs[c]['pp'][-1]:.1f} tg {runs[c]['tg'][-1]:.1f}" for c in names) + "  (tokens/s)")
        finally:
            for p in procs:
                p.terminate()
                p.wait(10)

    for test in ("pp", "tg"):
        for num, den in (("relay", "direct"), ("relay", "local"), ("direct", "local")):
            ratios = [x / y for x, y in zip(runs[num][test], runs[den][test], strict=True)]
            best = max(runs[num][test]) / max(runs[den][test])
            print(f"{test} {num}/{den}: min {min(ratios):.3f}  median {statistics.median(ratios):.3f}  "
                  f"best/best {best:.3f}")


if __name__ == "__main__":
    main()
