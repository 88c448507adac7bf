"""`llamalocal convert`: a Meta download to one GGUF file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from llamalocal.cli.common import models_dir_option, threads_option
from llamalocal.units import human_bytes

# Flags exactly as the model card spells them; the one place is convert.presets, these are its names.
PRESET_FLAGS = ["f32", "f16", "q8_0", "q5_0", "q5_1", "q5_k_m", "q4_0", "q4_1", "q4_k_m", "q3_k_m", "q2_k"]


class _TqdmProgress:
    """Draws the converter's stages as tqdm byte bars on stderr."""

    def __init__(self) -> None:
        self.bar: Any = None  # a tqdm bar while a stage runs

    def stage(self, name: str, total_bytes: int) -> None:
        from tqdm import tqdm

        self.close()
        self.bar = tqdm(total=total_bytes, desc=name, unit="B", unit_scale=True, unit_divisor=1024,
                        dynamic_ncols=True, leave=True)

    def advance(self, nbytes: int, label: str = "") -> None:
        if self.bar is not None:
            self.bar.update(nbytes)
            if label:
                self.bar.set_postfix_str(label, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str("")
            self.bar.close()
            self.bar = None


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _preset_flags(f):
    for name in reversed(PRESET_FLAGS):
        f = click.option(f"--{name}", "preset_flag", flag_value=name, help=None)(f)
    return f


@click.command()
@click.argument("model")
@_preset_flags
@click.option("--type", "preset_type", metavar="NAME", default=None,
              help="Preset by name, same as the flags: " + ", ".join(PRESET_FLAGS) + ".")
@click.option("--outfile", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Output file. Default: MODEL_DIR/ggml-model-<preset>.gguf.")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@click.option("--no-verify", is_flag=True, help="Skip the checklist.chk md5 verification.")
@click.option("--verify", "reverify", is_flag=True,
              help="Hash every file listed in checklist.chk, even those verified by an earlier conversion and "
                   "unchanged since (which are otherwise taken as verified).")
@click.option("--ctx", "n_ctx", type=click.IntRange(min=16), default=None,
              help="Context length to record. Default: 2048 (LLaMA-1), 4096 (Llama-2), 16384 (Code Llama), "
                   "8192 (Llama-3), 131072 (Llama-3.1 and later).")
@click.option("--rope-scaling-factor", type=click.FloatRange(min=1.0), default=None,
              help="Meta's scaled-rope factor for Llama-3.1 and later. Default: 8, and 32 for Llama-3.2 1B/3B "
                   "(recognised by their shapes or folder name).")
@threads_option
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or summary (errors still go to stderr).")
@models_dir_option
def convert(model: str, preset_flag: str | None, preset_type: str | None, outfile: Path | None, force: bool,
            no_verify: bool, reverify: bool, n_ctx: int | None, rope_scaling_factor: float | None,
            threads: int | None, quiet: bool, models_dir: Path | None) -> None:
    """Convert a Meta LLaMA checkpoint to one GGUF file, quantized in one streaming pass.

    MODEL is a folder with params.json and consolidated.NN.pth files (tokenizer.model there or in
    its parent), or a name under --models-dir such as 13B or llama-2-7b-chat, or under
    ~/.llama/checkpoints (Meta's downloader) such as Llama3.1-8B-Instruct.

    \b
    Presets (smaller = faster and less RAM, with some quality loss):
      --f32 --f16          unquantized (f16 is lossless for Meta's fp16 weights)
      --q8_0               8.5 bits/weight, practically lossless
      --q5_k_m --q5_1 --q5_0   about 5.5-6 bits/weight
      --q4_k_m --q4_0 --q4_1   about 4.5-5 bits/weight: the usual choice for a laptop
      --q3_k_m --q2_k      smallest, noticeably worse
    Default: --f16.

    \b
    Examples:
      llamalocal convert 13B --q4_0
      llamalocal convert ~/llama/llama-2-7b-chat --q5_k_m -o chat-q5.gguf
      llamalocal convert Llama3.1-8B-Instruct --q4_k_m
    """
    from llamalocal.cli import printable
    from llamalocal.convert.convert import convert as run_convert
    from llamalocal.convert.presets import parse_preset
    from llamalocal.errors import BadInputError
    from llamalocal.paths import resolve_model_dir

    if preset_flag and preset_type and parse_preset(preset_type).name != preset_flag:
        raise BadInputError(f"--{preset_flag} and --type {preset_type} disagree; give one preset")
    preset = parse_preset(preset_type or preset_flag or "f16")
    model_dir = resolve_model_dir(model, models_dir)
    bar = None if quiet else _TqdmProgress()
    try:
        if no_verify and reverify:
            raise BadInputError("--verify and --no-verify contradict each other; give one")
        result = run_convert(model_dir, preset, outfile, force=force, verify=not no_verify, reverify=reverify,
                             n_ctx=n_ctx, threads=threads, rope_scaling_factor=rope_scaling_factor, progress=bar)
    finally:
        if bar is not None:
            bar.close()
    if not quiet:
        for note in result.notes:
            click.echo(note, err=True)
        for w in result.warnings:
            click.echo(f"Warning: {printable(w)}", err=True)
        click.echo(
            f"Wrote {printable(str(result.path))} ({result.preset}): {_count(result.n_params)} parameters, "
            f"{human_bytes(result.file_bytes)}, {result.bits_per_weight:.2f} bits/weight, "
            f"{result.seconds:.1f} s", err=True)
        click.echo(f"Model: {_describe(result, rope_scaling_factor)}", err=True)


def _describe(result, override: float | None) -> str:
    """'Llama-3.2, context 131072, rope scaling factor 32 (Llama-3.2's), output tied to the embeddings'."""
    parts = [result.family, f"context {result.n_ctx}"]
    if result.rope_scaling_factor is not None:
        source = "--rope-scaling-factor" if override is not None else f"{result.family}'s"
        parts.append(f"rope scaling factor {result.rope_scaling_factor:g} ({source})")
    if result.tied_embeddings:
        parts.append("output tied to the embeddings")
    if result.kv_replicas > 1:
        parts.append(f"KV heads copied over {result.kv_replicas} shards each, written once")
    return ", ".join(parts)


COMMANDS = [convert]
