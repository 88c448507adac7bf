"""Perplexity over non-overlapping windows, defined exactly as llama.cpp's `llama-perplexity`.

The text is tokenized once, with BOS when the vocabulary asks for it. It is cut into
`n_ctx`-token windows (chunks); each window is decoded from an empty cache with its first token
replaced by BOS, and only the second half of it is scored — the tokens at positions
`n_ctx/2 + 1 … n_ctx - 1`, each predicted from the logits one position earlier — so every scored
token has at least `n_ctx/2` tokens of context. `n_ctx - 1 - n_ctx/2` tokens are scored per chunk.

    ppl        = exp(mean nll)
    ppl_stderr = ppl * sqrt((mean(nll²) - mean(nll)²) / (count - 1))

(the standard error of mean nll carried through exp), as llama-perplexity prints
"Final estimate: PPL = … +/- …". Log-softmax is computed in numpy in float64.

`score_windows` is the shared engine: `compare` runs it on several files to get KL divergence
and top-1 agreement from the same scored positions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from llamalocal.convert import native
from llamalocal.errors import BadInputError, LlamalocalError

DEFAULT_CTX = 512  # llama-perplexity's default, and the context the published tables use
MAX_BATCH = 512  # tokens per decode when scoring

# progress(chunks_done, chunks_total, ppl_so_far, ppl_stderr_so_far)
ProgressFn = Callable[[int, int, float, float], None]


@dataclass
class PerplexityResult:
    """What `perplexity --json` prints (plus `model`, added by the CLI)."""

    ppl: float
    ppl_stderr: float
    nll: float  # mean negative log-likelihood, nats per token
    n_ctx: int
    chunks: int
    tokens: int  # scored tokens: chunks * (n_ctx - 1 - n_ctx // 2)
    text_tokens: int  # tokens in the whole text, BOS included
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Window:
    """One scored chunk: logits of the scored positions and the tokens they should predict."""

    index: int
    logits: Any  # np.ndarray (n_scored, n_vocab) float32
    targets: Any  # np.ndarray (n_scored,) int


# ---------------------------------------------------------------------------------------------
# text and tokens


def read_text(path: str | Path) -> bytes:
    """The evaluation text as llama.cpp's `-f` reads it: raw bytes, one trailing newline dropped."""
    p = Path(path)
    if not p.is_file():
        raise BadInputError(f"no text file {p}; pass a plain-text file with -f (e.g. wiki.test.raw)")
    data = p.read_bytes()
    return data[:-1] if data.endswith(b"\n") else data


def tokenize(llm: Any, text: str | bytes) -> list[int]:
    """Tokens of `text` with BOS if the model's vocabulary adds one (common_tokenize(..., true))."""
    data = text.encode("utf-8") if isinstance(text, str) else text
    return llm.tokenize(data, add_bos=True, special=False)


def plan_chunks(n_tokens: int, n_ctx: int, chunks: int | None) -> int:
    """How many windows to score; at least two windows' worth of text is required, as in llama.cpp."""
    if n_ctx < 4 or n_ctx % 2:
        raise BadInputError(f"--ctx must be an even number of at least 4 (got {n_ctx})")
    if n_tokens < 2 * n_ctx:
        raise BadInputError(
            f"the text has {n_tokens} tokens; perplexity with --ctx {n_ctx} needs at least {2 * n_ctx}. "
            "Use a longer text or a smaller --ctx"
        )
    n_max = n_tokens // n_ctx
    if chunks is not None and chunks < 1:
        raise BadInputError(f"--chunks must be 1 or more (got {chunks})")
    return n_max if chunks is None else min(chunks, n_max)


# ---------------------------------------------------------------------------------------------
# decoding windows with llama.cpp's batch API


def _decode_window(llm: Any, batch: native.TokenBatch, window: Any, first: int, n_batch: int,
                   n_vocab: int) -> Any:
    """Decode one window from an empty cache; logits (float32) of positions first … len-1."""
    import numpy as np

    native.clear_memory(llm.ctx, True)
    rows = []
    for b0 in range(0, len(window), n_batch):
        part = window[b0:b0 + n_batch]
        n_out = batch.set(part, b0, np.arange(b0, b0 + len(part)) >= first)
        batch.decode(llm.ctx)
        if n_out:
            rows.append(native.last_logits(llm.ctx, n_out, n_vocab))
    return np.concatenate(rows) if len(rows) > 1 else rows[0]


def score_windows(llm: Any, tokens: list[int], n_ctx: int, n_chunks: int) -> Iterator[Window]:
    """Yield, per chunk, the logits that predict the scored half of the window and the targets.

    The context of `llm` must hold `n_ctx` tokens; its n_batch may be smaller (windows are then
    decoded in several batches, as llama-perplexity does).
    """
    import numpy as np

    n_vocab, add_bos, bos = native.vocab_info(llm.model)
    ctx_size, ctx_batch, _ = native.context_counts(llm.ctx)
    n_batch = min(ctx_batch, n_ctx)
    if ctx_size < n_ctx:
        raise LlamalocalError(f"the model was loaded with a context of {ctx_size} tokens, "
                              f"less than the {n_ctx} perplexity needs")
    first = n_ctx // 2
    with native.TokenBatch(n_batch) as batch:
        for i in range(n_chunks):
            start = i * n_ctx
            window = np.array(tokens[start:start + n_ctx], dtype=np.int32)
            if add_bos:
                window[0] = bos  # every window starts like a document
            logits = _decode_window(llm, batch, window, first, n_batch, n_vocab)
            # logits at position p predict token p+1; the last position predicts nothing
            targets = np.asarray(tokens[start + first + 1:start + n_ctx], dtype=np.int64)
            yield Window(index=i, logits=logits[:-1], targets=targets)


