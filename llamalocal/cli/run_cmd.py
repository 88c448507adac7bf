"""`llamalocal chat` and `llamalocal generate`: thin over llamalocal.runner and llamalocal.chat."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from llamalocal.cli import keep_until_exit
from llamalocal.cli.common import (
    cache_type_option,
    ctx_option,
    force_option,
    gpu_layers_option,
    models_dir_option,
    rpc_config,
    rpc_options,
    sampling_options,
    threads_option,
)


def _echo_err(msg: str) -> None:
    click.echo(msg, err=True)


def load_options(f: Callable) -> Callable:
    """The placement and loading flags both verbs share."""
    options: list[Callable[[Callable], Callable]] = [
        models_dir_option, gpu_layers_option, ctx_option, threads_option,
        cache_type_option,
        click.option("--mlock", is_flag=True, help="Lock the model in RAM so the OS cannot page it out."),
        force_option, rpc_options, sampling_options,
    ]
    for opt in reversed(options):
        f = opt(f)
    return f


def _load(model: str | None, models_dir: Path | None, *, n_ctx: int | None, threads: int | None,
          n_gpu_layers: int | str, cache_type: str, mlock: bool, force: bool, seed: int, rpc: Any = None) -> Any:
    from llamalocal.paths import resolve_gguf
    from llamalocal.runner import context_size, load_model

    path = resolve_gguf(model, models_dir)
    start = time.perf_counter()
    loaded = load_model(path, n_ctx=n_ctx, n_gpu_layers=n_gpu_layers, threads=threads, force=force,
                        cache_type=cache_type, mlock=mlock, seed=seed, log=_echo_err, rpc=rpc)
    keep_until_exit(loaded)  # the program ends without freeing it: work for nobody
    llm = loaded.llm
    where = (f"layers over {len(loaded.plan.devices)} devices" if loaded.plan is not None and loaded.plan.split
             else f"{loaded.n_gpu_layers} layers on the GPU")
    _echo_err(f"loaded {path.name} in {time.perf_counter() - start:.1f} s: "
              f"{where}, context {context_size(llm)} tokens, {llm.context_params.n_threads} threads")
    return loaded


def _sampling(temp: float, top_p: float, top_k: int, repeat_penalty: float, seed: int) -> Any:
    """The sampling flags; a --repeat-penalty left at its default is no penalty at --temp 0."""
    from click.core import ParameterSource

    from llamalocal.runner import Sampling

    asked = click.get_current_context().get_parameter_source("repeat_penalty") is not ParameterSource.DEFAULT
    return Sampling(temp=temp, top_p=top_p, top_k=top_k, repeat_penalty=repeat_penalty if asked else None,
                    seed=seed)


@click.command()
@click.argument("model", required=False)
@click.option("--system", default=None,
              help="System prompt (Llama 3: a system message; Llama-2 chat: inside <<SYS>>; base models: the preamble).")
@click.option("--template", type=click.Choice(["inst", "llama3", "plain"]), default=None,
              help="Prompt format. Default: from the GGUF: llama3 (Meta's Llama-3 headers) for Llama-3 instruct "
                   "models, inst ([INST]) for Llama-2 models named *chat*, plain dialogue for base models.")
@click.option("-n", "--max-tokens", type=click.IntRange(min=1), default=None,
              help="Longest answer in tokens. Default: until the model ends it or the context is full.")
@load_options
def chat(model: str | None, system: str | None, template: str | None, max_tokens: int | None,
         models_dir: Path | None, n_gpu_layers: int | str, n_ctx: int | None, threads: int | None,
         cache_type: str, mlock: bool, force: bool, rpc_endpoints: str | None, rpc_key_file: Path | None,
         tensor_split: list[float] | None, temp: float, top_p: float, top_k: int,
         repeat_penalty: float, seed: int) -> None:
    """Chat with MODEL (a .gguf, a directory or a name; default: the newest converted model).

    \b
    /reset clears the history, /exit or Ctrl-D leaves, Ctrl-C stops the current answer.
    History is kept within the context; the oldest turns are dropped when it is full.
    """
    from llamalocal.chat import HELP, ChatSession, pick_template, repl

    loaded = _load(model, models_dir, n_ctx=n_ctx, threads=threads, n_gpu_layers=n_gpu_layers,
                   cache_type=cache_type, mlock=mlock, force=force, seed=seed,
                   rpc=rpc_config(rpc_endpoints, rpc_key_file, tensor_split, warn=_echo_err))
    name = loaded.desc.name if loaded.desc is not None else None
    chosen, why = pick_template(template, name, loaded.path, loaded.llm.metadata)
    _echo_err(f"template: {chosen} ({why})")
    _echo_err(HELP)
    session = ChatSession(loaded.llm, chosen, system=system, max_tokens=max_tokens,
                          sampling=_sampling(temp, top_p, top_k, repeat_penalty, seed), on_notice=_echo_err)
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for input())
    repl(session, out=sys.stdout, err=sys.stderr)


@click.command()
@click.argument("model")
@click.option("-p", "--prompt", required=True, help="The prompt; '-' reads it from stdin.")
@click.option("-n", "--max-tokens", type=click.IntRange(min=1), default=256, show_default=True,
              help="Tokens to generate at most (fewer if the model ends the text or the context fills).")
@load_options
def generate(model: str, prompt: str, max_tokens: int, models_dir: Path | None, n_gpu_layers: int | str,
             n_ctx: int | None, threads: int | None, cache_type: str, mlock: bool, force: bool,
             rpc_endpoints: str | None, rpc_key_file: Path | None, tensor_split: list[float] | None, temp: float,
             top_p: float, top_k: int, repeat_penalty: float, seed: int) -> None:
    """Complete PROMPT once with MODEL: the completion alone on stdout, timing on stderr.

    --temp 0 is greedy (argmax at every step; top-k and top-p are not applied, nor a repeat
    penalty unless --repeat-penalty is given) and gives the same text on every run.
    """
    from llamalocal.runner import GenStats, stream_tokens, tokenize_prompt

    if prompt == "-":
        prompt = sys.stdin.read()
    loaded = _load(model, models_dir, n_ctx=n_ctx, threads=threads, n_gpu_layers=n_gpu_layers,
                   cache_type=cache_type, mlock=mlock, force=force, seed=seed,
                   rpc=rpc_config(rpc_endpoints, rpc_key_file, tensor_split, warn=_echo_err))
    llm = loaded.llm
    stats = GenStats()
    out = sys.stdout
    for piece in stream_tokens(llm, tokenize_prompt(llm, prompt), max_tokens=max_tokens,
                               sampling=_sampling(temp, top_p, top_k, repeat_penalty, seed), stats=stats):
        out.write(piece)
        out.flush()
    if out.isatty():
        out.write("\n")
    _echo_err(f"prompt: {stats.n_prompt_eval} tokens in {stats.prompt_s:.2f} s ({stats.pp_tps:.1f} tokens/s); "
              f"generated {stats.n_generated} tokens, {stats.tg_tps:.1f} tokens/s; stop: {stats.stop}")


COMMANDS = [chat, generate]
