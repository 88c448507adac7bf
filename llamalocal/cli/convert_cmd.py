"""`llamalocal convert`: a Meta download to one GGUF file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from llamalocal.cli.common import models_dir_option, threads_option
from llamalocal.units import human_bytes

# Flags exactly as the model card spells them; the one place is convert.presets, these are its names
# (written out so that --help need not import the converter; tests/test_cli_help.py compares them).
PRESET_FLAGS = ["f32", "f16", "q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_1", "q5_0", "q4_k_m", "q4_k_s", "q4_1",
                "iq4_nl", "q4_0", "iq4_xs", "q3_k_l", "q3_k_m", "q3_k_s", "iq3_m", "iq3_s", "iq3_xs", "iq3_xxs",
                "q2_k", "q2_k_s", "iq2_m", "iq2_s", "iq2_xs", "iq2_xxs", "iq1_m", "iq1_s"]


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
        f = click.option(f"--{name}", "preset_flag", flag_value=name, hidden=True)(f)  # listed in the help text
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
@click.option("--imatrix", "imatrix_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Importance matrix for the quantizers (from `llamalocal imatrix` or llama-imatrix; "
                   "GGUF or legacy .dat).")
@click.option("--calibrate", "calibration_text", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Calibration text: compute the imatrix first (on an f16/q8_0 GGUF of this model beside "
                   "it, made if missing), then convert with it.")
@click.option("--calibrate-chunks", type=click.IntRange(min=1), default=None,
              help="With --calibrate: at most N windows of 512 tokens. Default: the whole text.")
@threads_option
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or summary (errors still go to stderr).")
@models_dir_option
def convert(model: str, preset_flag: str | None, preset_type: str | None, outfile: Path | None, force: bool,
            no_verify: bool, reverify: bool, n_ctx: int | None, rope_scaling_factor: float | None,
            imatrix_file: Path | None, calibration_text: Path | None, calibrate_chunks: int | None,
            threads: int | None, quiet: bool, models_dir: Path | None) -> None:
    """Convert a Meta LLaMA checkpoint to one GGUF file, quantized in one streaming pass.

    MODEL is a folder with params.json and consolidated.NN.pth files (tokenizer.model there or in
    its parent), or a name under --models-dir such as 13B or llama-2-7b-chat, or under
    ~/.llama/checkpoints (Meta's downloader) such as Llama3.1-8B-Instruct.

    \b
    Presets (smaller = faster and less RAM, with some quality loss):
      --f32 --f16                   unquantized (f16 is lossless for Meta's fp16 weights)
      --q8_0 --q6_k                 8.5 / 6.6 bits/weight, practically lossless
      --q5_k_m --q5_k_s --q5_1 --q5_0   about 5.5-6 bits/weight
      --q4_k_m --q4_k_s --q4_1 --iq4_nl --q4_0 --iq4_xs   about 4.3-5 bits/weight:
                                    the usual choice for a laptop
      --q3_k_l --q3_k_m --q3_k_s --iq3_m --iq3_s   about 3.4-4 bits/weight
      --q2_k                        smallest k-quant, noticeably worse
    Need an importance matrix (--imatrix FILE or --calibrate TEXT):
      --iq3_xs --iq3_xxs --q2_k_s --iq2_m --iq2_s --iq2_xs --iq2_xxs --iq1_m --iq1_s
    Every quantized preset is better with one; q2_k..q4_k_m the most. Default: --f16.

    \b
    Examples:
      llamalocal convert 13B --q4_0
      llamalocal convert ~/llama/llama-2-7b-chat --q5_k_m -o chat-q5.gguf
      llamalocal convert Llama3.1-8B-Instruct --q4_k_m
      llamalocal convert 70B --iq3_xxs --calibrate calibration.txt
      llamalocal convert 70B --q3_k_m --imatrix 70B/imatrix.gguf
    """
    from llamalocal.cli import printable
    from llamalocal.convert.convert import convert as run_convert
    from llamalocal.convert.convert import default_outfile
    from llamalocal.convert.presets import parse_preset
    from llamalocal.errors import BadInputError, OutputExistsError
    from llamalocal.paths import resolve_model_dir

    if preset_flag and preset_type and parse_preset(preset_type).name != preset_flag:
        raise BadInputError(f"--{preset_flag} and --type {preset_type} disagree; give one preset")
    preset = parse_preset(preset_type or preset_flag or "f16")
    model_dir = resolve_model_dir(model, models_dir)
    if imatrix_file is not None and calibration_text is not None:
        raise BadInputError("give --imatrix FILE or --calibrate TEXT, not both")
    if calibrate_chunks is not None and calibration_text is None:
        raise BadInputError("--calibrate-chunks goes with --calibrate TEXT")
    if (imatrix_file or calibration_text) and not preset.quantized:
        raise BadInputError(f"--imatrix/--calibrate apply to quantized presets; --{preset.name} stores every weight as is")
    if calibration_text is not None:
        out = outfile if outfile is not None else default_outfile(model_dir, preset)
        if out.exists() and not force:  # before minutes of calibration, not after
            raise OutputExistsError(f"{out} already exists; pass --force to overwrite or --outfile to choose another name")
        imatrix_file = _calibrate(model_dir, calibration_text, calibrate_chunks, threads, not no_verify, quiet)
    bar = None if quiet else _TqdmProgress()
    try:
        if no_verify and reverify:
            raise BadInputError("--verify and --no-verify contradict each other; give one")
        result = run_convert(model_dir, preset, outfile, force=force, verify=not no_verify, reverify=reverify,
                             n_ctx=n_ctx, threads=threads, rope_scaling_factor=rope_scaling_factor, progress=bar,
                             imatrix=imatrix_file)
    finally:
        if bar is not None:
            bar.close()
    if not quiet:
        for note in result.notes:
            click.echo(note, err=True)
        for w in result.warnings:
            click.echo(f"Warning: {printable(w)}", err=True)
        calibrated = f", imatrix for {result.imatrix_entries} tensors" if result.imatrix_entries else ""
        click.echo(
            f"Wrote {printable(str(result.path))} ({result.preset}{calibrated}): {_count(result.n_params)} parameters, "
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


def _calibrate(model_dir: Path, text: Path, chunks: int | None, threads: int | None, verify: bool,
               quiet: bool) -> Path:
    """convert --calibrate: the imatrix file to convert with (made if need be), with its own bars."""
    from llamalocal.cli.imatrix_cmd import _Bar
    from llamalocal.imatrix import calibrate

    convert_bar = None if quiet else _TqdmProgress()
    imatrix_bar = _Bar(quiet)
    try:
        return calibrate(model_dir, text, chunks=chunks, threads=threads, verify=verify,
                         say=(lambda m: None) if quiet else (lambda m: click.echo(m, err=True)),
                         convert_progress=convert_bar, progress=imatrix_bar.update)
    finally:
        if convert_bar is not None:
            convert_bar.close()
        imatrix_bar.close()


COMMANDS = [convert]
