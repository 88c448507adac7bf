"""Prompt (pp) and generation (tg) tokens/s of llamalocal's runner against llama-cpp-python used
directly with the same settings, beside the memory-bandwidth bound for generation.

    python scripts/bench_run.py                    # builds a LLaMA-7B-shaped q4_0 test model
    python scripts/bench_run.py --model x.gguf     # a real GGUF
    python scripts/bench_run.py --layers 8 --reps 5 --json

Both sides load the same file with the same n_ctx, n_batch, n_ubatch, threads and GPU layers;
runs alternate (ours, direct, ours, ...) so drift in a shared machine's load hits both alike,
and the median of the repetitions is reported (one warm-up run each is discarded).

- Clock: wall time, or with --cpu-time (and --threads 1) the calling thread's CPU time, which
  other processes on a shared machine cannot inflate.
- pp: a 512-token prompt from an empty cache to its first sampled token (greedy), tokens/s.
- tg: 128 greedy tokens after a short prompt, from the first sampled token to the last:
  decoded tokens / seconds. Direct uses `Llama.create_completion(..., stream=True)`, the way
  llama-cpp-python is used on its own; ours uses `llamalocal.runner.stream_tokens`.
- bound: copy bandwidth (numpy, bytes read + written per second, best of several, with as many
  threads as generation uses) / bytes read per generated token (every weight tensor except the
  token embedding, of which one row is read, plus the KV cache in use).

The test model: LLaMA-7B's shapes (dim 4096, 32 heads, FFN 11008, vocab 32000) with a few
layers of random weights, written as f16 with gguf-py and quantized by llama.cpp's own
llama_model_quantize (q4_0 keeps output.weight at q6_K, as for a real 7B). Cached in --work-dir.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

# LLaMA-7B (Meta's params.json: dim 4096, n_heads 32, multiple_of 256 -> FFN 11008)
DIM, N_HEADS, N_FF, N_VOCAB, N_CTX_TRAIN = 4096, 32, 11008, 32000, 2048


# ---------------------------------------------------------------------------------------------
# the test model
# ---------------------------------------------------------------------------------------------

def _vocab() -> tuple[list[str], list[float], list[int]]:
    """A sentencepiece-shaped vocabulary: <unk> <s> </s>, 256 byte pieces, then word pieces."""
    import gguf

    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
    n_words = N_VOCAB - len(tokens)
    tokens += [f"\u2581w{i}" for i in range(n_words)]
    types += [gguf.TokenType.NORMAL] * n_words
    scores = [0.0] * 259 + [-float(i) for i in range(n_words)]
    return tokens, scores, [int(t) for t in types]


def build_test_model(out: Path, n_layers: int, preset: str = "q4_0", seed: int = 0,
                     say: Callable[[str], None] = print) -> Path:
    """LLaMA-7B shapes, `n_layers` layers of random weights, quantized by llama.cpp to `preset`."""
    import gguf
    import llama_cpp

    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    def rand(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)

    # one random array per shape, shared by every layer: speed does not care, memory does
    wq = rand(DIM, DIM)                  # (out, in) as numpy sees a ggml (in, out) tensor
    w1, w2 = rand(N_FF, DIM), rand(DIM, N_FF)
    norm = np.ones(DIM, dtype=np.float32)
    tok_embeddings, output = rand(N_VOCAB, DIM), rand(N_VOCAB, DIM)

    f16 = out.with_suffix(".f16.tmp")
    w = gguf.GGUFWriter(str(f16), "llama")
    w.add_name(f"bench LLaMA-7B shapes, {n_layers} layers, random")
    w.add_context_length(N_CTX_TRAIN)
    w.add_embedding_length(DIM)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(N_FF)
    w.add_rope_dimension_count(DIM // N_HEADS)
    w.add_head_count(N_HEADS)
    w.add_head_count_kv(N_HEADS)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    tokens, scores, types = _vocab()
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_tensor("token_embd.weight", tok_embeddings)       # tok_embeddings
    for i in range(n_layers):
        for name, t in (("attn_norm", norm), ("attn_q", wq), ("attn_k", wq), ("attn_v", wq),   # attention_norm wq wk wv
                        ("attn_output", wq), ("ffn_norm", norm),                              # wo ffn_norm
                        ("ffn_gate", w1), ("ffn_down", w2), ("ffn_up", w1)):                  # w1 w2 w3
            w.add_tensor(f"blk.{i}.{name}.weight", t)
    w.add_tensor("output_norm.weight", norm)                # norm
    w.add_tensor("output.weight", output)                   # output
    say(f"writing {f16} (f16, {n_layers} layers of LLaMA-7B shapes)")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    say(f"quantizing to {preset} with llama_model_quantize")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{preset.upper()}")
    tmp = out.with_suffix(".tmp")
    rc = llama_cpp.llama_model_quantize(str(f16).encode(), str(tmp).encode(), ctypes.byref(params))
    f16.unlink()
    if rc != 0:
        raise SystemExit(f"llama_model_quantize failed ({rc})")
    tmp.rename(out)
    return out


# ---------------------------------------------------------------------------------------------
# bandwidth and the bound
# ---------------------------------------------------------------------------------------------

def copy_bandwidth(n_threads: int, nbytes: int = 512 * 2**20, reps: int = 5) -> float:
    """Bytes moved (read + written) per second by np.copyto, best of `reps`, split over threads
    (numpy releases the GIL while copying)."""
    src = np.ones(nbytes // 8, dtype=np.float64)
    dst = np.empty_like(src)
    parts = np.array_split(np.arange(src.size), n_threads)
    bounds = [(int(p[0]), int(p[-1]) + 1) for p in parts if p.size]

    def copy(lo: int, hi: int) -> None:
        np.copyto(dst[lo:hi], src[lo:hi])

    best = float("inf")
    for _ in range(reps):
        threads = [threading.Thread(target=copy, args=b) for b in bounds]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best


def bytes_per_token(path: Path, n_ctx_used: int) -> int:
    """Weights read to generate one token, plus the f16 KV cache in use at `n_ctx_used`."""
    from llamalocal.model_desc import read_model_desc

    d = read_model_desc(path)
    embd_row = d.token_embd_bytes // max(d.n_vocab, 1)
    kv = 2 * n_ctx_used * d.n_layers * d.n_head_kv * d.head_dim * 2
    return sum(d.layer_bytes) + d.output_bytes + d.other_bytes + embd_row + kv


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------

@dataclass
class Side:
    pp: list[float]
    tg: list[float]
    tg_tokens: int = 0

    @property
    def pp_median(self) -> float:
        return statistics.median(self.pp)

    @property
    def tg_median(self) -> float:
        return statistics.median(self.tg)

    def summary(self) -> dict:
        return asdict(self) | {"pp_median": self.pp_median, "tg_median": self.tg_median,
                               "pp_best": max(self.pp), "tg_best": max(self.tg)}


def ours_pp(llm, prompt: list[int], clock: Callable[[], float]) -> float:
    from llamalocal.runner import Sampling, stream_tokens

    llm.reset()
    t0 = clock()
    for _ in stream_tokens(llm, prompt, max_tokens=1, sampling=Sampling(temp=0)):
        break
    return len(prompt) / (clock() - t0)


def ours_tg(llm, prompt: list[int], n: int, clock: Callable[[], float]) -> tuple[float, int]:
    from llamalocal.runner import GenStats, Sampling, stream_tokens

    llm.reset()
    stats = GenStats()
    stamps = [clock() for _ in stream_tokens(llm, prompt, max_tokens=n, sampling=Sampling(temp=0), stats=stats)]
    return stats.n_decoded / (stamps[-1] - stamps[0]), stats.n_decoded


def direct_pp(llm, prompt: list[int], clock: Callable[[], float]) -> float:
    llm.reset()
    t0 = clock()
    for _ in llm.create_completion(prompt, max_tokens=1, temperature=0, stream=True):
        break
    return len(prompt) / (clock() - t0)


def direct_tg(llm, prompt: list[int], n: int, clock: Callable[[], float]) -> tuple[float, int]:
    llm.reset()
    # one chunk per token, then a last one carrying only finish_reason: not a token
    stamps = [clock() for chunk in llm.create_completion(prompt, max_tokens=n, temperature=0, stream=True)
              if chunk["choices"][0]["finish_reason"] is None]
    decoded = len(stamps) - 1
    return decoded / (stamps[-1] - stamps[0]), decoded


# ---------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="a GGUF to benchmark (default: build the test model)")
    ap.add_argument("--layers", type=int, default=4, help="layers of the built test model (default 4)")
    ap.add_argument("--preset", default="q4_0", help="quantization of the built test model (default q4_0)")
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/llamalocal-bench"))
    ap.add_argument("--pp", type=int, default=512, help="prompt tokens (default 512)")
    ap.add_argument("--tg", type=int, default=128, help="generated tokens (default 128)")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions per side (default 3)")
    ap.add_argument("--threads", type=int, default=None, help="default: the planner's (physical cores)")
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--n-gpu-layers", default="auto")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time with the calling thread's CPU time instead of the wall clock: immune to other "
                         "processes on a shared machine; needs --threads 1 (ggml then computes in this thread)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    args = ap.parse_args(argv)
    if args.cpu_time and args.threads != 1:
        ap.error("--cpu-time needs --threads 1")
    clock = time.thread_time if args.cpu_time else time.perf_counter

    import llama_cpp

    from llamalocal.runner import load_model

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    path = args.model or build_test_model(args.work_dir / f"llama7b-shapes-{args.layers}L-{args.preset}.gguf",
                                          args.layers, args.preset, say=say)
    ngl = args.n_gpu_layers if args.n_gpu_layers in ("auto", "all") else int(args.n_gpu_layers)
    ours = load_model(path, n_ctx=args.ctx, n_gpu_layers=ngl, threads=args.threads, n_batch=512, log=say)
    cp = ours.llm.context_params
    settings = {"n_ctx": args.ctx, "n_batch": cp.n_batch, "n_ubatch": cp.n_ubatch, "n_threads": cp.n_threads,
                "n_threads_batch": cp.n_threads_batch, "n_gpu_layers": ours.n_gpu_layers}
    direct = llama_cpp.Llama(model_path=str(path), verbose=False, **settings)
    say(f"settings (both): {settings}")

    rng = np.random.default_rng(1)
    n_vocab = ours.llm.n_vocab()
    bos = ours.llm.token_bos()
    pp_prompt = [bos] + rng.integers(259, n_vocab, args.pp - 1).tolist()
    tg_prompt = [bos] + rng.integers(259, n_vocab, 15).tolist()

    a, b = Side([], []), Side([], [])
    for rep in range(args.reps + 1):  # rep 0 warms both up and is discarded
        # who goes first alternates, so a load spike from elsewhere does not always hit the same side
        if rep % 2:
            pa, pb = ours_pp(ours.llm, pp_prompt, clock), direct_pp(direct, pp_prompt, clock)
            (ta, na), (tb, nb) = ours_tg(ours.llm, tg_prompt, args.tg, clock), direct_tg(direct, tg_prompt, args.tg, clock)
        else:
            pb, pa = direct_pp(direct, pp_prompt, clock), ours_pp(ours.llm, pp_prompt, clock)
            (tb, nb), (ta, na) = direct_tg(direct, tg_prompt, args.tg, clock), ours_tg(ours.llm, tg_prompt, args.tg, clock)
        if rep == 0:
            continue
        a.pp.append(pa)
        b.pp.append(pb)
        a.tg.append(ta)
        b.tg.append(tb)
        a.tg_tokens, b.tg_tokens = na, nb
        say(f"rep {rep}: pp ours {pa:.1f} direct {pb:.1f} | tg ours {ta:.2f} direct {tb:.2f} tokens/s")

    bw = max(copy_bandwidth(1), copy_bandwidth(cp.n_threads))
    per_token = bytes_per_token(path, len(tg_prompt) + args.tg // 2)
    bound = bw / per_token
    result = {
        "model": str(path), "file_bytes": path.stat().st_size, "settings": settings, "reps": args.reps,
        "clock": "thread CPU time" if args.cpu_time else "wall",
        "pp_tokens": args.pp, "tg_tokens": args.tg,
        "ours": a.summary(), "direct": b.summary(),
        "pp_ratio": a.pp_median / b.pp_median, "tg_ratio": a.tg_median / b.tg_median,
        "pp_ratio_best": max(a.pp) / max(b.pp), "tg_ratio_best": max(a.tg) / max(b.tg),
        # each repetition's two runs are adjacent in time: the median of their ratios is the least noisy
        "pp_ratio_paired": statistics.median(x / y for x, y in zip(a.pp, b.pp, strict=True)),
        "tg_ratio_paired": statistics.median(x / y for x, y in zip(a.tg, b.tg, strict=True)),
        "copy_bandwidth_gbps": bw / 1e9, "bytes_per_token": per_token, "tg_bound": bound,
        "tg_of_bound": a.tg_median / bound,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"model: {path.name} ({path.stat().st_size / 2**20:.0f} MiB), {settings['n_threads']} threads, "
          f"{settings['n_gpu_layers']} GPU layers, median of {args.reps}, {result['clock']} clock")
    print(f"{'':>6} {'llamalocal':>12} {'direct':>12} {'ratio':>7}   (median; best of {args.reps} in brackets)")
    for key, n in (("pp", args.pp), ("tg", args.tg)):
        ma, mb = getattr(a, f"{key}_median"), getattr(b, f"{key}_median")
        ba, bb = max(getattr(a, key)), max(getattr(b, key))
        print(f"{key + str(n):>6} {ma:>12.2f} {mb:>12.2f} {ma / mb:>7.3f}   tokens/s  "
              f"[{ba:.2f} vs {bb:.2f}: {ba / bb:.3f}]; median of paired ratios {result[key + '_ratio_paired']:.3f}")
    print(f"bound: {bw / 1e9:.1f} GB/s copy bandwidth / {per_token / 1e6:.0f} MB per token = {bound:.1f} tokens/s "
          f"(llamalocal tg at {100 * result['tg_of_bound']:.0f} % of it)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
