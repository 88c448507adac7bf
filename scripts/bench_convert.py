"""Conversion speed and memory: `llamalocal convert --q4_0` against llama.cpp's own pipeline.

The peer is what a llama.cpp user runs on a Meta download:

- LLaMA-1/Llama-2 (`--family llama1`, the default): `examples/convert_legacy_llama.py` (from the
  llama-cpp-python source distribution) to an f16 GGUF, then `llama_model_quantize` to q4_0.
  Synthetic checkpoint with LLaMA-7B tensor shapes (dim 4096, FFN 11008, 32 heads, vocab 32000,
  fp16; 16 layers by default).
- Llama-3.x (`--family llama3`): llama.cpp has no converter for Meta's Llama-3 layout; its
  maintainers send users through transformers' `convert_llama_weights_to_hf.py` (from the last
  transformers 4.x wheel that ships it, 4.47.1) to a Hugging Face folder, then the sdist's
  `convert_hf_to_gguf.py --outtype f16`, then `llama_model_quantize`. Those run in a separate
  venv (torch 2.13.0 CPU, transformers 4.57.6 as the sdist's requirements pin it), made once under
  the peer cache. Synthetic checkpoint with Llama-3.1-8B tensor shapes (dim 4096, FFN 14336, 32
  heads, 8 KV heads, vocab 128256, bf16 as Meta ships it, Meta's real tokenizer; 8 layers by
  default, as the peer holds the whole checkpoint in RAM twice).

Both pipelines run in the same session on the same checkpoint, each step as a child process whose
wall time and peak RSS (VmHWM, polled) are measured, alternating for --rounds rounds so that a
noisy neighbour shows as spread rather than as one lucky or unlucky figure. Every step writes a
new file, as a first conversion does (no step pays for freeing an earlier run's output). At the
end the two q4_0 files are compared tensor by tensor.

    python scripts/bench_convert.py                    # LLaMA-7B shapes, 16 layers (~6.5 GB fp16)
    python scripts/bench_convert.py --layers 4 --work /tmp/bc
    python scripts/bench_convert.py --family llama3    # Llama-3.1-8B shapes, 8 layers (~5.6 GB bf16)
    python scripts/bench_convert.py --family llama3 --layers 1 --rounds 1   # a quick smoke run
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from peer_tools import cache_dir, llama_cpp_source  # noqa: E402

# The Llama-3 peer's venv: what the sdist's requirements-convert_hf_to_gguf.txt pins, except torch,
# which is the CPU build this project tests with; accelerate for the HF script's low-memory load.
HF_PEER_PACKAGES = ["torch==2.13.0", "transformers==4.57.6", "numpy~=2.2.6", "sentencepiece>=0.1.98,<0.3.0",
                    "protobuf>=4.21.0,<5.0.0", "tiktoken", "accelerate"]
HF_SCRIPT_WHEEL = "transformers==4.47.1"  # the last 4.x wheel with models/llama/convert_llama_weights_to_hf.py
HF_SCRIPT = "transformers/models/llama/convert_llama_weights_to_hf.py"


def run_measured(cmd: list[str], env: dict | None = None) -> tuple[float, int]:
    """Run `cmd`; return (wall seconds, peak RSS bytes of that child)."""
    from llamalocal.procstat import run_measured as run

    r = run(cmd, env=env)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} ... failed:\n{r.stderr[-3000:]}")
    return r.seconds, r.peak_rss


def settle_cache(files: list[Path], cold: bool) -> str:
    """Put both pipelines in the same starting state: the checkpoint not in the page cache (drop
    caches; needs root) or, where that is not allowed or `cold` is off, entirely in it — and, where
    caches can be dropped, nothing else in it (earlier runs' outputs and other files would compete
    with the checkpoint for memory and push parts of it out mid-run)."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        if cold:
            return "cold page cache"
    except OSError:
        pass
    for f in files:
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass
    return "warm page cache"


