"""Prompt-processing and generation speed, measured the way llama.cpp's `llama-bench` does.

pp512: a batch of 512 random tokens (BOS first) decoded from an empty cache, in n_batch pieces.
tg128: 128 tokens decoded one at a time from an empty cache, each followed by a synchronize.
Each test gets one warm-up run (pp: a whole run, tg: one token), then `repetitions` timed runs;
a run's rate is tokens / seconds, and the reported figure is the mean ± sample standard deviation
of those rates, as llama-bench's `avg_ts ± stddev_ts`.

Generation reads every weight once per token, so its ceiling on this machine is
measured copy bandwidth ÷ bytes read per token; `tg_fraction_of_bound` says how close a run came.
The bandwidth is measured here with a multi-threaded numpy copy of buffers larger than the caches
usually are, counted as STREAM's "copy" counts it (bytes read + bytes written).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llamalocal.convert import native
from llamalocal.errors import BadInputError

N_PROMPT = 512  # llama-bench -p default
N_GEN = 128  # llama-bench -n default
REPETITIONS = 5  # llama-bench -r default
BANDWIDTH_MIB = 512  # per copy buffer; well past the L2 and most L3 caches

ProgressFn = Callable[[str], None]


@dataclass
class Rate:
    """Tokens per second over repetitions: mean ± sample sd, and the samples themselves."""

    n_tokens: int
    mean: float
    sd: float
    samples: list[float] = field(default_factory=list)

    @classmethod
    def of(cls, n_tokens: int, seconds: list[float]) -> Rate:
        ts = [n_tokens / s for s in seconds]
        return cls(n_tokens=n_tokens, mean=_mean(ts), sd=_sd(ts), samples=ts)


@dataclass
class BenchResult:
    """What `bench --json` prints (plus `model`, added by the CLI)."""

    threads: int
    n_gpu_layers: int
    model_bytes: int  # all weight bytes (llama_model_size)
    bytes_per_token: int  # weight bytes read per generated token
    n_params: int
    pp: Rate | None
    tg: Rate | None
    bandwidth_gbs: float | None  # measured copy bandwidth, GB/s (1e9)
    tg_bound: float | None  # tokens/s if generation ran at bandwidth_gbs
    tg_fraction_of_bound: float | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _mean(v: list[float]) -> float:
    return sum(v) / len(v) if v else float("nan")


def _sd(v: list[float]) -> float:
    """Sample standard deviation, 0 for fewer than two samples (llama-bench's stdev)."""
    if len(v) < 2:
        return 0.0
    m = _mean(v)
    return math.sqrt(max(sum((x - m) ** 2 for x in v) / (len(v) - 1), 0.0))


# ---------------------------------------------------------------------------------------------
# the two tests, on a loaded llama_cpp.Llama


def run_pp(llm: Any, batch: native.TokenBatch, n_prompt: int, n_batch: int, rng: Any) -> float:
    """One prompt-processing run from an empty cache; seconds."""
    n_vocab, add_bos, bos = native.vocab_info(llm.model)
    tokens = rng.integers(0, n_vocab, size=n_prompt).astype("int32")
    if add_bos:
        tokens[0] = bos
    native.clear_memory(llm.ctx, False)
    t0 = time.perf_counter()
    for b0 in range(0, n_prompt, n_batch):
        part = tokens[b0:b0 + n_batch]
        flags = [False] * len(part)
        flags[-1] = True  # llama_batch_get_one's default: logits of the last token only
        batch.set(part, b0, flags)
        batch.decode(llm.ctx)
    native.synchronize(llm.ctx)
    return time.perf_counter() - t0


def run_tg(llm: Any, batch: native.TokenBatch, n_gen: int, rng: Any) -> float:
    """One generation run from an empty cache, one token per decode; seconds."""
    lc = native.llama()
    n_vocab, add_bos, bos = native.vocab_info(llm.model)
    tokens = rng.integers(0, n_vocab, size=n_gen).astype("int32")
    if add_bos:
        tokens[0] = bos
    native.clear_memory(llm.ctx, False)
    batch.set(tokens[:1], 0, True)
    b, ctx, decode, sync = batch.batch, llm.ctx, lc.llama_decode, lc.llama_synchronize
    toks = tokens.tolist()
    t0 = time.perf_counter()
    for pos in range(n_gen):
        # plain ctypes stores: per token, Python's overhead is counted against the speed
        b.token[0] = toks[pos]
        b.pos[0] = pos
        if decode(ctx, b) != 0:
            batch.decode(ctx)  # raises with the error message
        sync(ctx)
    return time.perf_counter() - t0


def bench_loaded(llm: Any, *, n_prompt: int = N_PROMPT, n_gen: int = N_GEN, repetitions: int = REPETITIONS,
                 threads: int | None = None, warmup: bool = True,
                 progress: ProgressFn | None = None) -> tuple[Rate | None, Rate | None]:
    """pp and tg rates of a loaded model (either test is skipped when its size is 0)."""
    import numpy as np

    if repetitions < 1:
        raise BadInputError(f"--repetitions must be 1 or more (got {repetitions})")
    n_ctx, n_batch, ctx_threads = native.context_counts(llm.ctx)
    if max(n_prompt, n_gen) > n_ctx:
        raise BadInputError(f"the context ({n_ctx}) is smaller than the test ({max(n_prompt, n_gen)} tokens)")
    if threads is not None:
        native.set_threads(llm.ctx, threads)  # as llama-bench: the same for pp and tg
    rng = np.random.default_rng(0)
    say = progress or (lambda _msg: None)
    n_threads = threads or ctx_threads
    with native.TokenBatch(max(n_batch, 1)) as batch, native.cpu_threadpool(llm.ctx, n_threads):
        pp = tg = None
        if n_prompt > 0:
            if warmup:
                say(f"pp{n_prompt}: warm-up")
                run_pp(llm, batch, n_prompt, n_batch, rng)
            secs = []
            for r in range(repetitions):
                say(f"pp{n_prompt}: run {r + 1}/{repetitions}")
                secs.append(run_pp(llm, batch, n_prompt, n_batch, rng))
            pp = Rate.of(n_prompt, secs)
        if n_gen > 0:
            if warmup:
                say(f"tg{n_gen}: warm-up")
                run_tg(llm, batch, 1, rng)
            secs = []
            for r in range(repetitions):
                say(f"tg{n_gen}: run {r + 1}/{repetitions}")
                secs.append(run_tg(llm, batch, n_gen, rng))
            tg = Rate.of(n_gen, secs)
        native.clear_memory(llm.ctx, False)
        return pp, tg


# ---------------------------------------------------------------------------------------------
# the bandwidth bound


def copy_bandwidth(threads: int = 1, mib: int = BANDWIDTH_MIB, repetitions: int = 5) -> float:
    """Memory copy bandwidth in GB/s (bytes read + written per second), best of `repetitions`.

    numpy releases the GIL while copying, so `threads` workers copy their own slices at once,
    as the generation threads read their own rows of each weight.
    """
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    if mib < 1:
        raise BadInputError(f"the bandwidth buffer must be at least 1 MiB (got {mib})")
    n = mib * 1024 * 1024 // 8
    src = np.ones(n, dtype=np.float64)  # touched, so every page is mapped before timing
    dst = np.zeros(n, dtype=np.float64)
    bounds = [(i * n // threads, (i + 1) * n // threads) for i in range(threads)]

    def part(b: tuple[int, int]) -> None:
        np.copyto(dst[b[0]:b[1]], src[b[0]:b[1]])

    best = math.inf
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(part, bounds))  # warm-up
        for _ in range(repetitions):
            t0 = time.perf_counter()
            list(pool.map(part, bounds))
            best = min(best, time.perf_counter() - t0)
    return 2 * n * 8 / best / 1e9


def bytes_per_token(desc: Any) -> int:
    """Weight bytes read per generated token, from a model_desc.ModelDesc: every weight once,
    except tok_embeddings, of which only the token's own row is read."""
    row = desc.token_embd_bytes // desc.n_vocab if desc.n_vocab else desc.token_embd_bytes
    # a tied output matrix is the embedding, read whole for every token
    return desc.weights_bytes - desc.token_embd_bytes + (desc.token_embd_bytes if desc.tied_output else row)


# ---------------------------------------------------------------------------------------------
# the verb


def bench(path: str | Path, *, threads: int | None = None, n_gpu_layers: int | str = "auto",
          n_prompt: int = N_PROMPT, n_gen: int = N_GEN, repetitions: int = REPETITIONS,
          bandwidth_mib: int = BANDWIDTH_MIB, force: bool = False,
          progress: ProgressFn | None = None, log: ProgressFn | None = None, rpc: Any = None) -> BenchResult:
    """Load a GGUF and measure pp / tg like llama-bench, plus the generation bandwidth bound.

    Args:
        path: the GGUF file.
        threads: CPU threads for both tests (default: the plan's / the runner's choice).
        n_gpu_layers: as for `run` (a number, 'auto', 'all').
        n_prompt, n_gen: test sizes (0 skips a test).
        repetitions: timed runs per test, after one warm-up.
        bandwidth_mib: size of each copy buffer for the bandwidth measurement (0 skips it).
        progress: receives "pp512: run 2/5"-style steps; log: the runner's messages (the plan).
        rpc: RPC workers / --tensor-split (llamalocal.rpc.RpcConfig), as for `load_model`.

    Raises:
        BadInputError: sizes out of range; the runner's errors for bad files or placements.
    """
    from llamalocal.model_desc import read_model_desc
    from llamalocal.runner import load_model

    if n_prompt < 0 or n_gen < 0 or (n_prompt == 0 and n_gen == 0):
        raise BadInputError("nothing to measure: give --n-prompt or --n-gen a positive size")
    if bandwidth_mib < 0:
        raise BadInputError(f"--bandwidth-mib must be 0 or more (got {bandwidth_mib})")
    n_batch = max(n_prompt, 1)  # one decode per pp run when it fits, as llama-bench's -b 2048
    loaded = load_model(path, n_ctx=max(n_prompt, n_gen, 16), n_batch=min(n_batch, 2048),
                        n_gpu_layers=n_gpu_layers, threads=threads, force=force, verbose=False, log=log, rpc=rpc)
    llm = loaded.llm
    try:
        # the threads the runner gave the context (the plan's choice unless --threads was given)
        n_threads = threads or int(llm.context_params.n_threads)
        ngl = int(loaded.n_gpu_layers)
        pp, tg = bench_loaded(llm, n_prompt=n_prompt, n_gen=n_gen, repetitions=repetitions,
                              threads=n_threads, progress=progress)
        model_bytes, n_params = native.model_counts(llm.model)
    finally:
        llm.close()
    per_token = bytes_per_token(read_model_desc(path))
    bw = bound = frac = None
    if bandwidth_mib > 0:
        if progress:
            progress("measuring memory copy bandwidth")
        bw = copy_bandwidth(threads=n_threads, mib=bandwidth_mib)
        bound = bw * 1e9 / per_token
        frac = tg.mean / bound if tg is not None else None
    return BenchResult(threads=n_threads, n_gpu_layers=ngl, model_bytes=model_bytes, bytes_per_token=per_token,
                       n_params=n_params, pp=pp, tg=tg, bandwidth_gbs=bw, tg_bound=bound,
                       tg_fraction_of_bound=frac)
