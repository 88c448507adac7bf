"""Options and parameter types shared by several commands."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from llamalocal.units import parse_size


class SizeType(click.ParamType):
    name = "SIZE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_size(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


class GpuLayersType(click.ParamType):
    """--n-gpu-layers: a number, 'auto' (plan it) or 'all'."""

    name = "N|auto|all"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int | str:
        if isinstance(value, int):
            return value
        v = str(value).strip().lower()
        if v in ("auto", "all"):
            return v
        try:
            n = int(v)
        except ValueError:
            self.fail(f"{value!r} is not a number, 'auto' or 'all'", param, ctx)
        if n < 0:
            self.fail("must be 0 or more", param, ctx)
        return n


SIZE = SizeType()
GPU_LAYERS = GpuLayersType()


def models_dir_option(f: Callable) -> Callable:
    return click.option(
        "--models-dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help="Where model names are looked up. Default: $LLAMALOCAL_MODELS, else the current directory.",
    )(f)


def ctx_option(f: Callable) -> Callable:
    return click.option("--ctx", "n_ctx", type=click.IntRange(min=16), default=None,
                        help="Context length in tokens. Default: the model's own (capped at 4096 to save memory).")(f)


def threads_option(f: Callable) -> Callable:
    return click.option("--threads", type=click.IntRange(min=1), default=None,
                        help="CPU threads. Default: the number of physical cores.")(f)


def gpu_layers_option(f: Callable) -> Callable:
    return click.option("--n-gpu-layers", "-ngl", "n_gpu_layers", type=GPU_LAYERS, default="auto", show_default=True,
                        help="Layers to offload to the GPU: a number (honoured exactly, or refused if it "
                             "cannot fit), 'auto' (the largest that fits) or 'all'.")(f)


def force_option(f: Callable) -> Callable:
    return click.option("--force", is_flag=True, help="Proceed even when the plan says it will not fit.")(f)


def sampling_options(f: Callable) -> Callable:
    """--temp --top-p --top-k --repeat-penalty --seed, with llama.cpp's defaults."""
    for opt in reversed([
        click.option("--temp", type=click.FloatRange(min=0.0), default=0.8, show_default=True,
                     help="Sampling temperature; 0 is greedy and deterministic."),
        click.option("--top-p", type=click.FloatRange(0.0, 1.0), default=0.95, show_default=True),
        click.option("--top-k", type=click.IntRange(min=0), default=40, show_default=True),
        click.option("--repeat-penalty", type=click.FloatRange(min=0.0), default=1.1, show_default=True),
        click.option("--seed", type=int, default=-1, show_default=True, help="-1 picks a random seed."),
    ]):
        f = opt(f)
    return f


def json_option(f: Callable) -> Callable:
    return click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON on stdout.")(f)


def cache_type_option(f: Callable) -> Callable:
    from llamalocal.settings import CACHE_TYPES

    return click.option("--cache-type", type=click.Choice(list(CACHE_TYPES)), default="f16", show_default=True,
                        help="KV cache element type; q8_0 halves its memory at a small cost in quality, "
                             "q4_0 quarters it.")(f)