# ---------------------------------------------------------------------------------------------
# statistics


def log_softmax(logits: Any) -> Any:
    """Row-wise log-softmax in float64. (n, n_vocab) -> (n, n_vocab)."""
    import numpy as np

    x = np.asarray(logits, dtype=np.float64)
    m = x.max(axis=1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(axis=1, keepdims=True)))


def token_nll(logprobs: Any, targets: Any) -> Any:
    import numpy as np

    return -logprobs[np.arange(len(targets)), targets]


@dataclass
class Running:
    """Running sums for mean nll and its standard error (llama-perplexity's nll, nll2, count)."""

    count: int = 0
    nll: float = 0.0
    nll2: float = 0.0

    def add(self, values: Any) -> None:
        import numpy as np

        v = np.asarray(values, dtype=np.float64)
        self.count += int(v.size)
        self.nll += float(v.sum())
        self.nll2 += float((v * v).sum())

    def mean(self) -> float:
        return self.nll / self.count if self.count else float("nan")

    def ppl(self) -> float:
        return math.exp(self.mean()) if self.count else float("nan")

    def ppl_stderr(self) -> float:
        if self.count < 2:
            return float("nan")
        mean = self.mean()
        var = self.nll2 / self.count - mean * mean
        return self.ppl() * math.sqrt(max(var, 0.0) / (self.count - 1))


# ---------------------------------------------------------------------------------------------
# the verb


def perplexity_of(llm: Any, text: str | bytes, *, n_ctx: int = DEFAULT_CTX, chunks: int | None = None,
                  progress: ProgressFn | None = None) -> PerplexityResult:
    """Perplexity of a loaded model on `text`, scored as llama-perplexity does.

    Args:
        llm: a llama_cpp.Llama whose context holds at least `n_ctx` tokens.
        text: the evaluation text (bytes are tokenized as they are).
        n_ctx: window length in tokens (even).
        chunks: score at most this many windows (default: all that fit in the text).
        progress: called after each window with (done, total, ppl so far, its stderr).

    Returns:
        PerplexityResult.

    Raises:
        BadInputError: the text is shorter than two windows, or the arguments are out of range.
    """
    import time

    t0 = time.perf_counter()
    tokens = tokenize(llm, text)
    n_chunks = plan_chunks(len(tokens), n_ctx, chunks)
    run = Running()
    for w in score_windows(llm, tokens, n_ctx, n_chunks):
        run.add(token_nll(log_softmax(w.logits), w.targets))
        if progress is not None:
            progress(w.index + 1, n_chunks, run.ppl(), run.ppl_stderr())
    return PerplexityResult(ppl=run.ppl(), ppl_stderr=run.ppl_stderr(), nll=run.mean(), n_ctx=n_ctx,
                            chunks=n_chunks, tokens=run.count, text_tokens=len(tokens),
                            seconds=time.perf_counter() - t0)


def load_for_scoring(path: str | Path, *, n_ctx: int, n_gpu_layers: int | str = "auto",
                     threads: int | None = None, force: bool = False,
                     log: Callable[[str], None] | None = None, rpc: Any = None) -> Any:
    """Load a GGUF with a context of `n_ctx` (the runner plans placement). Batches of at most 512
    tokens, llama.cpp's default micro-batch: longer windows are decoded in pieces, as
    llama-perplexity does, rather than growing the compute buffer with the window."""
    from llamalocal.runner import load_model

    return load_model(path, n_ctx=n_ctx, n_batch=min(n_ctx, MAX_BATCH), n_gpu_layers=n_gpu_layers, threads=threads,
                      force=force, verbose=False, log=log, rpc=rpc)


def perplexity(path: str | Path, text: str | bytes, *, n_ctx: int = DEFAULT_CTX, chunks: int | None = None,
               n_gpu_layers: int | str = "auto", threads: int | None = None, force: bool = False,
               progress: ProgressFn | None = None, log: Callable[[str], None] | None = None,
               rpc: Any = None) -> PerplexityResult:
    """Load the GGUF at `path` and compute its perplexity on `text` (see `perplexity_of`).

    `log` receives the runner's messages (the placement plan); `rpc` spreads the layers over RPC
    workers (llamalocal.rpc.RpcConfig), as for `load_model`."""
    loaded = load_for_scoring(path, n_ctx=n_ctx, n_gpu_layers=n_gpu_layers, threads=threads, force=force,
                              log=log, rpc=rpc)
    try:
        return perplexity_of(loaded.llm, text, n_ctx=n_ctx, chunks=chunks, progress=progress)
    finally:
        loaded.llm.close()
