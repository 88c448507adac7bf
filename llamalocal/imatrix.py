"""`llamalocal imatrix`: an importance matrix from calibration text, computed as llama-imatrix does.

The model runs through llama.cpp (llama-cpp-python) with an eval callback on its context: the
scheduler asks, node by node, whether the callback wants a tensor; for the matmuls llama-imatrix
covers (every `blk.*` weight, and `output.weight` with `process_output`; not those over fewer
than 16 tokens) it answers yes, and once ggml has computed the node it receives the matmul's
input activations, src[1] = (tokens, columns) float32, and adds each column's sum of squares to
that weight's entry and the number of tokens to its count.

The text is cut as llama-imatrix cuts it (tools/imatrix/imatrix.cpp of the pinned llama.cpp):
tokenized once with BOS, `n_ctx`-token windows, each decoded from an empty cache with its first
token replaced by BOS and every position's logits requested (so the last layer computes every
token); at least two windows of text. The perplexity shown while it runs is llama-imatrix's: the
second half of each window, as `llamalocal perplexity` scores it.

Speed: the callback is Python, so it does as little as it can. In the ask phase it reads one int
(the op) for most nodes; the sums of squares are one numpy einsum over a view of the activations
(no copy on the CPU); attn_q/attn_k/attn_v (and ffn_gate/ffn_up) share one input, whose sums
are computed once; a persistent ggml threadpool is attached, so the graph pieces between the
callbacks do not start threads each time.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llamalocal.convert import native
from llamalocal.convert.imatrix_file import Imatrix, ImatrixEntry
from llamalocal.errors import BadInputError, LlamalocalError
from llamalocal.perplexity import Running, load_for_scoring, tokenize

DEFAULT_CTX = 512  # llama-imatrix's default window
MIN_TOKENS = 16  # llama-imatrix skips matmuls over fewer tokens ("why are small batches ignored?")
BLOCK_PREFIX = "blk."
OUTPUT = "output.weight"

# progress(chunks_done, chunks_total, ppl_so_far, ppl_stderr_so_far)
ProgressFn = Callable[[int, int, float, float], None]


@dataclass
class ImatrixResult:
    """A calibration run: the statistics and how it went."""

    imatrix: Imatrix
    ppl: float
    ppl_stderr: float
    chunks: int
    n_ctx: int
    tokens: int  # tokens decoded (chunks * n_ctx)
    text_tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run. `partial` holds the windows completed before it (None if none were)."""

    def __init__(self, partial: ImatrixResult | None) -> None:
        super().__init__()
        self.partial = partial


# ---------------------------------------------------------------------------------------------
# collecting


class _Collector:
    """Sums of squares and counts per weight. A window's sums go to `pending` and join the
    totals (float64) only when the window completes, so an interrupted window leaves no trace."""

    def __init__(self, process_output: bool) -> None:
        self.process_output = process_output
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, int] = {}
        self.pending: dict[str, np.ndarray] = {}
        self.pending_counts: dict[str, int] = {}
        self._last: tuple[Any, ...] | None = None  # (src1 address, data address, shape) of the last input
        self._last_sq: np.ndarray | None = None

    def want(self, op: str, name: str, src1: Any) -> bool:
        if op == "MUL_MAT_ID":
            raise LlamalocalError(f"{name} is a mixture-of-experts matmul; llamalocal imatrix handles dense "
                                  "models (LLaMA) only: use llama-imatrix for this one")
        if src1.ne[1] < MIN_TOKENS or src1.type != native.GGML_TYPE_F32:
            return False
        return name.startswith(BLOCK_PREFIX) or (self.process_output and name == OUTPUT)

    def take(self, name: str, x: np.ndarray, src1: int) -> None:
        key = (src1, x.ctypes.data, x.shape)
        if key == self._last and self._last_sq is not None:
            sq = self._last_sq  # attn_k / attn_v after attn_q, ffn_up after ffn_gate: the same input
        else:
            rows = x.reshape(-1, x.shape[-1])  # (tokens, columns); a view when rows are contiguous
            sq = np.einsum("ij,ij->j", rows, rows)
            self._last, self._last_sq = key, sq
        n_rows = x.size // x.shape[-1]
        acc = self.pending.get(name)
        if acc is None:
            self.pending[name] = sq.astype(np.float64)
            self.pending_counts[name] = n_rows
        else:
            if acc.shape != sq.shape:
                raise LlamalocalError(f"{name}: inputs of {sq.size} columns after {acc.size}")
            acc += sq
            self.pending_counts[name] += n_rows

    def new_graph(self) -> None:
        """Before each decode: the same tensor address may hold something else next time."""
        self._last = self._last_sq = None

    def commit(self) -> None:
        for name, acc in self.pending.items():
            if not np.isfinite(acc).all():
                raise LlamalocalError(f"non-finite activations in {name}: the model is damaged "
                                      "(or its weights overflow in this precision)")
            if name in self.sums:
                self.sums[name] += acc
                self.counts[name] += self.pending_counts[name]
            else:
                self.sums[name], self.counts[name] = acc, self.pending_counts[name]
        self.discard()

    def discard(self) -> None:
        self.pending, self.pending_counts = {}, {}
        self.new_graph()

    def imatrix(self, dataset: str, chunks: int, n_ctx: int) -> Imatrix:
        entries = {name: ImatrixEntry(self.sums[name].astype(np.float32).reshape(1, -1),
                                      np.array([self.counts[name]], dtype=np.int64))
                   for name in sorted(self.sums)}
        return Imatrix(entries, [dataset], chunks, n_ctx)


