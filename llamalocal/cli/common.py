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
        click.option("--repeat-penalty", type=click.FloatRange(min=0.0), default=1.1, show_default=True,
                     help="Penalty on recently generated tokens when sampling; with --temp 0 it applies only "
                          "if given (greedy decoding is plain argmax)."),
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
class TensorSplitType(click.ParamType):
    """--tensor-split A,B,...: proportions, 0 or more each, not all 0."""

    name = "A,B,..."

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> list[float]:
        if isinstance(value, list):
            return value
        try:
            parts = [float(x) for x in str(value).split(",")]
        except ValueError:
            self.fail(f"{value!r} is not a list of numbers like 1,1,1 or 3,1", param, ctx)
        if any(x < 0 or x != x for x in parts) or sum(parts) <= 0:
            self.fail("proportions must be 0 or more, and not all 0", param, ctx)
        return parts


TENSOR_SPLIT = TensorSplitType()


def rpc_options(f: Callable) -> Callable:
    """--rpc, --rpc-key-file, --tensor-split: layers across `llamalocal worker`s on other machines."""
    for opt in reversed([
        click.option("--rpc", "rpc_endpoints", metavar="HOST:PORT[,...]", default=None,
                     help="Also place layers on these `llamalocal worker`s (llama.cpp's RPC backend), split by "
                          "each device's memory unless --tensor-split says otherwise; the output layer stays here."),
        click.option("--rpc-key-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     envvar="LLAMALOCAL_RPC_KEY_FILE", show_envvar=True,
                     help="The workers' pre-shared key (the file they were started with --key-file). Proves "
                          "both sides to each other; the traffic is authenticated, not encrypted."),
        click.option("--tensor-split", type=TENSOR_SPLIT, default=None,
                     help="llama.cpp's proportions of the layers over the devices, in the order `plan` lists "
                          "them (this machine's CPU first, then each --rpc worker, then local GPUs), e.g. 1,1,1."),
    ]):
        f = opt(f)
    return f


def rpc_config(rpc_endpoints: str | None, rpc_key_file: Path | None, tensor_split: list[float] | None,
               *, warn: Callable[[str], None] | None = None) -> Any:
    """An llamalocal.rpc.RpcConfig from the options, or None when none are given. The key file
    is read only when there are workers to use it with ($LLAMALOCAL_RPC_KEY_FILE may be set
    for good)."""
    if rpc_endpoints is None and tensor_split is None:
        return None
    from llamalocal import rpc

    endpoints = rpc.parse_endpoints(rpc_endpoints) if rpc_endpoints is not None else []
    key = None
    if endpoints and rpc_key_file is not None:
        key = rpc.read_key(rpc_key_file)
        problem = rpc.key_file_warning(rpc_key_file)
        if problem and warn is not None:
            warn(f"warning: {problem}")
    return rpc.RpcConfig(endpoints=endpoints, key=key, tensor_split=tensor_split)
