"""The planner's resident-memory prediction against the measured peak RSS of real runs.

For each shape (model size, vocabulary 32k / Llama-3's 128k, quant type with and without the CPU
repack, context 512 ... 8192), a synthetic GGUF is built (scripts/synth_gguf.py), `llamalocal plan
--json` is asked for its CPU device, and `llamalocal generate` is run twice as a child process whose
peak RSS (VmHWM) is polled: once with a prompt of min(512, ctx) - 8 tokens (compared with the plan's
`start_bytes`) and once with a prompt that fills the context (compared with `total_bytes`, the peak a
long chat or document reaches).

    python scripts/bench_plan.py                  # every shape
    python scripts/bench_plan.py --only 7b2l-q4_0 --work /tmp/bp
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

MiB = 2**20


@dataclass(frozen=True)
class Shape:
    name: str
    ftype: str
    ctx: int
    model: dict
    cache: str = "f16"  # KV cache type; a quantized one runs with flash attention


LLAMA_7B = dict(n_embd=4096, n_ff=11008, n_head=32, n_vocab=32000)
SHAPES = [
    Shape("7b2l-q8_0-ctx512", "q8_0", 512, dict(LLAMA_7B, n_layers=2)),
    Shape("7b2l-q4_0-ctx2048", "q4_0", 2048, dict(LLAMA_7B, n_layers=2)),
    Shape("7b2l-f16-ctx8192", "f16", 8192, dict(LLAMA_7B, n_layers=2, n_ctx=8192)),
    Shape("tiny-gqa-q8_0-ctx4096", "q8_0", 4096, dict(n_layers=4, n_embd=256, n_ff=1024, n_head=4, n_head_kv=2,
                                                       n_vocab=2048)),
    Shape("llama3-1b-2l-f16-ctx1024", "f16", 1024, dict(n_layers=2, n_embd=2048, n_ff=8192, n_head=32, n_head_kv=8,
                                                         vocab="llama-bpe", n_ctx=131072)),
    Shape("llama3-1b-2l-q4_0-ctx4096", "q4_0", 4096, dict(n_layers=2, n_embd=2048, n_ff=8192, n_head=32,
                                                           n_head_kv=8, vocab="llama-bpe", n_ctx=131072)),
    Shape("13b1l-q4_k_m-ctx2048", "q4_k_m", 2048, dict(n_layers=1, n_embd=5120, n_ff=13824, n_head=40,
                                                       n_vocab=32000)),
    Shape("7b2l-q4_0-ctx4096-kv_q8_0", "q4_0", 4096, dict(LLAMA_7B, n_layers=2), cache="q8_0"),
    Shape("llama3-1b-2l-q8_0-ctx2048-kv_q4_0", "q8_0", 2048, dict(n_layers=2, n_embd=2048, n_ff=8192, n_head=32,
                                                                   n_head_kv=8, vocab="llama-bpe", n_ctx=131072),
          cache="q4_0"),
]


def text_for(vocab: str, n_tokens: int) -> str:
    """Text that tokenizes to exactly `n_tokens` tokens after BOS: one byte token per 'a' for the
    byte-fallback vocabulary (plus the dummy-prefix space's 3 bytes); one token per ' a' for Llama 3."""
    if vocab == "llama-bpe":
        return "a" + " a" * (n_tokens - 1)
    return "a" * (n_tokens - 3)


def build(shape: Shape, work: Path) -> Path:
    from synth_gguf import make

    path = work / f"{shape.name.split('-ctx', 1)[0]}.gguf"
    if not path.exists():
        make(path, shape.ftype, **shape.model)
    return path


def plan_cpu(path: Path, ctx: int, threads: int, cache: str = "f16") -> dict:
    out = subprocess.run([sys.executable, "-m", "llamalocal", "plan", str(path), "--ctx", str(ctx), "--threads",
                          str(threads), "--cache-type", cache, "--json"], capture_output=True, text=True,
                         check=True).stdout
    return next(d for d in json.loads(out)["devices"] if d["kind"] == "cpu")


def run_peak(path: Path, ctx: int, threads: int, text: str, cache: str = "f16") -> tuple[int, int]:
    """(peak RSS, prompt tokens) of `llamalocal generate` on `text`."""
    from llamalocal.procstat import run_measured

    r = run_measured([sys.executable, "-m", "llamalocal", "generate", str(path), "-p", text, "-n", "2", "--temp",
                      "0", "--ctx", str(ctx), "--threads", str(threads), "--cache-type", cache])
    if r.returncode != 0:
        raise SystemExit(f"generate failed on {path}:\n{r.stderr[-2000:]}")
    line = next(ln for ln in reversed(r.stderr.splitlines()) if ln.startswith("prompt:"))
    return r.peak_rss, int(line.split()[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/llamalocal-bench-plan"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", nargs="*", default=None, help="shape names (prefixes)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for shape in SHAPES:
        if a.only and not any(shape.name.startswith(o) for o in a.only):
            continue
        path = build(shape, a.work)
        cpu = plan_cpu(path, shape.ctx, a.threads, shape.cache)
        vocab = shape.model.get("vocab", "spm")
        for label, tokens, planned in (("start", min(512, shape.ctx) - 8, cpu["start_bytes"]),
                                       ("full", shape.ctx - 8, cpu["total_bytes"])):
            peak, n = run_peak(path, shape.ctx, a.threads, text_for(vocab, tokens), shape.cache)
            err = (planned - peak) / peak
            rows.append({"shape": shape.name, "at": label, "prompt_tokens": n, "planned": planned, "measured": peak,
                         "error": err})
            print(f"{shape.name:<28} {label:<5} prompt {n:>5}  planned {planned / MiB:8.1f} MiB  measured "
                  f"{peak / MiB:8.1f} MiB  error {err:+6.1%}", flush=True)
    worst = max(abs(r["error"]) for r in rows)
    print(f"worst |error| {worst:.1%} over {len(rows)} runs")
    if a.json:
        print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
