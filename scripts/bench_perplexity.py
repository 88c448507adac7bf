"""llamalocal's perplexity against llama.cpp's llama-perplexity: same file, same text, same context.

    python scripts/bench_perplexity.py MODEL.gguf [MODEL.gguf ...] -f TEXT [--ctx 512] [--threads 2]

Builds (or reuses) llama-perplexity with scripts/peer_tools.py, runs both on CPU, and prints
both PPL values, their standard errors and the relative difference. Exit status 1 when any
difference exceeds --tolerance (0.5 % by default, the goal of the issue).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import peer_tools  # noqa: E402

from llamalocal.perplexity import perplexity, read_text  # noqa: E402

FINAL = re.compile(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)")
CHUNKS = re.compile(r"calculating perplexity over (\d+) chunks")


def peer_perplexity(exe: Path, model: Path, text: Path, n_ctx: int, threads: int, chunks: int | None,
                    n_batch: int | None) -> tuple[float, float, int, float]:
    cmd = [str(exe), "-m", str(model), "-f", str(text), "-c", str(n_ctx), "-t", str(threads), "-ngl", "0"]
    if chunks is not None:
        cmd += ["--chunks", str(chunks)]
    if n_batch is not None:
        cmd += ["-b", str(n_batch)]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    secs = time.perf_counter() - t0
    log = out.stdout + out.stderr
    m, c = FINAL.search(log), CHUNKS.search(log)
    if not m or not c:
        raise SystemExit(f"no final estimate in llama-perplexity's output:\n{log[-2000:]}")
    return float(m.group(1)), float(m.group(2)), int(c.group(1)), secs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("-f", "--file", type=Path, required=True, help="evaluation text")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--peer-batch", type=int, default=None,
                    help="llama-perplexity -b (default: its own 2048, i.e. several windows per batch)")
    ap.add_argument("--sdist", type=Path, default=None, help="llama-cpp-python sdist for peer_tools")
    ap.add_argument("--tolerance", type=float, default=0.5, help="allowed |difference| in percent")
    a = ap.parse_args()

    exe = peer_tools.tool("llama-perplexity") or peer_tools.build(a.sdist) / "llama-perplexity"
    text = read_text(a.file)
    print(f"text: {a.file} ({len(text)} bytes), ctx {a.ctx}, threads {a.threads}, CPU only")
    print(f"{'model':<28} {'chunks':>6} {'llamalocal':>22} {'llama-perplexity':>22} {'diff %':>9} "
          f"{'ours s':>7} {'peer s':>7}")
    worst = 0.0
    for model in a.models:
        ours = perplexity(model, text, n_ctx=a.ctx, chunks=a.chunks, n_gpu_layers=0, threads=a.threads)
        ppl, se, n_chunks, peer_s = peer_perplexity(exe, model, a.file, a.ctx, a.threads, a.chunks, a.peer_batch)
        if n_chunks != ours.chunks:
            raise SystemExit(f"{model}: chunk counts differ (ours {ours.chunks}, peer {n_chunks})")
        diff = 100 * (ours.ppl / ppl - 1)
        worst = max(worst, abs(diff))
        print(f"{model.name:<28} {ours.chunks:>6} {ours.ppl:>12.4f} ± {ours.ppl_stderr:<7.4f} "
              f"{ppl:>12.4f} ± {se:<7.4f} {diff:>+9.4f} {ours.seconds:>7.1f} {peer_s:>7.1f}")
    print(f"largest |difference|: {worst:.4f} % (tolerance {a.tolerance} %)")
    sys.exit(0 if worst <= a.tolerance else 1)


if __name__ == "__main__":
    main()
