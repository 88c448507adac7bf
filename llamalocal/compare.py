"""Several quantizations of one model side by side: what each preset costs in quality and buys in size.

For every file: size, bits per weight, whether it was quantized with an importance matrix (and
on which text), perplexity (as `perplexity` computes it) and its change against BASE, the mean KL divergence KL(base ‖ other) of the next-token distributions over the
scored tokens, top-1 agreement with BASE (the fraction of scored positions whose most likely
token is the same), and generation tokens/s from a short tg run (`bench`'s definition).

BASE is evaluated first and its log-probabilities at the scored positions are kept in a
temporary file (scored tokens × vocabulary × 4 bytes), so the models are loaded one at a time.
Log-probabilities are kept as float32 on both sides, so a file compared with itself gives a KL of
exactly 0 and 100 % agreement.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from llamalocal.errors import BadInputError
from llamalocal.perplexity import (
    DEFAULT_CTX,
    Running,
    load_for_scoring,
    log_softmax,
    plan_chunks,
    score_windows,
    token_nll,
    tokenize,
)

TG_TOKENS = 32  # a short generation run per file: enough for a rate, cheap next to the scoring
TG_REPETITIONS = 2

# progress(file_index, n_files, file_name, chunks_done, chunks_total)
ProgressFn = Callable[[int, int, str, int, int], None]


@dataclass
class CompareRow:
    """One file's line of the table (and one element of `compare --json`'s "rows")."""

    model: str
    file_type: str
    size_bytes: int  # the file
    n_params: int
    bits_per_weight: float  # 8 * weight bytes / parameters (header and vocabulary not counted)
    ppl: float
    ppl_stderr: float
    ppl_delta: float  # ppl - base ppl
    ppl_delta_pct: float  # 100 * (ppl / base ppl - 1)
    kl_mean: float  # mean KL(base ‖ this), nats
    kl_stderr: float
    top1: float  # fraction of scored tokens whose argmax equals BASE's
    tg_tps: float | None  # generation tokens/s (mean over TG_REPETITIONS runs)
    is_base: bool
    imatrix: str | None = None  # the calibration text of its importance matrix (quantize.imatrix.*), if any

    @property
    def label(self) -> str:
        """The quantization as the table names it: "q4_k_m", or "q4_k_m+imatrix" when calibrated."""
        return f"{self.file_type}+imatrix" if self.imatrix else self.file_type


@dataclass
class CompareResult:
    base: str
    n_ctx: int
    chunks: int
    tokens: int  # scored tokens per file
    rows: list[CompareRow]  # sorted by size, largest first

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------


def _mean_se(total: float, total2: float, n: int) -> tuple[float, float]:
    if n < 1:
        return float("nan"), float("nan")
    mean = total / n
    var = total2 / n - mean * mean
    return mean, math.sqrt(max(var, 0.0) / (n - 1)) if n > 1 else 0.0


def imatrix_of_file(path: Path) -> str | None:
    """What llama-quantize (and `convert --imatrix`) record of the importance matrix a file was
    quantized with: its dataset, else the imatrix file's name; None for a plain quantization."""
    import gguf

    from llamalocal.convert.imatrix_file import KEY_QUANTIZE_DATASET, KEY_QUANTIZE_FILE

    fields = gguf.GGUFReader(str(path), "r").fields
    for key in (KEY_QUANTIZE_DATASET, KEY_QUANTIZE_FILE):
        if key in fields:
            return str(fields[key].contents())
    return None


def _tg_rate(llm: Any, n_gen: int, threads: int | None) -> float | None:
    from llamalocal.bench import bench_loaded

    if n_gen <= 0:
        return None
    _, tg = bench_loaded(llm, n_prompt=0, n_gen=n_gen, repetitions=TG_REPETITIONS, threads=threads)
    return tg.mean if tg is not None else None


@dataclass
class _Scored:
    model: str
    file_type: str
    size_bytes: int
    weights_bytes: int
    n_params: int
    run: Running
    imatrix: str | None = None
    kl_sum: float = 0.0
    kl_sum2: float = 0.0
    same_top: int = 0
    tg_tps: float | None = None


