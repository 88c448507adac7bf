"""Calibrated quantization against llama.cpp's own tools: llama-imatrix and llama-quantize --imatrix.

    python scripts/bench_imatrix.py                       # meta-tiny/tiny-v1, the default presets
    python scripts/bench_imatrix.py --model-dir ../shared/fixtures/meta-tiny/tiny-v2 --rounds 5
    python scripts/bench_imatrix.py --presets all         # every quantized preset
    python scripts/bench_imatrix.py --quick               # smoke run: 1 round, 2 presets, few chunks

Builds (or reuses) llama-imatrix and llama-quantize from the pinned sdist (scripts/peer_tools.py)
and, CPU only, with the same threads on both sides:

1. values: the imatrix of the model's f16 GGUF over the calibration text (the first half of the
   text) from `llamalocal imatrix` and from `llama-imatrix -c CTX -b CTX` (one window per decode,
   as llamalocal cuts it): the same weights, the same token counts, every column's mean squared
   activation within 1 % (goal). llama-imatrix's default batch (-b 2048: four windows decoded
   side by side) is compared too, for information: it drops a few tokens where its micro-batches
   get shorter than 16 (llama-imatrix ignores those), which moves some means by up to ~2 %.
2. speed: tokens/s of `llamalocal imatrix` and `llama-imatrix` (default batch), whole commands,
   on the same file and threads, `--rounds` times each (min and median); goal: ours >= 0.8x the
   peer. Measured on the quality model and on a wider synthetic one (--speed-dim/--speed-layers,
   LLaMA's tokenizer when ../shared has it), where the matmuls, not the callback, should dominate.
3. presets: for each, `llamalocal convert MODEL --PRESET --imatrix F` against `llama-quantize
   --imatrix F` of the same weights (our f32 GGUF) with the same file F (ours, so llama-quantize
   also proves it reads our format): same tensor types (goal), identical tensors counted, the
   same quantize.imatrix.* metadata, and perplexity on the held-out second half of the text within
   1 % (goal); next to it the plain (uncalibrated) quantization of the same preset, where llama.cpp
   can make one without an imatrix: perplexity and mean KL divergence from the f16 model.

Exit status 1 when a goal is missed. Timings on a loaded machine are not final; the lead runs the
final table on a quiet one. `--json FILE` writes every figure.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import numpy as np  # noqa: E402
import peer_tools  # noqa: E402

SHARED = REPO.parent / "shared" / "fixtures"
DEFAULT_MODEL = SHARED / "meta-tiny" / "tiny-v1"
DEFAULT_TEXT = SHARED / "meta-tiny" / "heldout.txt"
LLAMA_TOKENIZER = SHARED / "llama-tokenizer" / "tokenizer.model"
DEFAULT_PRESETS = ["q2_k", "q3_k_m", "q4_k_m", "iq3_xxs", "iq2_xs"]
QUANTIZE_KEYS = ("quantize.imatrix.file", "quantize.imatrix.dataset", "quantize.imatrix.entries_count",
                 "quantize.imatrix.chunks_count")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}):\n{(r.stdout + r.stderr)[-3000:]}")
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# setup


def copy_checkpoint(model_dir: Path, work: Path) -> Path:
    """A writable copy of the checkpoint folder with its tokenizer (fixtures are read-only)."""
    dest = work / "ck" / model_dir.name
    shutil.copytree(model_dir, dest)
    for name in ("tokenizer.model", "tokenizer_checklist.chk"):
        for src in (model_dir / name, model_dir.parent / name):
            if src.is_file() and not (dest / name).exists():
                shutil.copy(src, dest.parent / name)
    for p in (work / "ck").rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    return dest


def split_text(text: Path, work: Path) -> tuple[Path, Path]:
    data = text.read_bytes()
    half = len(data) // 2
    cut = data.find(b"\n", half)
    cut = half if cut < 0 else cut + 1
    calib, heldout = work / "calibration.txt", work / "evaluation.txt"
    calib.write_bytes(data[:cut])
    heldout.write_bytes(data[cut:])
    return calib, heldout


def speed_model(work: Path, dim: int, layers: int) -> Path:
    from llamalocal.convert.params import ModelParams
    from llamalocal.convert.sample import SampleSpec, build_sample

    p = ModelParams(dim=dim, n_layers=layers, n_heads=max(1, dim // 128), multiple_of=256, norm_eps=1e-5)
    tok = LLAMA_TOKENIZER if LLAMA_TOKENIZER.is_file() else None
    return build_sample(work / "speed", "wide", SampleSpec(params=p, dtype="f16", vocab_size=512), tokenizer=tok)


# ---------------------------------------------------------------------------------------------
# 1. values


def ours_imatrix_cmd(model: Path, text: Path, out: Path, ctx: int, threads: int, chunks: int | None) -> list[str]:
    cmd = [sys.executable, "-m", "llamalocal", "imatrix", str(model), "-f", str(text), "-o", str(out), "--ctx",
           str(ctx), "--threads", str(threads), "-ngl", "0", "--force", "-q"]
    return cmd + (["--chunks", str(chunks)] if chunks else [])


def peer_imatrix_cmd(exe: Path, model: Path, text: Path, out: Path, ctx: int, threads: int, chunks: int | None,
                     batch: int | None) -> list[str]:
    cmd = [str(exe), "-m", str(model), "-f", str(text), "-o", str(out), "-c", str(ctx), "-t", str(threads),
           "-ngl", "0"]
    if batch:
        cmd += ["-b", str(batch)]
    return cmd + (["--chunks", str(chunks)] if chunks else [])


def compare_values(ours: Path, peer: Path) -> dict:
    from llamalocal.convert.imatrix_file import read_imatrix

    a, b = read_imatrix(ours), read_imatrix(peer)
    if set(a.entries) != set(b.entries):
        return {"same_weights": False, "only_ours": sorted(set(a.entries) - set(b.entries))[:5],
                "only_peer": sorted(set(b.entries) - set(a.entries))[:5]}
    rel = np.concatenate([np.abs(a.importance(n) / b.importance(n) - 1) for n in b.entries])
    counts_equal = all(np.array_equal(a.entries[n].counts, b.entries[n].counts) for n in b.entries)
    return {"same_weights": True, "weights": len(b.entries), "counts_equal": counts_equal,
            "ours_chunks": a.chunk_count, "peer_chunks": b.chunk_count,
            "max_rel": float(rel.max()), "p99_rel": float(np.percentile(rel, 99)), "median_rel": float(np.median(rel))}


# ---------------------------------------------------------------------------------------------
# 2. speed


def speed(label: str, model: Path, text: Path, exe: Path, work: Path, ctx: int, threads: int,
          chunks: tuple[int, int], rounds: int) -> dict:
    """Whole commands at `chunks[1]` windows, and the steady rate from the difference between
    runs of chunks[0] and chunks[1] windows (start-up, model loading and the header parse cancel)."""
    from llamalocal.convert.imatrix_file import read_imatrix

    def tokens_of(path: Path, ours: bool) -> int:
        imx = read_imatrix(path)
        return imx.chunk_count * ctx if ours else max(int(e.counts.max()) for e in imx.entries.values())

    t: dict[str, dict[int, list[float]]] = {"ours": {n: [] for n in chunks}, "peer": {n: [] for n in chunks}}
    n_tok: dict[str, dict[int, int]] = {"ours": {}, "peer": {}}
    for r in range(rounds):  # alternate, so load changes hit both sides alike
        for n in chunks:
            out_o, out_p = work / f"speed-ours-{n}.gguf", work / f"speed-peer-{n}.gguf"
            t["ours"][n].append(timed(ours_imatrix_cmd(model, text, out_o, ctx, threads, n)))
            t["peer"][n].append(timed(peer_imatrix_cmd(exe, model, text, out_p, ctx, threads, n, None)))
            n_tok["ours"][n], n_tok["peer"][n] = tokens_of(out_o, True), tokens_of(out_p, False)
        log(f"  {label} round {r + 1}/{rounds}: " + ", ".join(
            f"{n} chunks ours {t['ours'][n][-1]:.1f} s / llama-imatrix {t['peer'][n][-1]:.1f} s" for n in chunks))
    n0, n1 = chunks
    out: dict = {"model": label, "chunks": list(chunks), "seconds": t, "tokens": n_tok}
    for side in ("ours", "peer"):
        whole = [n_tok[side][n1] / x for x in t[side][n1]]
        steady = [(n_tok[side][n1] - n_tok[side][n0]) / (b - a) for a, b in zip(t[side][n0], t[side][n1], strict=True)
                  if b > a]
        out[f"{side}_whole_tps"] = (max(whole), statistics.median(whole))
        out[f"{side}_steady_tps"] = (max(steady), statistics.median(steady)) if steady else (float("nan"),) * 2
    for kind in ("whole", "steady"):
        o, p = out[f"ours_{kind}_tps"], out[f"peer_{kind}_tps"]
        out[f"ratio_{kind}"] = (o[0] / p[0], o[1] / p[1])
    return out


# ---------------------------------------------------------------------------------------------
# 3. presets


def tensor_types(path: Path) -> dict[str, tuple[int, bytes]]:
    import gguf

    return {t.name: (int(t.tensor_type), np.asarray(t.data).view(np.uint8).tobytes())
            for t in gguf.GGUFReader(str(path)).tensors}


def quantize_fields(path: Path) -> dict:
    import gguf

    f = gguf.GGUFReader(str(path)).fields
    return {k: f[k].contents() for k in QUANTIZE_KEYS if k in f}


def preset_row(preset: str, ckpt: Path, f32: Path, f16: Path, imx: Path, heldout_text: bytes, exe: Path, work: Path,
               ctx: int, threads: int, eval_chunks: int | None) -> dict:
    from llamalocal.compare import compare
    from llamalocal.convert.convert import convert
    from llamalocal.convert.presets import PRESETS

    p = PRESETS[preset]
    ours = convert(ckpt, p, work / f"ours-{preset}-imatrix.gguf", force=True, threads=threads, imatrix=imx).path
    peer = work / f"peer-{preset}-imatrix.gguf"
    timed([str(exe), "--imatrix", str(imx), str(f32), str(peer), preset.upper(), str(threads)])
    a, b = tensor_types(ours), tensor_types(peer)
    same_types = a.keys() == b.keys() and all(a[n][0] == b[n][0] for n in b)
    identical = sum(a[n] == b[n] for n in b if n in a)
    files = [ours, peer]
    if not p.needs_imatrix:
        files.append(convert(ckpt, p, work / f"ours-{preset}.gguf", force=True, threads=threads).path)
    # one pass per file over the held-out windows: perplexity, and KL from the f16 model (paired, so
    # much less noisy than a perplexity difference on a short text)
    result = compare(f16, files, heldout_text, n_ctx=ctx, chunks=eval_chunks, n_gpu_layers=0, threads=threads,
                     tg_tokens=0)
    by_file = {r.model: r for r in result.rows}
    o, q = by_file[str(ours)], by_file[str(peer)]
    plain = by_file.get(str(files[2])) if len(files) > 2 else None
    row: dict = {"preset": preset, "same_types": same_types, "identical_tensors": identical, "tensors": len(b),
                 "same_metadata": quantize_fields(ours) == quantize_fields(peer),
                 "ppl_ours": o.ppl, "ppl_peer": q.ppl, "diff_pct": 100 * (o.ppl / q.ppl - 1),
                 "kl_ours": o.kl_mean, "kl_peer": q.kl_mean,
                 "ppl_plain": plain.ppl if plain else None, "kl_plain": plain.kl_mean if plain else None,
                 "base_ppl": by_file[str(f16)].ppl}
    for f in work.glob(f"*-{preset}*.gguf"):
        f.unlink()
    return row


# ---------------------------------------------------------------------------------------------


def speed_part(a: argparse.Namespace, ckpt: Path, f16: Path, calib: Path, imatrix_exe: Path, work: Path) -> list[dict]:
    from llamalocal.convert.convert import convert

    wide = speed_model(work, a.speed_dim, a.speed_layers)
    wide_f16 = convert(wide, "f16", work / "wide-f16.gguf", force=True, threads=a.threads, verify=False).path
    n0, n1 = (int(x) for x in a.speed_chunks.split(","))
    runs = [speed(ckpt.name, f16, calib, imatrix_exe, work, a.ctx, a.threads, (n0, n1), a.rounds),
            speed(f"wide dim {a.speed_dim} x {a.speed_layers} layers", wide_f16, calib, imatrix_exe, work, a.ctx,
                  a.threads, (n0, n1), a.rounds)]
    print(f"  tokens/s, best and median of the rounds; 'whole': {n1}-chunk commands; 'steady': from the "
          f"{n1} - {n0} chunk difference")
    for s in runs:
        for kind in ("whole", "steady"):
            o, p, r = s[f"ours_{kind}_tps"], s[f"peer_{kind}_tps"], s[f"ratio_{kind}"]
            print(f"  {s['model']:<30} {kind:<6} ours {o[0]:8.1f} ({o[1]:8.1f})  llama-imatrix {p[0]:8.1f} "
                  f"({p[1]:8.1f})  ratio {r[0]:.2f}x ({r[1]:.2f}x)")
    print("  goal: ratio >= 0.8x")
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL, help="a Meta checkpoint folder")
    ap.add_argument("-f", "--text", type=Path, default=DEFAULT_TEXT,
                    help="text: the first half calibrates, the second half evaluates")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--chunks", type=int, default=None, help="calibration windows (default: all that fit)")
    ap.add_argument("--eval-chunks", type=int, default=None, help="perplexity windows (default: all that fit)")
    ap.add_argument("--presets", default=",".join(DEFAULT_PRESETS), help="comma-separated, or 'all'")
    ap.add_argument("--speed-dim", type=int, default=2048)
    ap.add_argument("--speed-layers", type=int, default=4)
    ap.add_argument("--speed-chunks", default="4,12",
                    help="two window counts: whole commands at the second, the steady rate from the difference")
    ap.add_argument("--no-speed", action="store_true", help="skip part 2 (the timings)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 round, 2 presets, few chunks, small speed model")
    ap.add_argument("--work", type=Path, default=None, help="keep the files here (default: a temporary folder)")
    ap.add_argument("--sdist", type=Path, default=None, help="llama-cpp-python sdist for peer_tools")
    ap.add_argument("--json", type=Path, default=None, help="write every figure to this file")
    a = ap.parse_args()
    if a.quick:
        a.rounds, a.chunks, a.eval_chunks = 1, a.chunks or 4, a.eval_chunks or 4
        a.speed_dim, a.speed_layers, a.speed_chunks = min(a.speed_dim, 1024), min(a.speed_layers, 2), "1,3"
        if a.presets == ",".join(DEFAULT_PRESETS):
            a.presets = "q4_k_m,iq2_xs"

    from llamalocal.convert.convert import convert
    from llamalocal.convert.presets import PRESETS

    presets = [p for p in PRESETS if PRESETS[p].quantized] if a.presets == "all" else a.presets.split(",")
    for p in presets:
        if p not in PRESETS or not PRESETS[p].quantized:
            raise SystemExit(f"unknown or unquantized preset {p}")
    if not (a.model_dir / "params.json").is_file() or not a.text.is_file():
        raise SystemExit(f"need a checkpoint folder and a text (got {a.model_dir}, {a.text}); ../shared has both")
    bin_dir = peer_tools.build(a.sdist) if not all(peer_tools.tool(t) for t in peer_tools.TARGETS) else peer_tools.bin_dir()
    imatrix_exe, quantize_exe = bin_dir / "llama-imatrix", bin_dir / "llama-quantize"

    work = a.work or Path(tempfile.mkdtemp(prefix="bench-imatrix-"))
    work.mkdir(parents=True, exist_ok=True)
    ckpt = copy_checkpoint(a.model_dir, work) if not (work / "ck" / a.model_dir.name).exists() else work / "ck" / a.model_dir.name
    calib, heldout = split_text(a.text, work)
    log(f"work folder {work}; converting {ckpt.name} to f16 (imatrix base) and f32 (llama-quantize's input)")
    f16 = convert(ckpt, "f16", work / "model-f16.gguf", force=True, threads=a.threads).path
    f32 = convert(ckpt, "f32", work / "model-f32.gguf", force=True, threads=a.threads).path
    report: dict = {"model": str(a.model_dir), "text": str(a.text), "ctx": a.ctx, "threads": a.threads}
    ok = True

    # 1. values
    ours_imx, peer_imx, peer_default = work / "ours.imatrix.gguf", work / "peer.imatrix.gguf", work / "peer-b2048.imatrix.gguf"
    timed(ours_imatrix_cmd(f16, calib, ours_imx, a.ctx, a.threads, a.chunks))
    timed(peer_imatrix_cmd(imatrix_exe, f16, calib, peer_imx, a.ctx, a.threads, a.chunks, a.ctx))
    timed(peer_imatrix_cmd(imatrix_exe, f16, calib, peer_default, a.ctx, a.threads, a.chunks, None))
    values = compare_values(ours_imx, peer_imx)
    values_default = compare_values(ours_imx, peer_default)
    report["values"], report["values_peer_default_batch"] = values, values_default
    values_ok = values.get("same_weights") and values.get("counts_equal") and values["max_rel"] <= 0.01
    ok &= bool(values_ok)
    print(f"\n1. imatrix values, {ckpt.name} f16, ctx {a.ctx} (mean squared activation per column, ours vs peer)")
    for label, v in (("llama-imatrix -b CTX", values), ("llama-imatrix (default -b 2048)", values_default)):
        if not v.get("same_weights"):
            print(f"  {label}: different weights! only ours {v['only_ours']}, only peer {v['only_peer']}")
            continue
        print(f"  {label:<32} {v['weights']} weights, counts equal: {v['counts_equal']}, chunks {v['ours_chunks']} "
              f"vs {v['peer_chunks']}; relative difference max {100 * v['max_rel']:.4f} %, "
              f"p99 {100 * v['p99_rel']:.4f} %, median {100 * v['median_rel']:.5f} %")
    print(f"  goal (-b CTX): same weights and counts, max within 1 %: {'met' if values_ok else 'MISSED'}")

    # 2. speed
    print(f"\n2. speed: whole commands, {a.threads} threads, {a.rounds} rounds (timings on a loaded machine are not final)")
    if a.no_speed:
        print("  skipped (--no-speed)")
    else:
        report["speed"] = speed_part(a, ckpt, f16, calib, imatrix_exe, work)


    # 3. presets
    print(f"\n3. presets with the imatrix: ours vs llama-quantize --imatrix (same f32 weights, same file), "
          f"perplexity on the held-out half, ctx {a.ctx}")
    print(f"  {'preset':<9} {'types':<6} {'identical':>10} {'meta':<5} {'PPL ours':>10} {'PPL peer':>10} "
          f"{'diff %':>8} │ {'PPL plain':>10} {'calibrated':>10} {'KL plain':>9} {'KL calib.':>9}")
    rows, base_ppl = [], float("nan")
    for preset in presets:
        r = preset_row(preset, ckpt, f32, f16, ours_imx, heldout.read_bytes(), quantize_exe, work, a.ctx, a.threads,
                       a.eval_chunks)
        rows.append(r)
        base_ppl = r["base_ppl"]
        ok &= r["same_types"] and abs(r["diff_pct"]) <= 1.0 and r["same_metadata"]
        plain = "—" if r["ppl_plain"] is None else f"{r['ppl_plain']:.4f}"
        kl_plain = "—" if r["kl_plain"] is None else f"{r['kl_plain']:.5f}"
        print(f"  {preset:<9} {'same' if r['same_types'] else 'DIFF':<6} {r['identical_tensors']:>4}/{r['tensors']:<5} "
              f"{'same' if r['same_metadata'] else 'DIFF':<5} {r['ppl_ours']:>10.4f} {r['ppl_peer']:>10.4f} "
              f"{r['diff_pct']:>+8.4f} │ {plain:>10} {r['ppl_ours']:>10.4f} {kl_plain:>9} {r['kl_ours']:>9.5f}")
    print(f"  f16: PPL {base_ppl:.4f}. Goal: same types and metadata, |diff| within 1 %. Right of │: the same "
          "preset without and with the imatrix (KL: mean KL divergence from f16, nats/token)")
    report["base_ppl"], report["presets"] = base_ppl, rows

    if a.json:
        a.json.write_text(json.dumps(report, indent=2))
    print(f"\n{'all goals met' if ok else 'a goal was MISSED'} (speed is reported, not judged here: see the ratios)")
    if a.work is None:
        shutil.rmtree(work, ignore_errors=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
