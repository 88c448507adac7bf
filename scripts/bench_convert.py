"""Conversion speed and memory: `llamalocal convert --q4_0` against llama.cpp's own pipeline.

The peer is what a llama.cpp user runs on a Meta download: `examples/convert_legacy_llama.py`
(from the llama-cpp-python source distribution) to an f16 GGUF, then `llama_model_quantize` to
q4_0. Both run in the same session on the same synthetic checkpoint with LLaMA-7B tensor shapes
(dim 4096, FFN 11008, 32 heads, vocab 32000; fewer layers), each as a child process whose wall time
and peak RSS (VmHWM, polled) are measured, alternating for --rounds rounds so that a noisy
neighbour shows as spread rather than as one lucky or unlucky figure.

    python scripts/bench_convert.py                    # 16 layers (~6.5 GB fp16 checkpoint)
    python scripts/bench_convert.py --layers 4 --work /tmp/bc
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from peer_tools import llama_cpp_source  # noqa: E402


def run_measured(cmd: list[str], env: dict | None = None) -> tuple[float, int]:
    """Run `cmd`; return (wall seconds, peak RSS bytes of that child)."""
    from llamalocal.procstat import run_measured as run

    r = run(cmd, env=env)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} ... failed:\n{r.stderr[-3000:]}")
    return r.seconds, r.peak_rss


def settle_cache(files: list[Path], cold: bool) -> str:
    """Put both pipelines in the same starting state: the checkpoint not in the page cache (drop
    caches; needs root) or, where that is not allowed, entirely in it."""
    os.sync()
    if cold:
        try:
            Path("/proc/sys/vm/drop_caches").write_text("1\n")
            return "cold page cache"
        except OSError:
            pass
    for f in files:
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass
    return "warm page cache"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--work", type=Path, default=Path("/tmp/llamalocal-bench-convert"))
    ap.add_argument("--sdist", type=Path, default=None,
                    help="an already downloaded llama-cpp-python sdist (tarball or folder); default: fetched once by pip")
    ap.add_argument("--tokenizer", type=Path, default=REPO.parent / "shared/fixtures/llama-tokenizer/tokenizer.model",
                    help="a 32000-piece tokenizer.model (else one is trained, with a smaller vocab)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--rounds", type=int, default=3, help="measure both pipelines this many times (default 3)")
    ap.add_argument("--warm", action="store_true", help="start each run with the checkpoint in the page cache "
                    "(default: dropped from it, as after a download or reboot, where permitted)")
    a = ap.parse_args()

    from llamalocal.convert.params import ModelParams
    from llamalocal.convert.sample import SampleSpec, build_sample

    llama_cpp_src = llama_cpp_source(a.sdist)
    a.work.mkdir(parents=True, exist_ok=True)
    model = a.work / "7B"
    p = ModelParams(dim=4096, n_layers=a.layers, n_heads=32, multiple_of=256, norm_eps=1e-6)
    if not (model / "params.json").is_file():
        print(f"building a LLaMA-7B-shaped checkpoint with {a.layers} layers in {model} ...", file=sys.stderr)
        tok = a.tokenizer if a.tokenizer.is_file() else None
        build_sample(a.work, "7B", SampleSpec(params=p, vocab_size=8000), tokenizer=tok)
    ckpt_bytes = sum(f.stat().st_size for f in model.glob("consolidated.*.pth"))
    for f in a.work.glob("*.gguf"):
        f.unlink()

    ours_out, peer_f16, peer_q4 = a.work / "ours-q4_0.gguf", a.work / "peer-f16.gguf", a.work / "peer-q4_0.gguf"
    shards = sorted(model.glob("consolidated.*.pth"))
    ours_cmd = [sys.executable, "-m", "llamalocal", "convert", str(model), "--q4_0", "--outfile", str(ours_out),
                "--quiet", "--force"]
    env = dict(os.environ, PYTHONPATH=str(llama_cpp_src / "gguf-py"))
    peer_convert = [sys.executable, str(llama_cpp_src / "examples/convert_legacy_llama.py"), str(model),
                    "--outtype", "f16", "--vocab-dir", str(a.work), "--outfile", str(peer_f16)]
    quant = ("import llama_cpp, sys; p = llama_cpp.llama_model_quantize_default_params(); "
             "p.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0; "
             "sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))")
    peer_quantize = [sys.executable, "-c", quant, str(peer_f16), str(peer_q4)]

    gib = 2**30
    rows = []  # per round: (ours, ours + md5, peer convert, peer quantize) as (seconds, peak RSS)
    for r in range(a.rounds):
        cache_state = settle_cache(shards, cold=not a.warm)
        print(f"round {r + 1}/{a.rounds}: llamalocal convert --q4_0 --no-verify ({cache_state}) ...", file=sys.stderr)
        ours = run_measured(ours_cmd + ["--no-verify"])
        settle_cache(shards, cold=not a.warm)
        print("  llamalocal convert --q4_0 (with md5 verification, the default) ...", file=sys.stderr)
        verified = run_measured(ours_cmd)
        settle_cache(shards, cold=not a.warm)
        print("  peer: convert_legacy_llama.py --outtype f16 ...", file=sys.stderr)
        conv = run_measured(peer_convert, env=env)
        print("  peer: llama_model_quantize q4_0 ...", file=sys.stderr)
        q = run_measured(peer_quantize)
        peer_f16.unlink()
        rows.append((ours, verified, conv, q))

    print(f"\ncheckpoint: LLaMA-7B shapes, {a.layers} layers, {ckpt_bytes / gib:.2f} GiB fp16; "
          f"{os.cpu_count()} CPUs; every run started with a {cache_state}")
    print(f"{'round':>5}{'ours s':>9}{'+md5 s':>9}{'peer s':>9}{'(f16 + quantize)':>19}"
          f"{'speed':>8}{'+md5':>7}{'ours RSS':>10}{'peer RSS':>10}{'RSS ratio':>10}")
    speeds, verified_speeds, rss_ratios = [], [], []
    for i, (ours, verified, conv, q) in enumerate(rows, start=1):
        peer_t, peer_rss = conv[0] + q[0], max(conv[1], q[1])
        ours_rss = max(ours[1], verified[1])
        speeds.append(peer_t / ours[0])
        verified_speeds.append(peer_t / verified[0])
        rss_ratios.append(ours_rss / peer_rss)
        print(f"{i:>5}{ours[0]:9.1f}{verified[0]:9.1f}{peer_t:9.1f}{f'({conv[0]:.1f} + {q[0]:.1f})':>19}"
              f"{speeds[-1]:7.2f}x{verified_speeds[-1]:6.2f}x{ours_rss / gib:9.2f}G{peer_rss / gib:9.2f}G"
              f"{rss_ratios[-1]:9.3f}x")
    print(f"\nspeed, like for like (--no-verify; the peer verifies no checksums): worst {min(speeds):.2f}x, "
          f"median {statistics.median(speeds):.2f}x the peer (goal >= 3x)")
    print(f"speed with md5 verification of the {ckpt_bytes / gib:.1f} GiB (the default): worst "
          f"{min(verified_speeds):.2f}x, median {statistics.median(verified_speeds):.2f}x")
    print(f"peak RSS: worst {max(rss_ratios):.3f}x the peer's (goal <= 0.25x)")
    print(f"output sizes: ours {ours_out.stat().st_size / gib:.3f} GiB, peer {peer_q4.stat().st_size / gib:.3f} GiB")
    if not a.keep:
        shutil.rmtree(a.work)


if __name__ == "__main__":
    main()