class _BaseLogprobs:
    """BASE's float32 log-probabilities at the scored positions, one .npy per chunk in a temp folder,
    and its argmax tokens; the other files are measured against them chunk by chunk."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.top: dict[int, Any] = {}

    def _file(self, chunk: int) -> Path:
        return self.folder / f"chunk-{chunk:06d}.npy"

    def put(self, chunk: int, logprobs: Any, top: Any) -> None:
        import numpy as np

        np.save(self._file(chunk), logprobs)
        self.top[chunk] = top

    def measure(self, chunk: int, logprobs: Any, top: Any, s: _Scored) -> None:
        """Add KL(base ‖ this) per token and the top-1 matches of one chunk to `s`."""
        import numpy as np

        lb = np.load(self._file(chunk), mmap_mode="r").astype(np.float64)
        kl = (np.exp(lb) * (lb - logprobs.astype(np.float64))).sum(axis=1)  # (n_scored,)
        s.kl_sum += float(kl.sum())
        s.kl_sum2 += float((kl * kl).sum())
        s.same_top += int((top == self.top[chunk]).sum())


def _evaluate(path: Path, text: bytes, *, n_ctx: int, chunks: int | None, base: _BaseLogprobs,
              base_tokens: list[int] | None, n_gpu_layers: int | str, threads: int | None, tg_tokens: int,
              on_chunk: Callable[[int, int], None], log: Callable[[str], None] | None
              ) -> tuple[_Scored, list[int]]:
    """Score one file on the windows of `text`; the first (base_tokens None) fills `base`, the others
    are measured against it. Returns the scores and the file's tokens."""
    import numpy as np

    from llamalocal.model_desc import read_model_desc

    desc = read_model_desc(path)
    loaded = load_for_scoring(path, n_ctx=n_ctx, n_gpu_layers=n_gpu_layers, threads=threads, log=log)
    llm = loaded.llm
    try:
        tokens = tokenize(llm, text)
        if base_tokens is not None and tokens != base_tokens:
            raise BadInputError(f"{path.name} tokenizes the text differently from the base model; "
                                "compare only quantizations of the same model")
        n_chunks = plan_chunks(len(tokens), n_ctx, chunks)
        s = _Scored(model=str(path), file_type=desc.file_type, size_bytes=path.stat().st_size,
                    weights_bytes=desc.weights_bytes, n_params=desc.n_params, run=Running(),
                    imatrix=imatrix_of_file(path))
        for w in score_windows(llm, tokens, n_ctx, n_chunks):
            lp = log_softmax(w.logits).astype(np.float32)  # (n_scored, n_vocab), float32 on both sides
            s.run.add(token_nll(lp.astype(np.float64), w.targets))
            top = w.logits.argmax(axis=1)
            if base_tokens is None:
                base.put(w.index, lp, top)
            else:
                base.measure(w.index, lp, top, s)
            on_chunk(w.index + 1, n_chunks)
        if base_tokens is None:
            s.same_top = s.run.count  # the base against itself, by definition
        s.tg_tps = _tg_rate(llm, tg_tokens, threads)
        return s, tokens
    finally:
        llm.close()


def compare(base: str | Path, others: Sequence[str | Path], text: bytes, *, n_ctx: int = DEFAULT_CTX,
            chunks: int | None = None, n_gpu_layers: int | str = "auto", threads: int | None = None,
            tg_tokens: int = TG_TOKENS, progress: ProgressFn | None = None,
            log: Callable[[str], None] | None = None) -> CompareResult:
    """Evaluate BASE and each of `others` on the same text and windows.

    Args:
        base: the reference GGUF (usually f16 or f32).
        others: the files to judge against it (the same file may be given to check the method).
        text: the evaluation text (see perplexity.read_text).
        n_ctx, chunks: as for `perplexity`.
        tg_tokens: tokens per generation run for the tokens/s column (0 skips it).
        progress: called after each window with (file number, files, file name, done, total).
        log: receives the runner's messages (each file's placement plan).

    Returns:
        CompareResult with one row per file, sorted by size (largest first).

    Raises:
        BadInputError: no files to compare, a text too short, files with different tokenizers.
    """
    paths = [Path(base)] + [Path(o) for o in others]
    if len(paths) < 2:
        raise BadInputError("give BASE and at least one other file to compare with it")
    for p in paths:
        if not p.is_file():
            raise BadInputError(f"no such model file: {p}")
    if tg_tokens < 0:
        raise BadInputError(f"--tg-tokens must be 0 or more (got {tg_tokens})")

    scored: list[_Scored] = []
    with tempfile.TemporaryDirectory(prefix="llamalocal-compare-") as tmp:
        store = _BaseLogprobs(Path(tmp))
        base_tokens: list[int] | None = None
        for i, p in enumerate(paths):
            def on_chunk(done: int, total: int, i: int = i, p: Path = p) -> None:
                if progress is not None:
                    progress(i + 1, len(paths), p.name, done, total)

            s, tokens = _evaluate(p, text, n_ctx=n_ctx, chunks=chunks, base=store, base_tokens=base_tokens,
                                  n_gpu_layers=n_gpu_layers, threads=threads, tg_tokens=tg_tokens,
                                  on_chunk=on_chunk, log=log)
            base_tokens = base_tokens or tokens
            scored.append(s)
    per_chunk = n_ctx - 1 - n_ctx // 2
    return CompareResult(base=str(paths[0]), n_ctx=n_ctx, chunks=scored[0].run.count // per_chunk,
                         tokens=scored[0].run.count, rows=_rows(scored))


def _rows(scored: list[_Scored]) -> list[CompareRow]:
    base_ppl = scored[0].run.ppl()
    rows = []
    for i, s in enumerate(scored):
        n = s.run.count
        kl, kl_se = (0.0, 0.0) if i == 0 else _mean_se(s.kl_sum, s.kl_sum2, n)
        ppl = s.run.ppl()
        rows.append(CompareRow(
            model=s.model, file_type=s.file_type, size_bytes=s.size_bytes, n_params=s.n_params,
            bits_per_weight=8 * s.weights_bytes / s.n_params if s.n_params else float("nan"),
            ppl=ppl, ppl_stderr=s.run.ppl_stderr(), ppl_delta=ppl - base_ppl,
            ppl_delta_pct=100 * (ppl / base_ppl - 1), kl_mean=kl, kl_stderr=kl_se,
            top1=s.same_top / n if n else float("nan"), tg_tps=s.tg_tps, is_base=i == 0, imatrix=s.imatrix))
    return sorted(rows, key=lambda r: (-r.size_bytes, not r.is_base))