class _CtrlC:
    """Ctrl-C as a flag while llama.cpp computes. Python raises KeyboardInterrupt wherever the main
    thread runs Python next, which is usually inside the eval callback; one raised as the callback
    is entered, before any `try` of its own, is swallowed by ctypes ("Exception ignored"), and the
    run would go on. So SIGINT only sets a flag (and stops the tap, which makes the decode return
    early); the loop raises KeyboardInterrupt itself after the decode."""

    def __init__(self, tap: native.MatmulTap) -> None:
        self.tap = tap
        self.hit = False
        self._previous: Any = None

    def _handle(self, _signum: int, _frame: Any) -> None:
        self.hit = self.tap.stopped = True

    def __enter__(self) -> _CtrlC:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def check(self) -> None:
        if self.hit:
            raise KeyboardInterrupt


# ---------------------------------------------------------------------------------------------
# the run


def _nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits)[target] per row, as llama-imatrix computes it: float32 exponentials
    summed in float64 (a float64 log-softmax of every logit costs more than a small model's decode)."""
    m = logits.max(axis=1, keepdims=True)
    total = np.exp(logits - m).sum(axis=1, dtype=np.float64)
    return np.log(total) + m[:, 0] - logits[np.arange(len(targets)), targets]


def plan_chunks(n_tokens: int, n_ctx: int, chunks: int | None) -> int:
    """How many windows to run: llama-imatrix's rule (at least two windows of text)."""
    if n_ctx < MIN_TOKENS:
        raise BadInputError(f"--ctx must be at least {MIN_TOKENS} (got {n_ctx}): llama.cpp's imatrix ignores "
                            "matmuls over fewer tokens")
    if n_tokens < 2 * n_ctx:
        raise BadInputError(f"the text has {n_tokens} tokens; an imatrix with --ctx {n_ctx} needs at least "
                            f"{2 * n_ctx}. Use a longer text or a smaller --ctx")
    if chunks is not None and chunks < 1:
        raise BadInputError(f"--chunks must be 1 or more (got {chunks})")
    n_max = n_tokens // n_ctx
    return n_max if chunks is None else min(chunks, n_max)


def imatrix_of(llm: Any, text: str | bytes, *, dataset: str, n_ctx: int = DEFAULT_CTX, chunks: int | None = None,
               process_output: bool = False, threads: int | None = None,
               progress: ProgressFn | None = None) -> ImatrixResult:
    """Compute the importance matrix of a loaded model over `text`.

    Args:
        llm: a llama_cpp.Llama with a context of at least `n_ctx` tokens; its context is replaced
            by one with the eval callback, so close the Llama afterwards.
        text: the calibration text.
        dataset: the name recorded in the file (llama-imatrix records the -f path).
        n_ctx: window length in tokens.
        chunks: run at most this many windows (default: all that fit).
        process_output: also collect output.weight (llama-imatrix --process-output).
        threads: CPU threads for the attached threadpool (default: the context's).
        progress: called after each window with (done, total, ppl so far, its stderr).

    Returns:
        ImatrixResult.

    Raises:
        BadInputError: the text is too short for two windows, arguments out of range.
        Interrupted: Ctrl-C; carries the windows completed before it.
    """
    t0 = time.perf_counter()
    n_vocab, add_bos, bos = native.vocab_info(llm.model)
    ctx_size, ctx_batch, ctx_threads = native.context_counts(llm.ctx)
    if ctx_size < n_ctx:
        raise LlamalocalError(f"the model was loaded with a context of {ctx_size} tokens, less than --ctx {n_ctx}")
    n_batch = min(ctx_batch, n_ctx)
    tokens = tokenize(llm, text)
    n_chunks = plan_chunks(len(tokens), n_ctx, chunks)
    first = n_ctx // 2
    collector = _Collector(process_output)
    tap = native.MatmulTap(collector.want, collector.take)
    run, done = Running(), 0

    def result() -> ImatrixResult:
        return ImatrixResult(collector.imatrix(dataset, done, n_ctx), run.ppl(), run.ppl_stderr(), done, n_ctx,
                             done * n_ctx, len(tokens), time.perf_counter() - t0)

    try:
        # flash attention as llama-imatrix has it (auto: on for the CPU); the f16 KV cache is the same
        with native.eval_callback(llm, tap, flash_attn_type=native.FLASH_ATTN_AUTO) as ctx, \
                native.cpu_threadpool(ctx, threads or ctx_threads), native.TokenBatch(n_batch) as batch, \
                _CtrlC(tap) as ctrl_c:
            for i in range(n_chunks):
                window = np.array(tokens[i * n_ctx:(i + 1) * n_ctx], dtype=np.int32)
                if add_bos:
                    window[0] = bos  # every window starts like a document
                native.clear_memory(ctx, True)
                scored = []
                for b0 in range(0, n_ctx, n_batch):
                    part = window[b0:b0 + n_batch]
                    batch.set(part, b0, True)  # every position: the last layer then computes every token
                    collector.new_graph()
                    rc = batch.decode_raw(ctx)
                    ctrl_c.check()  # before anything else: a stopped decode's results are garbage
                    tap.raise_pending()
                    if rc != 0:
                        raise LlamalocalError(f"llama_decode failed with code {rc}; try a smaller --ctx")
                    if b0 + len(part) > first:
                        logits = native.logits_view(ctx, len(part), n_vocab)
                        scored.append(logits[max(0, first - b0):].copy())
                ctrl_c.check()
                collector.commit()
                done += 1
                # logits at p predict token p+1: positions first .. n_ctx-2 are scored
                targets = np.asarray(tokens[i * n_ctx + first + 1:(i + 1) * n_ctx], dtype=np.int64)
                run.add(_nll(np.concatenate(scored)[:-1], targets))
                if progress is not None:
                    progress(done, n_chunks, run.ppl(), run.ppl_stderr())
            ctrl_c.check()  # pressed during the last window's bookkeeping: still an interrupt
    except KeyboardInterrupt:
        collector.discard()
        raise Interrupted(result() if done else None) from None
    return result()


def compute_imatrix(path: str | Path, text: str | bytes, *, dataset: str, n_ctx: int = DEFAULT_CTX,
                    chunks: int | None = None, process_output: bool = False, n_gpu_layers: int | str = "auto",
                    threads: int | None = None, progress: ProgressFn | None = None,
                    log: Callable[[str], None] | None = None) -> ImatrixResult:
    """Load the GGUF at `path` (placement planned as for `perplexity`) and compute its importance
    matrix over `text` (see `imatrix_of`). `log` receives the runner's messages."""
    loaded = load_for_scoring(path, n_ctx=n_ctx, n_gpu_layers=n_gpu_layers, threads=threads, log=log)
    try:
        return imatrix_of(loaded.llm, text, dataset=dataset, n_ctx=n_ctx, chunks=chunks,
                          process_output=process_output, threads=threads or loaded.plan.threads,
                          progress=progress)
    finally:
        loaded.llm.close()


def summary(r: ImatrixResult) -> str:
    """One line for the CLI."""
    ppl = f"PPL {r.ppl:.4f} +/- {r.ppl_stderr:.5f}" if math.isfinite(r.ppl) else "PPL —"
    return (f"{len(r.imatrix.entries)} weights, {r.chunks} chunks of {r.n_ctx} tokens, {ppl}, "
            f"{r.seconds:.1f} s ({r.tokens_per_second:.0f} tokens/s)")


# ---------------------------------------------------------------------------------------------
# convert --calibrate: an imatrix for a Meta checkpoint, from a GGUF of it beside it


CALIBRATION_BASES = ("f16", "q8_0", "f32")  # what an imatrix is computed on, in order of preference
CALIBRATION_MADE = "q8_0"  # what is made when none exists: half of f16, and the same imatrix to ~0.1 %


def imatrix_file_for(model_dir: Path, text_file: Path, chunks: int | None = None) -> Path:
    """Where `convert --calibrate` keeps the imatrix of a checkpoint for a calibration text (the
    whole text, or its first `chunks` windows)."""
    limit = f"-{chunks}chunks" if chunks else ""
    return Path(model_dir) / f"imatrix-{Path(text_file).stem}{limit}.gguf"


def calibration_base(model_dir: Path) -> Path | None:
    """An f16 / q8_0 / f32 GGUF `llamalocal convert` wrote beside the checkpoint, of this model."""
    from llamalocal.convert.convert import default_outfile
    from llamalocal.convert.params import load_params
    from llamalocal.convert.presets import PRESETS
    from llamalocal.model_desc import read_model_desc

    p = load_params(model_dir)
    for name in CALIBRATION_BASES:
        path = default_outfile(model_dir, PRESETS[name])
        if not path.is_file():
            continue
        try:
            desc = read_model_desc(path)
        except LlamalocalError:
            continue  # damaged or partial: not something to calibrate on
        if (desc.n_layers, desc.n_embd, desc.n_head) == (p.n_layers, p.dim, p.n_heads):
            return path
    return None


def calibrate(model_dir: Path, text_file: Path, *, n_ctx: int = DEFAULT_CTX, chunks: int | None = None,
              threads: int | None = None, n_gpu_layers: int | str = "auto", verify: bool = True,
              say: Callable[[str], None] = lambda m: None, convert_progress: Any = None,
              progress: ProgressFn | None = None) -> Path:
    """The imatrix of the checkpoint in `model_dir` for `text_file`, made if need be.

    Reuses an imatrix made earlier for the same text and window; otherwise computes one on an
    f16 / q8_0 GGUF of the model found beside the checkpoint, converting a q8_0 first (and
    keeping it) when there is none. Every step that costs time or disk is announced via `say`.

    Returns:
        The imatrix file (MODEL_DIR/imatrix-<text name>[-<N>chunks].gguf).
    """
    from llamalocal.convert.convert import convert, default_outfile, expected_shapes
    from llamalocal.convert.imatrix_file import read_imatrix, write_imatrix
    from llamalocal.convert.params import load_params
    from llamalocal.convert.presets import PRESETS
    from llamalocal.perplexity import read_text

    model_dir, text_file = Path(model_dir), Path(text_file)
    text = read_text(text_file)  # a missing text is an error now, not after a conversion
    target = imatrix_file_for(model_dir, text_file, chunks)
    if target.is_file():
        try:
            old = read_imatrix(target)
        except BadInputError:
            old = None
        if old is not None and old.datasets == [str(text_file)] and old.chunk_size == n_ctx:
            say(f"using the imatrix made earlier for {text_file} ({target}, {old.chunk_count} chunks of "
                f"{old.chunk_size} tokens); delete it to compute it again")
            return target

    base = calibration_base(model_dir)
    if base is None:
        made = PRESETS[CALIBRATION_MADE]
        p = load_params(model_dir)
        n = sum(math.prod(s) for s in expected_shapes(p, n_vocab=32000).values())
        say(f"no {' / '.join(CALIBRATION_BASES)} GGUF of {model_dir.name} beside it: converting to "
            f"{made.name} first to calibrate on (about {n * made.bits_per_weight / 8 / 2**30:.1f} GiB in "
            f"{model_dir}, kept as {default_outfile(model_dir, made).name} for later runs)")
        base = convert(model_dir, made, verify=verify, threads=threads, progress=convert_progress).path
    say(f"computing an importance matrix of {base.name} over {text_file} (windows of {n_ctx} tokens; "
        "this runs the model over the text once)")
    result = compute_imatrix(base, text, dataset=str(text_file), n_ctx=n_ctx, chunks=chunks,
                             n_gpu_layers=n_gpu_layers, threads=threads, progress=progress)
    write_imatrix(target, result.imatrix)
    say(f"wrote {target}: {summary(result)}")
    return target