def hf_peer() -> tuple[Path, Path]:
    """(python of the peer venv, transformers' convert_llama_weights_to_hf.py), made once in the cache."""
    root = cache_dir() / "hf-peer"
    py, script = root / "venv" / "bin" / "python", root / "convert_llama_weights_to_hf.py"
    if not py.is_file():
        print(f"creating the Llama-3 peer venv in {root / 'venv'} ({', '.join(HF_PEER_PACKAGES)}) ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", *HF_PEER_PACKAGES], check=True)
    if not script.is_file():
        wheels = root / "wheels"
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", HF_SCRIPT_WHEEL, "-d", str(wheels)],
                       check=True)
        wheel = next(wheels.glob("transformers-*.whl"))
        with zipfile.ZipFile(wheel) as z:
            script.write_bytes(z.read(HF_SCRIPT))
    return py, script


def llama3_tokenizer() -> Path:
    """Meta's Llama-3 tokenizer.model: ../shared's copy, else the identical one llama-models ships."""
    from llamalocal.convert.sample import llama3_tokenizer_file

    found = llama3_tokenizer_file(REPO.parent / "shared/fixtures/llama3-tokenizer/tokenizer.model")
    if found is None:
        raise SystemExit("no Llama-3 tokenizer.model: ../shared is absent and llama-models is not installed")
    return found


