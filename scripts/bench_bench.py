"""llamalocal's bench against llama.cpp's llama-bench: pp512 and tg128 on the same file and threads.

    python scripts/bench_bench.py MODEL.gguf [MODEL.gguf ...] [--threads 2] [-r 5] [--rounds 2]

Both run on the CPU (-ngl 0) with flash attention off (llama-cpp-python's default, which the
runner keeps for an f16 KV cache), n_ubatch 512. Rounds alternate ours / peer so that load from
other processes hits both alike. Prints both means ± sd and the ratio ours / peer per test, then
the ratio of the best round of each (load from other processes only ever slows a run down, so the
fastest round is the least disturbed); exit status 1 when that is off by more than --tolerance (5 %).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import peer_tools  # noqa: E402

from llamalocal.bench import bench  # noqa: E402


def peer_bench(exe: Path, model: Path, threads: int, reps: int) -> dict[str, tuple[float, float]]:
    cmd = [str(exe), "-m", str(model), "-t", str(threads), "-ngl", "0", "-fa", "0", "-r", str(reps),
           "-p", "512", "-n", "128", "-o", "json"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    rows = json.loads(out.stdout)
    res = {}
    for r in rows:
        key = "pp" if r["n_prompt"] > 0 else "tg"
        res[key] = (float(r["avg_ts"]), float(r["stddev_ts"]))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("-r", "--repetitions", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2, help="alternating ours/peer rounds per model")
    ap.add_argument("--sdist", type=Path, default=None)
    ap.add_argument("--tolerance", type=float, default=5.0, help="allowed |ratio - 1| in percent")
    a = ap.parse_args()

    exe = peer_tools.tool("llama-bench") or peer_tools.build(a.sdist) / "llama-bench"
    print(f"threads {a.threads}, {a.repetitions} repetitions, {a.rounds} rounds, CPU only, flash attention off")
    print(f"{'model':<24} {'test':<6} {'llamalocal t/s':>20} {'llama-bench t/s':>20} {'ratio':>7}")
    worst = 0.0
    for model in a.models:
        ours_runs: dict[str, list[float]] = {"pp": [], "tg": []}
        peer_runs: dict[str, list[float]] = {"pp": [], "tg": []}
        for _ in range(a.rounds):
            r = bench(model, threads=a.threads, n_gpu_layers=0, repetitions=a.repetitions, bandwidth_mib=0)
            p = peer_bench(exe, model, a.threads, a.repetitions)
            for key, rate in (("pp", r.pp), ("tg", r.tg)):
                assert rate is not None
                ours_runs[key].append(rate.mean)
                peer_runs[key].append(p[key][0])
                print(f"{model.name:<24} {key + ('512' if key == 'pp' else '128'):<6} "
                      f"{rate.mean:>12.1f} ± {rate.sd:<6.1f} {p[key][0]:>12.1f} ± {p[key][1]:<6.1f} "
                      f"{rate.mean / p[key][0]:>7.3f}")
        for key in ("pp", "tg"):
            best_ours, best_peer = max(ours_runs[key]), max(peer_runs[key])
            ratio = best_ours / best_peer
            worst = max(worst, abs(ratio - 1) * 100)
            print(f"{model.name:<24} {key:<6} best rounds: {best_ours:.1f} vs {best_peer:.1f} t/s, ratio {ratio:.3f} "
                  f"(median ratio {statistics.median(ours_runs[key]) / statistics.median(peer_runs[key]):.3f})")
    print(f"largest |ratio - 1|: {worst:.1f} % (tolerance {a.tolerance} %)")
    sys.exit(0 if worst <= a.tolerance else 1)


if __name__ == "__main__":
    main()
