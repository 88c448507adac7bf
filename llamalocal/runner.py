"""Loading a GGUF through llama-cpp-python with the planner's placement, and streaming from it.

CONTRACT (other modules rely on this):

    load_model(path, *, n_ctx=None, n_gpu_layers="auto", threads=None, force=False,
               logits_all=False, cache_type="f16", mlock=False, seed=-1, n_batch=512,
               hardware=None, verbose=False, log=None) -> LoadedModel

LoadedModel has `.llm` (llama_cpp.Llama), `.plan` (llamalocal.planner.Plan or None) and `.path`.
Raises llamalocal.errors.GGUFError / PlanError / ModelNotFoundError / BadInputError for user
mistakes. `log` receives the human messages (the plan, retries); the CLI sends them to stderr.

    stream_tokens(llm, tokens, *, max_tokens, sampling, stats) -> Iterator[str]

streams the completion of a token prompt as text, filling a GenStats with the timings.
"""

from __future__ import annotations

import codecs
import gc
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamalocal.convert import native
from llamalocal.errors import BadInputError, GGUFError, PlanError

DEFAULT_CTX_CAP = 4096  # the model's own context, capped: a 4096-token f16 KV of 70B is 1.25 GiB
CACHE_TYPES = ("f16", "q8_0")


@dataclass
class LoadedModel:
    llm: Any  # llama_cpp.Llama
    plan: Any  # llamalocal.planner.Plan | None
    path: Path
    n_gpu_layers: int = 0  # what was actually loaded (may be below the plan after a failed allocation)
    desc: Any = None  # llamalocal.model_desc.ModelDesc
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