def compare_outputs(ours: Path, peer: Path) -> str:
    """How many tensors of the two q4_0 files hold the same bytes (by name)."""
    import gguf
    import numpy as np

    a = {t.name: t for t in gguf.GGUFReader(str(ours)).tensors}
    b = {t.name: t for t in gguf.GGUFReader(str(peer)).tensors}
    same = [n for n in a if n in b and a[n].tensor_type == b[n].tensor_type
            and np.array_equal(np.asarray(a[n].data).view(np.uint8), np.asarray(b[n].data).view(np.uint8))]
    only = sorted(set(a) ^ set(b))
    return (f"{len(same)} of {len(a)} tensors byte-identical to the peer's"
            + (f"; in one file only: {only[:4]}" if only else "")
            + (f"; differing: {sorted(set(a) & set(b) - set(same))[:4]}" if len(same) < len(set(a) & set(b)) else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=["llama1", "llama3"], default="llama1",
                    help="llama1: LLaMA-7B shapes vs convert_legacy_llama.py; llama3: Llama-3.1-8B shapes vs "
                    "transformers' converter + convert_hf_to_gguf.py")
    ap.add_argument("--layers", type=int, default=None, help="default 16 (llama1) or 8 (llama3)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/llamalocal-bench-convert"))
    ap.add_argument("--sdist", type=Path, default=None,
                    help="an already downloaded llama-cpp-python sdist (tarball or folder); default: fetched once by pip")
    ap.add_argument("--tokenizer", type=Path, default=None,
                    help="llama1: a 32000-piece tokenizer.model (default ../shared's, else one is trained, with a "
                    "smaller vocab); llama3: Meta's Llama-3 tokenizer.model (default ../shared's or llama-models')")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--rounds", type=int, default=3, help="measure both pipelines this many times (default 3)")
    ap.add_argument("--warm", action="store_true", help="start each run with the checkpoint in the page cache "
                    "(default: dropped from it, as after a download or reboot, where permitted)")
    ap.add_argument("--load", type=int, default=0, metavar="N",
                    help="keep N busy processes running through every measurement (other work on the machine)")
    a = ap.parse_args()

    from llamalocal.convert.params import ModelParams
    from llamalocal.convert.sample import SampleSpec, build_sample

    llama3 = a.family == "llama3"
    layers = a.layers or (8 if llama3 else 16)
    llama_cpp_src = llama_cpp_source(a.sdist)
    a.work.mkdir(parents=True, exist_ok=True)
    if llama3:
        name, shapes, dtype = "Llama3.1-8B", "Llama-3.1-8B shapes", "bf16"
        p = ModelParams(dim=4096, n_layers=layers, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=1024,
                        ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True)
        spec, tok = SampleSpec(params=p, dtype=dtype), a.tokenizer or llama3_tokenizer()
    else:
        name, shapes, dtype = "7B", "LLaMA-7B shapes", "fp16"
        p = ModelParams(dim=4096, n_layers=layers, n_heads=32, multiple_of=256, norm_eps=1e-6)
        default_tok = REPO.parent / "shared/fixtures/llama-tokenizer/tokenizer.model"
        spec, tok = SampleSpec(params=p, vocab_size=8000), a.tokenizer or (default_tok if default_tok.is_file() else None)
    model = a.work / name
    if not (model / "params.json").is_file():
        print(f"building a checkpoint with {shapes} and {layers} layers in {model} ...", file=sys.stderr)
        build_sample(a.work, name, spec, tokenizer=tok)
    ckpt_bytes = sum(f.stat().st_size for f in model.glob("consolidated.*.pth"))
    for f in a.work.glob("*.gguf"):
        f.unlink()

    ours_out, peer_f16, peer_q4 = a.work / "ours-q4_0.gguf", a.work / "peer-f16.gguf", a.work / "peer-q4_0.gguf"
    shards = sorted(model.glob("consolidated.*.pth"))
    ours_cmd = [sys.executable, "-m", "llamalocal", "convert", str(model), "--q4_0", "--outfile", str(ours_out),
                "--quiet", "--force"]
    env = dict(os.environ, PYTHONPATH=str(llama_cpp_src / "gguf-py"))
    quant = ("import llama_cpp, sys; p = llama_cpp.llama_model_quantize_default_params(); "
             "p.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0; "
             "sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))")
    peer_quantize = ("llama_model_quantize q4_0", [sys.executable, "-c", quant, str(peer_f16), str(peer_q4)], None)
    hf_dir = a.work / "peer-hf"
    if llama3:
        py, script = hf_peer()
        peer_steps = [
            ("transformers convert_llama_weights_to_hf.py", [str(py), str(script), "--input_dir", str(model),
             "--num_shards", str(len(shards)), "--llama_version", "3.1", "--output_dir", str(hf_dir)], None),
            ("convert_hf_to_gguf.py --outtype f16", [str(py), str(llama_cpp_src / "convert_hf_to_gguf.py"),
             str(hf_dir), "--outtype", "f16", "--outfile", str(peer_f16)], env),
            peer_quantize,
        ]
        steps_label = "(hf + f16 + quantize)"
    else:
        peer_steps = [
            ("convert_legacy_llama.py --outtype f16", [sys.executable,
             str(llama_cpp_src / "examples/convert_legacy_llama.py"), str(model), "--outtype", "f16", "--vocab-dir",
             str(a.work), "--outfile", str(peer_f16)], env),
            peer_quantize,
        ]
        steps_label = "(f16 + quantize)"

    gib = 2**30
    # what md5sum hashes: every file checklist.chk and tokenizer_checklist.chk list (the floor of a verified run)
    from llamalocal.convert.checklist import read_checklist

    listed = [model / n for n in read_checklist(model / "checklist.chk")]
    if (a.work / "tokenizer_checklist.chk").is_file():
        listed += [a.work / n for n in read_checklist(a.work / "tokenizer_checklist.chk")]
    md5sum_cmd = ["md5sum", *map(str, listed)]
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(a.load)]
    rows = []  # per round: (ours, ours + md5, md5sum, ours again (verified before), [peer steps])
    for r in range(a.rounds):
        # every step writes a new file, as a first conversion does: replacing a 1.9 GB output frees
        # its blocks inside the rename (0.3 s here), a cost of --force, not of converting
        ours_out.unlink(missing_ok=True)
        cache_state = settle_cache(shards, cold=not a.warm)
        print(f"round {r + 1}/{a.rounds}: llamalocal convert --q4_0 --no-verify ({cache_state}) ...", file=sys.stderr)
        ours = run_measured(ours_cmd + ["--no-verify"])
        ours_out.unlink()
        settle_cache(shards, cold=not a.warm)
        print("  llamalocal convert --q4_0 (with md5 verification, the default; nothing verified before) ...",
              file=sys.stderr)
        with tempfile.TemporaryDirectory() as fresh:
            record_env = dict(os.environ, LLAMALOCAL_CACHE=fresh)
            verified = run_measured(ours_cmd, env=record_env)
            ours_out.unlink()
            settle_cache(shards, cold=not a.warm)
            print("  llamalocal convert --q4_0 again (the download verified by the run before) ...", file=sys.stderr)
            again = run_measured(ours_cmd, env=record_env)
        settle_cache(shards, cold=not a.warm)
        print("  md5sum of the listed files ...", file=sys.stderr)
        md5sum = run_measured(md5sum_cmd)
        peer_q4.unlink(missing_ok=True)
        settle_cache(shards, cold=not a.warm)
        steps = []
        for label, cmd, step_env in peer_steps:
            print(f"  peer: {label} ...", file=sys.stderr)
            steps.append(run_measured(cmd, env=step_env))
        peer_f16.unlink()
        shutil.rmtree(hf_dir, ignore_errors=True)
        rows.append((ours, verified, md5sum, again, steps))
    for b in busy:
        b.kill()

    print(f"\ncheckpoint: {shapes}, {layers} layers, {ckpt_bytes / gib:.2f} GiB {dtype}; "
          f"{os.cpu_count()} CPUs{f', {a.load} busy processes running' if a.load else ''}; every run started with "
          f"a {cache_state}")
    print(f"{'round':>5}{'ours s':>9}{'+md5 s':>9}{'md5sum s':>9}{'peer s':>9}{steps_label:>24}"
          f"{'speed':>8}{'+md5':>7}{'/md5sum':>8}{'ours RSS':>10}{'peer RSS':>10}{'RSS ratio':>10}")
    speeds, verified_speeds, rss_ratios, floor_ratios, again_speeds = [], [], [], [], []
    for i, (ours, verified, md5sum, again, steps) in enumerate(rows, start=1):
        floor_ratios.append(verified[0] / md5sum[0])
        again_speeds.append(sum(s[0] for s in steps) / again[0])
        peer_t, peer_rss = sum(s[0] for s in steps), max(s[1] for s in steps)
        ours_rss = max(ours[1], verified[1], again[1])
        speeds.append(peer_t / ours[0])
        verified_speeds.append(peer_t / verified[0])
        rss_ratios.append(ours_rss / peer_rss)
        parts = "(" + " + ".join(f"{s[0]:.1f}" for s in steps) + ")"
        print(f"{i:>5}{ours[0]:9.1f}{verified[0]:9.1f}{md5sum[0]:9.1f}{peer_t:9.1f}{parts:>24}"
              f"{speeds[-1]:7.2f}x{verified_speeds[-1]:6.2f}x{floor_ratios[-1]:7.3f}x"
              f"{ours_rss / gib:9.2f}G{peer_rss / gib:9.2f}G"
              f"{rss_ratios[-1]:9.3f}x")
    print(f"\nspeed, like for like (--no-verify; the peer verifies no checksums): worst {min(speeds):.2f}x, "
          f"median {statistics.median(speeds):.2f}x the peer (goal >= 3x)")
    print(f"speed with md5 verification of the {ckpt_bytes / gib:.1f} GiB (the default): worst "
          f"{min(verified_speeds):.2f}x, median {statistics.median(verified_speeds):.2f}x")
    print(f"verified conversion vs md5sum of the same files: worst {max(floor_ratios):.3f}x, median "
          f"{statistics.median(floor_ratios):.3f}x md5sum's time (goal <= 1.15x: the hash is the floor); md5sum "
          f"took {min(r[2][0] for r in rows):.1f}-{max(r[2][0] for r in rows):.1f} s")
    print(f"converting the same download again (verified before, not re-hashed): worst {min(again_speeds):.2f}x, "
          f"median {statistics.median(again_speeds):.2f}x the peer")
    print(f"peak RSS: worst {max(rss_ratios):.3f}x the peer's (goal <= 0.25x)")
    print("peak RSS per peer step (worst round): " + ", ".join(
        f"{label} {max(r[4][j][1] for r in rows) / gib:.2f}G" for j, (label, _, _) in enumerate(peer_steps)))
    print(f"output sizes: ours {ours_out.stat().st_size / gib:.3f} GiB, peer {peer_q4.stat().st_size / gib:.3f} GiB")
    print(f"outputs: {compare_outputs(ours_out, peer_q4)}")
    if not a.keep:
        shutil.rmtree(a.work)


if __name__ == "__main__":
    main()
