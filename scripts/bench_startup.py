"""Start-up time of llamalocal's header-only commands and of `generate`, against llama-cpp-python.

For a LLaMA-7B-shaped GGUF with a 32000-token vocabulary and a Llama-3-8B-shaped one with its
128256 tokens and 280147 merges (scripts/synth_gguf.py, q4_0; `--layers`: 32, the real models'
depth, by default; `--layers 2` shows the fixed overhead at its largest), in the same run and
alternating, several rounds:

- `plan MODEL` and `info MODEL` against a bare `python -c "import llama_cpp"` (goal: <= 3x);
- `generate MODEL -p ... -n 4 --temp 0` against llama-cpp-python used directly with the same
  context, batch and threads (`Llama(...)` + a 4-token greedy completion) (goal: 32k >= 0.95x the
  direct speed, 128k <= 1.1x its time);
- `list` over a folder of 50 GGUFs (goal: well under a second).

Each comparison also prints ours minus the peer in milliseconds. Python modules are byte-compiled
first, as `pip install` does (this sandbox sets PYTHONDONTWRITEBYTECODE, which would otherwise
make every run compile llamalocal's sources again).

    python scripts/bench_startup.py --rounds 5 [--layers 2]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

SHAPES = {  # LLaMA-7B and Llama-3.1-8B
    "32k": dict(n_embd=4096, n_ff=11008, n_head=32, n_vocab=32000),
    "128k": dict(n_embd=4096, n_ff=14336, n_head=32, n_head_kv=8, vocab="llama-bpe", n_ctx=131072),
}
CTX, THREADS, PROMPT = 512, 2, "Once upon a time"

DIRECT = """
import sys, llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx={ctx}, n_batch=512, n_ubatch=512, n_threads={threads},
                      n_threads_batch={threads}, verbose=False)
for _ in llm.create_completion({prompt!r}, max_tokens=4, temperature=0.0, top_k=1, repeat_penalty=1.0,
                               stream=True):
    pass
"""


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed:\n{r.stderr[-2000:]}")
    return dt


def ll(*args: str) -> list[str]:
    return [sys.executable, "-m", "llamalocal", *args]


def summary(name: str, ours: list[float], peer: list[float], goal: str) -> None:
    ratios = [o / p for o, p in zip(ours, peer, strict=True)]
    extra_ms = [1000 * (o - p) for o, p in zip(ours, peer, strict=True)]
    print(f"{name:<34} ours min {min(ours):6.3f} s med {statistics.median(ours):6.3f} s | peer min {min(peer):6.3f} s "
          f"med {statistics.median(peer):6.3f} s | time ratio min {min(ratios):.2f}x med "
          f"{statistics.median(ratios):.2f}x max {max(ratios):.2f}x best/best {min(ours) / min(peer):.2f}x | "
          f"extra med {statistics.median(extra_ms):+.0f} ms "
          f"({goal})", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/llamalocal-bench-startup"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--layers", type=int, default=32, help="model depth (default 32, as LLaMA-7B and Llama-3-8B)")
    a = ap.parse_args()
    from synth_gguf import make

    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "llamalocal"), str(REPO / "convert")],
                   check=True, stdout=subprocess.DEVNULL)
    a.work.mkdir(parents=True, exist_ok=True)
    models = {}
    for label, shape in SHAPES.items():
        path = a.work / f"startup-{label}-{a.layers}L.gguf"
        if not path.exists():
            print(f"writing {path.name} ...", flush=True)
            make(path, "q4_0", n_layers=a.layers, **shape)
        models[label] = path
        print(f"{label}: {path.name}, {a.layers} layers, {path.stat().st_size / 2**30:.2f} GiB", flush=True)
    folder = a.work / "fifty"
    if not folder.is_dir():
        folder.mkdir()
        small = make(a.work / "small.gguf", "q8_0", n_layers=2, n_embd=256, n_ff=768, n_head=4, n_vocab=32000)
        for i in range(50):
            shutil.copy(small, folder / f"model-{i:02d}.gguf")

    bare = [sys.executable, "-c", "import llama_cpp"]
    for label, path in models.items():
        direct = [sys.executable, "-c", DIRECT.format(ctx=CTX, threads=THREADS, prompt=PROMPT), str(path)]
        gen = ll("generate", str(path), "-p", PROMPT, "-n", "4", "--temp", "0", "--ctx", str(CTX), "--threads",
                 str(THREADS))
        cases = {"plan": (ll("plan", str(path)), bare), "info": (ll("info", str(path)), bare),
                 "generate -n 4": (gen, direct)}
        for name, (ours_cmd, peer_cmd) in cases.items():
            timed(ours_cmd), timed(peer_cmd)  # warm the page cache and Python's bytecode caches
            ours, peer = [], []
            for _ in range(a.rounds):
                ours.append(timed(ours_cmd))
                peer.append(timed(peer_cmd))
            goal = "goal <= 3x a bare import" if name != "generate -n 4" else (
                "goal <= 1.05x (>= 0.95x the speed)" if label == "32k" else "goal <= 1.1x")
            summary(f"{label} {name} vs {'import llama_cpp' if peer_cmd is bare else 'direct'}", ours, peer, goal)
    times = [timed(ll("list", "--models-dir", str(folder))) for _ in range(a.rounds)]
    print(f"list over 50 GGUFs: min {min(times):.3f} s, median {statistics.median(times):.3f} s "
          "(goal: well under a second)")


if __name__ == "__main__":
    main()