def _ggml_cache_type(cache_type: str) -> int:
    import llama_cpp

    types = {"f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0}
    if cache_type not in types:
        raise BadInputError(f"unknown --cache-type {cache_type!r}; use one of: {', '.join(CACHE_TYPES)}")
    return types[cache_type]


def resolve_ctx(n_ctx: int | None, n_ctx_train: int | None) -> int:
    """The context to run with: the user's if the model supports it, else the model's own (capped)."""
    if n_ctx is not None and n_ctx_train and n_ctx > n_ctx_train:
        raise BadInputError(f"--ctx {n_ctx} is more than this model supports ({n_ctx_train} tokens); "
                            f"use --ctx {n_ctx_train} or less")
    if n_ctx is not None:
        return n_ctx
    return min(n_ctx_train or DEFAULT_CTX_CAP, DEFAULT_CTX_CAP)


def _ubatch(n_batch: int) -> int:
    """The physical batch: llama-cpp-python's 512 at most, so a large logical batch (perplexity
    windows) does not grow the compute buffer."""
    return min(n_batch, 512)


def _fewer_layers(n: int) -> int:
    """The next, smaller offload to try after an allocation failure: a quarter fewer, at least one."""
    return max(0, n - max(1, n // 4))


def load_model(path: str | Path, *, n_ctx: int | None = None, n_gpu_layers: int | str = "auto",
               threads: int | None = None, force: bool = False, logits_all: bool = False,
               cache_type: str = "f16", mlock: bool = False, seed: int = -1, n_batch: int = 512,
               hardware: Any = None, verbose: bool = False,
               log: Callable[[str], None] | None = None) -> LoadedModel:
    """Plan the placement of a GGUF on this machine and load it.

    Args:
        path: the .gguf file.
        n_ctx: context length; None is the model's own, capped at 4096.
        n_gpu_layers: a number (honoured exactly, refused if it cannot fit unless `force`),
            "auto" (the most that fits) or "all".
        threads: CPU threads; None lets the planner choose (physical cores).
        cache_type: KV cache element type, "f16" or "q8_0" (q8_0 halves the KV memory).
        hardware: a `llamalocal.hardware` description to plan for; None detects this machine.
        log: receives the plan and any retry as text (nothing is printed by this function).

    Returns:
        LoadedModel with the llama_cpp.Llama, the Plan used and the layers actually offloaded.

    Raises:
        ModelNotFoundError, GGUFError: the file is missing, not a GGUF, truncated or corrupt.
        BadInputError: a context beyond the model's, an unknown cache type.
        PlanError: the requested placement does not fit and `force` is off, or an explicit
            --n-gpu-layers failed to allocate (auto steps down instead, and says so).
    """
    from llamalocal import hardware as hw_mod
    from llamalocal import planner
    from llamalocal.model_desc import read_model_desc

    say = log or (lambda msg: None)
    p = Path(path)
    type_kv = _ggml_cache_type(cache_type)
    desc = read_model_desc(p)  # missing, not a GGUF, truncated: raised here, before any loading
    ctx = resolve_ctx(n_ctx, desc.n_ctx_train)

    hw = hardware if hardware is not None else hw_mod.detect()
    plan = planner.plan(desc, hw, n_ctx=ctx, n_gpu_layers=n_gpu_layers, cache_type=cache_type,
                        threads=threads, mlock=mlock, n_batch=n_batch, n_ubatch=_ubatch(n_batch))
    planner.check(plan, force)  # refuses with the numbers, before anything is loaded
    say(plan.describe())
    for problem in plan.errors:  # only left when forced
        say(f"warning: {problem}; going ahead because of --force")

    explicit = n_gpu_layers != "auto"  # a number or "all": honoured exactly, never quietly reduced
    layers = int(plan.n_gpu_layers)
    notes: list[str] = []
    while True:
        try:
            llm = _open(p, ctx=ctx, n_gpu_layers=layers, threads=plan.threads, logits_all=logits_all,
                        type_kv=type_kv, flash_attn=cache_type != "f16", mlock=mlock, seed=seed,
                        n_batch=n_batch, verbose=verbose)
            break
        except ValueError as e:  # llama-cpp-python's "Failed to load model" / "Failed to create llama_context"
            if layers == 0:
                raise GGUFError(f"llama.cpp could not load {p} on the CPU ({e}); the file may be corrupt, "
                                "or there is not enough memory for it at --ctx "
                                f"{ctx}: try a smaller --ctx or a smaller preset") from e
            if explicit and not force:
                raise PlanError(
                    f"loading {p.name} with --n-gpu-layers {n_gpu_layers} ({layers} layers on the GPU) failed "
                    f"to allocate ({e}); use fewer layers, or `auto` to let llamalocal find what fits") from e
            gc.collect()  # let the failed attempt's buffers go before the next one
            fewer = _fewer_layers(layers)
            note = (f"loading with {layers} GPU layers failed to allocate memory; "
                    f"retrying with {fewer} ({'CPU only' if fewer == 0 else 'the rest on the CPU'})")
            notes.append(note)
            say(note)
            layers = fewer
    return LoadedModel(llm=llm, plan=plan, path=p, n_gpu_layers=layers, desc=desc, notes=notes)


def _open(path: Path, *, ctx: int, n_gpu_layers: int, threads: int | None, logits_all: bool, type_kv: int,
          flash_attn: bool, mlock: bool, seed: int, n_batch: int, verbose: bool) -> Any:
    import llama_cpp

    return llama_cpp.Llama(
        model_path=str(path), n_ctx=ctx, n_batch=n_batch, n_ubatch=_ubatch(n_batch), n_gpu_layers=n_gpu_layers,
        n_threads=threads, n_threads_batch=threads, logits_all=logits_all, use_mlock=mlock,
        # a quantized V cache needs flash attention in llama.cpp
        type_k=type_kv, type_v=type_kv, flash_attn=flash_attn,
        seed=seed if seed >= 0 else llama_cpp.LLAMA_DEFAULT_SEED, verbose=verbose,
    )


# ---------------------------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------------------------

DEFAULT_REPEAT_PENALTY = 1.1  # llama.cpp's


@dataclass
class Sampling:
    """llama.cpp's sampling knobs with its defaults; temp 0 is plain argmax (greedy): the
    top-k/top-p filters have nothing to do and are left out, and so is the repeat penalty unless
    one is asked for (`repeat_penalty` None: llama.cpp's 1.1 when sampling, none when greedy)."""

    temp: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    repeat_penalty: float | None = None
    seed: int = -1

    @property
    def greedy(self) -> bool:
        return self.temp == 0

    def generate_kwargs(self) -> dict[str, Any]:
        if self.greedy:
            penalty = 1.0 if self.repeat_penalty is None else self.repeat_penalty
            return {"temp": 0.0, "top_k": 1, "top_p": 1.0, "min_p": 0.0, "repeat_penalty": penalty}
        penalty = DEFAULT_REPEAT_PENALTY if self.repeat_penalty is None else self.repeat_penalty
        return {"temp": self.temp, "top_k": self.top_k, "top_p": self.top_p, "repeat_penalty": penalty}


@dataclass
class GenStats:
    """Timings of one completion. Prompt time runs to the first sampled token; generation time
    from there to the last, over the tokens decoded in between."""

    n_prompt: int = 0  # prompt tokens
    n_prompt_eval: int = 0  # of them, evaluated now (the rest were still in the KV cache)
    n_generated: int = 0  # tokens returned (an end-of-sequence token is not one)
    n_decoded: int = 0  # tokens decoded after the first sample
    prompt_s: float = 0.0
    gen_s: float = 0.0
    stop: str = ""  # "eos", "length", "context", "stop", "interrupted"

    @property
    def pp_tps(self) -> float:
        return self.n_prompt_eval / self.prompt_s if self.prompt_s > 0 else 0.0

    @property
    def tg_tps(self) -> float:
        return self.n_decoded / self.gen_s if self.gen_s > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"prompt_tokens": self.n_prompt, "prompt_tokens_evaluated": self.n_prompt_eval,
                "generated_tokens": self.n_generated, "prompt_seconds": round(self.prompt_s, 6),
                "generation_seconds": round(self.gen_s, 6), "prompt_tokens_per_second": round(self.pp_tps, 3),
                "generation_tokens_per_second": round(self.tg_tps, 3), "stop": self.stop}


def context_size(llm: Any) -> int:
    """Tokens the context holds: the n_ctx asked for. llama.cpp pads its KV cache up to a multiple
    of 256 and reports that, but llama-cpp-python's token buffer has the size asked for."""
    return min(llm.n_ctx(), len(llm.input_ids))


def _cached_prefix(llm: Any, tokens: list[int]) -> int:
    """How many leading prompt tokens llama-cpp-python will reuse from its KV cache."""
    n = 0
    for a, b in zip(llm.input_ids[: llm.n_tokens].tolist(), tokens, strict=False):
        if a != b:
            break
        n += 1
    return n - 1 if n == len(tokens) and n > 0 else n  # a fully cached prompt replays its last token


def stream_tokens(llm: Any, tokens: list[int], *, max_tokens: int | None = None,
                  sampling: Sampling | None = None, stats: GenStats | None = None) -> Iterator[str]:
    """Stream the completion of `tokens` (BOS included by the caller) as text.

    Stops at end-of-sequence, after `max_tokens`, or when the context is full. Text is decoded
    as UTF-8 across token boundaries (a character split over byte tokens comes out whole).
    Reuses whatever prefix of `tokens` is still in the model's KV cache.

    Raises:
        BadInputError: the prompt alone fills the context.
    """
    import llama_cpp

    sampling = sampling or Sampling()
    stats = stats if stats is not None else GenStats()
    n_ctx = context_size(llm)
    if len(tokens) >= n_ctx:
        raise BadInputError(f"the prompt is {len(tokens)} tokens but the context holds {n_ctx}; "
                            "shorten it or use a larger --ctx")
    limit = n_ctx - len(tokens)
    if max_tokens is not None:
        limit = min(limit, max_tokens)
    stats.n_prompt = len(tokens)
    stats.n_prompt_eval = len(tokens) - _cached_prefix(llm, tokens)
    if limit <= 0:
        stats.stop = "length"
        return
    llm.set_seed(sampling.seed if sampling.seed >= 0 else llama_cpp.LLAMA_DEFAULT_SEED)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    start = time.perf_counter()
    first = 0.0
    gen = llm.generate(tokens, **sampling.generate_kwargs())
    try:
        for i, token in enumerate(gen):
            now = time.perf_counter()
            if i == 0:
                first = now
                stats.prompt_s = now - start
            else:
                stats.n_decoded = i
                stats.gen_s = now - first
            if native.is_eog(llm.model, token):
                stats.stop = "eos"
                break
            stats.n_generated += 1
            text = decoder.decode(native.token_piece(llm.model, token))  # whole, however long
            if text:
                yield text
            if stats.n_generated >= limit:
                stats.stop = "length" if max_tokens is not None and limit == max_tokens else "context"
                break
        tail = decoder.decode(b"", final=True)
        if tail:
            yield tail
    finally:
        gen.close()


def complete(llm: Any, tokens: list[int], **kwargs: Any) -> tuple[str, GenStats]:
    """The whole completion as one string (see stream_tokens)."""
    stats = GenStats()
    text = "".join(stream_tokens(llm, tokens, stats=stats, **kwargs))
    return text, stats


def tokenize_prompt(llm: Any, prompt: str) -> list[int]:
    """A raw prompt as llama-cpp-python's completion API tokenizes it: BOS, then the text with its
    dummy-prefix space; special-token text in the prompt stays text."""
    return llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=False)
