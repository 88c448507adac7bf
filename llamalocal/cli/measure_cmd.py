"""`perplexity`, `compare`, `bench`, `info`, `list`: choosing a quantization with evidence.

Thin over llamalocal.perplexity / compare / bench / info. Tables and JSON go to stdout; the plan,
progress bars and notes go to stderr.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import click

from llamalocal.cli.common import (
    force_option,
    gpu_layers_option,
    json_option,
    models_dir_option,
    rpc_config,
    rpc_options,
    threads_option,
)
from llamalocal.errors import BadInputError, LlamalocalError


def _err(msg: str) -> None:
    click.echo(msg, err=True)


def _print_json(obj: Any) -> None:
    """Strict JSON on stdout: NaN / infinity (an undefined statistic) become null."""

    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [clean(x) for x in v]
        return v

    click.echo(json.dumps(clean(obj), indent=2, allow_nan=False))


def _eval_ctx_option(f: Any) -> Any:
    # not common.ctx_option: perplexity's window is its own setting with llama-perplexity's default,
    # not "the model's context"
    return click.option("--ctx", "n_ctx", type=click.IntRange(min=4), default=512, show_default=True,
                        help="Window length in tokens (even); the second half of each window is scored.")(f)


def _chunks_option(f: Any) -> Any:
    return click.option("--chunks", type=click.IntRange(min=1), default=None,
                        help="Score at most N windows. Default: all that fit in the text.")(f)


def _text_option(f: Any) -> Any:
    return click.option("-f", "--file", "text_file", required=True,
                        type=click.Path(dir_okay=False, path_type=Path),
                        help="Plain-text file to evaluate on (e.g. wikitext-2's wiki.test.raw).")(f)


def _fmt(v: float | None, spec: str = ".4f") -> str:
    return "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


# ---------------------------------------------------------------------------------------------
# perplexity


@click.command()
@click.argument("model", required=False)
@_text_option
@_eval_ctx_option
@_chunks_option
@threads_option
@gpu_layers_option
@rpc_options
@force_option
@models_dir_option
@json_option
def perplexity(model: str | None, text_file: Path, n_ctx: int, chunks: int | None, threads: int | None,
               n_gpu_layers: int | str, rpc_endpoints: str | None, rpc_key_file: Path | None,
               tensor_split: list[float] | None, force: bool, models_dir: Path | None, as_json: bool) -> None:
    """Perplexity of MODEL on a text, as llama.cpp's llama-perplexity computes it.

    The text is cut into --ctx-token windows; each is decoded from scratch (first token replaced
    by BOS) and its second half scored. Lower is better; compare files only on the same text
    and --ctx.
    """
    from llamalocal.paths import resolve_gguf
    from llamalocal.perplexity import perplexity as run_perplexity
    from llamalocal.perplexity import read_text

    path = resolve_gguf(model, models_dir)
    text = read_text(text_file)
    with _Bar("perplexity") as bar:
        result = run_perplexity(path, text, n_ctx=n_ctx, chunks=chunks, n_gpu_layers=n_gpu_layers,
                                threads=threads, force=force, progress=bar.update_ppl, log=_err,
                                rpc=rpc_config(rpc_endpoints, rpc_key_file, tensor_split, warn=_err))
    if as_json:
        _print_json({"model": str(path), **result.to_json()})
        return
    click.echo(f"{path.name}: PPL = {result.ppl:.4f} +/- {result.ppl_stderr:.5f} "
               f"({result.chunks} chunks of {result.n_ctx} tokens, {result.tokens} scored tokens, "
               f"{result.seconds:.1f} s)")


class _Bar:
    """A tqdm bar on stderr (hidden when stderr is not a terminal) showing the running estimate;
    a new bar per file for `compare`."""

    def __init__(self, desc: str) -> None:
        self.desc = desc
        self.key: tuple[str, int] | None = None
        self.done = 0
        self.bar: Any = None

    def __enter__(self) -> _Bar:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.close()

    def _advance(self, desc: str, done: int, total: int, postfix: str = "") -> None:
        from tqdm import tqdm

        if self.key != (desc, total):
            if self.bar is not None:
                self.bar.close()
            self.bar = tqdm(total=total, desc=desc, unit="chunk", file=sys.stderr, disable=None, leave=True)
            self.key, self.done = (desc, total), 0
        if postfix:
            self.bar.set_postfix_str(postfix, refresh=False)
        self.bar.update(done - self.done)
        self.done = done

    def update_ppl(self, done: int, total: int, ppl: float, stderr: float) -> None:
        self._advance(self.desc, done, total, f"PPL {ppl:.4f} ± {_fmt(stderr, '.4f')}")

    def update_file(self, i: int, n: int, name: str, done: int, total: int) -> None:
        self._advance(f"[{i}/{n}] {name}", done, total)


# ---------------------------------------------------------------------------------------------
# compare


@click.command()
@click.argument("base")
@click.argument("others", nargs=-1, required=True)
@_text_option
@_eval_ctx_option
@_chunks_option
@click.option("--tg-tokens", type=click.IntRange(min=0), default=32, show_default=True,
              help="Tokens per short generation run for the tokens/s column; 0 skips it.")
@click.option("--plot", "plot_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also draw size vs. perplexity as a PNG (needs the `plot` extra: matplotlib).")
@threads_option
@gpu_layers_option
@models_dir_option
@json_option
def compare(base: str, others: tuple[str, ...], text_file: Path, n_ctx: int, chunks: int | None,
            tg_tokens: int, plot_file: Path | None, threads: int | None, n_gpu_layers: int | str,
            models_dir: Path | None, as_json: bool) -> None:
    """Compare quantizations of one model: BASE (e.g. f16) against OTHERS (q8_0, q4_0, ...).

    For each file: size, bits per weight, perplexity and its change against BASE, mean KL
    divergence from BASE's next-token distributions, top-1 agreement with BASE, and generation
    tokens/s — one table sorted by size. A file quantized with an importance matrix shows as
    TYPE+imatrix, so the same preset with and without calibration can be put side by side.
    """
    from llamalocal.compare import compare as run_compare
    from llamalocal.paths import resolve_gguf
    from llamalocal.perplexity import read_text

    if plot_file is not None:
        _check_plot(plot_file)  # before minutes of scoring, not after
    paths = [resolve_gguf(m, models_dir) for m in (base, *others)]
    text = read_text(text_file)
    with _Bar("compare") as bar:
        result = run_compare(paths[0], paths[1:], text, n_ctx=n_ctx, chunks=chunks, n_gpu_layers=n_gpu_layers,
                             threads=threads, tg_tokens=tg_tokens, progress=bar.update_file,
                             log=lambda _msg: None)
    if plot_file is not None:
        draw_plot(result, plot_file)
        _err(f"wrote {plot_file}")
    if as_json:
        _print_json(result.to_json())
        return
    click.echo(compare_table(result))


def compare_table(result: Any) -> str:
    """The compare table as text (one line per file, largest first)."""
    from llamalocal.units import human_bytes

    head = ["model", "type", "size", "bpw", "PPL", "ΔPPL", "KL(base‖·)", "top-1", "tg t/s"]
    lines = []
    for r in result.rows:
        lines.append([
            Path(r.model).name, r.label, human_bytes(r.size_bytes), f"{r.bits_per_weight:.2f}",
            f"{r.ppl:.4f} ± {_fmt(r.ppl_stderr, '.4f')}",
            "base" if r.is_base else f"{r.ppl_delta:+.4f} ({r.ppl_delta_pct:+.2f}%)",
            "—" if r.is_base else f"{r.kl_mean:.6f}",
            "—" if r.is_base else f"{100 * r.top1:.2f}%",
            _fmt(r.tg_tps, ".1f"),
        ])
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    out += ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in lines]
    out.append(f"{result.chunks} chunks of {result.n_ctx} tokens, {result.tokens} scored tokens per file; "
               f"base: {Path(result.base).name}")
    return "\n".join(out)


def _check_plot(plot_file: Path) -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise LlamalocalError("--plot needs matplotlib; install the plot extra: "
                              "pip install 'llamalocal[plot]' (or drop --plot)") from None
    if plot_file.suffix.lower() != ".png":
        raise BadInputError(f"--plot writes a PNG; name the file *.png (got {plot_file.name})")
    if not plot_file.parent.resolve().is_dir():
        raise BadInputError(f"--plot: the folder {plot_file.parent} does not exist")


def draw_plot(result: Any, plot_file: Path) -> None:
    """Size (x) vs. perplexity (y) with ± standard error bars, one labelled point per file."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    gib = 1024**3
    unit, scale = ("GiB", gib) if max(r.size_bytes for r in result.rows) >= gib else ("MiB", 1024**2)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in result.rows:
        x = r.size_bytes / scale
        ax.errorbar([x], [r.ppl], yerr=[r.ppl_stderr if math.isfinite(r.ppl_stderr) else 0.0], fmt="o",
                    color="tab:red" if r.is_base else "tab:blue", capsize=3)
        ax.annotate(f"{r.label}{' (base)' if r.is_base else ''}", (x, r.ppl), textcoords="offset points",
                    xytext=(6, 4), fontsize=8)
    ax.set_xlabel(f"file size ({unit})")
    ax.set_ylabel(f"perplexity (ctx {result.n_ctx}, {result.tokens} tokens)")
    ax.set_title("size vs. perplexity: lower left is better")
    ax.grid(True, alpha=0.3)
    ax.margins(x=0.15)  # room for the labels of the outermost points
    fig.tight_layout()
    fig.savefig(plot_file, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# bench


@click.command()
@click.argument("model", required=False)
@threads_option
@gpu_layers_option
@click.option("-p", "--n-prompt", type=click.IntRange(min=0), default=512, show_default=True,
              help="Prompt tokens for the pp test (0 skips it).")
@click.option("-n", "--n-gen", type=click.IntRange(min=0), default=128, show_default=True,
              help="Generated tokens for the tg test (0 skips it).")
@click.option("-r", "--repetitions", type=click.IntRange(min=1), default=5, show_default=True,
              help="Timed runs per test, after one warm-up.")
@click.option("--bandwidth-mib", type=click.IntRange(min=0), default=512, show_default=True,
              help="Size of each buffer of the memory-copy bandwidth measurement; 0 skips it.")
@rpc_options
@force_option
@models_dir_option
@json_option
def bench(model: str | None, threads: int | None, n_gpu_layers: int | str, n_prompt: int, n_gen: int,
          repetitions: int, bandwidth_mib: int, rpc_endpoints: str | None, rpc_key_file: Path | None,
          tensor_split: list[float] | None, force: bool, models_dir: Path | None, as_json: bool) -> None:
    """Prompt processing and generation speed of MODEL, as llama-bench measures them.

    pp: a batch of random tokens; tg: one token at a time. Mean ± sd over repetitions, plus the
    ceiling memory bandwidth puts on generation here (weight bytes per token ÷ measured copy
    bandwidth) and the fraction of it reached.
    """
    from llamalocal.bench import bench as run_bench
    from llamalocal.paths import resolve_gguf

    path = resolve_gguf(model, models_dir)
    result = run_bench(path, threads=threads, n_gpu_layers=n_gpu_layers, n_prompt=n_prompt, n_gen=n_gen,
                       repetitions=repetitions, bandwidth_mib=bandwidth_mib, force=force, progress=_err, log=_err,
                       rpc=rpc_config(rpc_endpoints, rpc_key_file, tensor_split, warn=_err))
    if as_json:
        _print_json({"model": str(path), **result.to_json()})
        return
    click.echo(bench_table(path, result))


def bench_table(path: Path, r: Any) -> str:
    from llamalocal.units import human_bytes

    lines = [f"{path.name}: {human_bytes(r.model_bytes)} of weights, {r.n_params / 1e6:.1f} M parameters, "
             f"{r.threads} threads, {r.n_gpu_layers} layers on the GPU"]
    for rate, name in ((r.pp, "pp"), (r.tg, "tg")):
        if rate is not None:
            lines.append(f"  {name}{rate.n_tokens:<5} {rate.mean:10.2f} ± {rate.sd:.2f} tokens/s")
    if r.bandwidth_gbs is not None:
        lines.append(f"  memory copy bandwidth {r.bandwidth_gbs:.1f} GB/s; {human_bytes(r.bytes_per_token)} "
                     f"read per token -> generation bound {r.tg_bound:.1f} tokens/s")
        if r.tg_fraction_of_bound is not None:
            note = " (above 1: the weights are served from the CPU caches)" if r.tg_fraction_of_bound > 1 else ""
            lines.append(f"  tg reached {100 * r.tg_fraction_of_bound:.1f}% of the bound{note}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# info and list


@click.command()
@click.argument("model", required=False)
@click.option("--ctx", "n_ctx", type=click.IntRange(min=16), default=None,
              help="Context to plan for. Default: the model's own (capped at 4096).")
@threads_option
@gpu_layers_option
@models_dir_option
@json_option
def info(model: str | None, n_ctx: int | None, threads: int | None, n_gpu_layers: int | str,
         models_dir: Path | None, as_json: bool) -> None:
    """What MODEL.gguf holds: architecture, sizes, tensor types, and how it would be placed here."""
    from llamalocal.info import model_info
    from llamalocal.paths import resolve_gguf

    path = resolve_gguf(model, models_dir)
    mi = model_info(path, n_ctx=n_ctx, n_gpu_layers=n_gpu_layers, threads=threads)
    if as_json:
        _print_json(mi.to_json())
        return
    click.echo(info_text(mi))


def info_text(mi: Any) -> str:
    from llamalocal.units import human_bytes

    lines = [
        f"file          {mi.path}",
        f"name          {mi.name}",
        f"architecture  {mi.arch}",
        f"file type     {mi.file_type} ({mi.bits_per_weight:.2f} bits per weight)",
        f"size          {human_bytes(mi.file_bytes)} ({mi.file_bytes:,} bytes)",
        f"parameters    {mi.n_params:,}",
        f"layers        {mi.n_layers}   dim {mi.n_embd}   heads {mi.n_head} (kv {mi.n_head_kv})   ffn {mi.n_ff}",
        f"context       {mi.n_ctx_train} tokens (trained)",
        f"vocabulary    {mi.n_vocab} tokens",
        "tensor types:",
    ]
    lines += [f"  {t:<8} {human_bytes(b):>10}  ({b:,} bytes)" for t, b in mi.tensor_type_bytes.items()]
    lines += ["plan on this machine:", *("  " + line for line in mi.plan_text.splitlines())]
    return "\n".join(lines)


@click.command("list")
@models_dir_option
@json_option
def list_(models_dir: Path | None, as_json: bool) -> None:
    """Converted models (.gguf) under the models directory, newest first, with size, type and date."""
    from llamalocal.info import list_models
    from llamalocal.paths import models_dir as resolve_models_dir
    from llamalocal.units import human_bytes

    root = resolve_models_dir(models_dir)
    if not root.is_dir():
        raise BadInputError(f"models directory {root} does not exist; pass --models-dir or set $LLAMALOCAL_MODELS")
    models = list_models(root, on_error=lambda p, e: _err(f"warning: {p}: {e}"))
    if as_json:
        _print_json({"models_dir": str(root.resolve()), "models": [m.to_json() for m in models]})
        return
    if not models:
        _err(f"no .gguf files under {root.resolve()}; convert one with `llamalocal convert MODEL --q4_0`")
        return
    width = max(len(m.name) for m in models)
    for m in models:
        click.echo(f"{m.name:<{width}}  {human_bytes(m.size_bytes):>10}  {m.file_type:<10}  {m.modified}")


COMMANDS = [perplexity, compare, bench, info, list_]
