"""`llamalocal imatrix`: an importance matrix for calibrated low-bit quantization."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from llamalocal.cli.common import gpu_layers_option, models_dir_option, threads_option


class _Bar:
    """Chunks done, with the running perplexity, as a tqdm bar on stderr."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.bar: Any = None

    def update(self, done: int, total: int, ppl: float, stderr: float) -> None:
        if self.quiet:
            return
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, desc="imatrix", unit="chunk", file=sys.stderr, dynamic_ncols=True)
        self.bar.set_postfix_str(f"PPL {ppl:.4f} ± {stderr:.4f}" if stderr == stderr else f"PPL {ppl:.4f}",
                                 refresh=False)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@click.command()
@click.argument("model")
@click.option("-f", "--file", "text_file", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Calibration text (plain text; a few hundred KB of the kind of text you will run).")
@click.option("-o", "--output", "outfile", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the imatrix (llama.cpp's GGUF format; legacy .dat with --output-format dat).")
@click.option("--ctx", "n_ctx", type=click.IntRange(min=16), default=512, show_default=True,
              help="Window length in tokens (llama-imatrix's -c).")
@click.option("--chunks", type=click.IntRange(min=1), default=None,
              help="Process at most N windows. Default: all that fit in the text.")
@click.option("--process-output", is_flag=True, help="Also collect output.weight (llama-imatrix's --process-output).")
@click.option("--output-format", type=click.Choice(["gguf", "dat"]), default=None,
              help="gguf (llama-imatrix's default) or the legacy dat. Default: dat for a *.dat name, else gguf.")
@click.option("--save-partial", is_flag=True,
              help="On Ctrl-C, write what the completed windows collected (default: write nothing).")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or summary.")
@threads_option
@gpu_layers_option
@models_dir_option
def imatrix(model: str, text_file: Path, outfile: Path, n_ctx: int, chunks: int | None, process_output: bool,
            output_format: str | None, save_partial: bool, force: bool, quiet: bool, threads: int | None,
            n_gpu_layers: int | str, models_dir: Path | None) -> None:
    """Compute an importance matrix of MODEL (a GGUF) over calibration text, as llama-imatrix does.

    For every matmul weight it records the mean squared input activation of each column; the
    low-bit quantizers weight their rounding error by it. Give the file to
    `llamalocal convert MODEL_DIR --PRESET --imatrix FILE` (or to llama-quantize --imatrix).
    The IQ presets and q2_k_s cannot be made without one; q2_k ... q4_k_m gain from one.

    \b
    Example:
      llamalocal imatrix 13B/ggml-model-q8_0.gguf -f calibration.txt -o 13B/imatrix.gguf
      llamalocal convert 13B --iq3_xxs --imatrix 13B/imatrix.gguf
    """
    from llamalocal.convert.errors import BadInputError, OutputExistsError
    from llamalocal.convert.imatrix_file import write_imatrix
    from llamalocal.imatrix import Interrupted, compute_imatrix, summary
    from llamalocal.paths import resolve_gguf
    from llamalocal.perplexity import read_text

    path = resolve_gguf(model, models_dir)
    if outfile.exists() and not force:
        raise OutputExistsError(f"{outfile} already exists; pass --force to overwrite it or -o to choose another name")
    if not outfile.parent.resolve().is_dir():
        raise BadInputError(f"{outfile.parent} does not exist; create it or choose another -o")
    text = read_text(text_file)
    legacy = output_format == "dat" if output_format else outfile.suffix.lower() == ".dat"

    bar = _Bar(quiet)
    try:
        result = compute_imatrix(path, text, dataset=str(text_file), n_ctx=n_ctx, chunks=chunks,
                                 process_output=process_output, n_gpu_layers=n_gpu_layers, threads=threads,
                                 progress=bar.update, log=None if quiet else (lambda m: click.echo(m, err=True)))
    except Interrupted as e:
        bar.close()
        if save_partial and e.partial is not None:
            write_imatrix(outfile, e.partial.imatrix, legacy=legacy)
            click.echo(f"\nInterrupted: wrote the {e.partial.chunks} completed chunks to {outfile}", err=True)
        elif save_partial:
            click.echo("\nInterrupted before the first chunk completed: nothing to save", err=True)
        else:
            click.echo(f"\nInterrupted: nothing written ({outfile} is untouched; --save-partial keeps "
                       "what completed)", err=True)
        raise
    finally:
        bar.close()
    write_imatrix(outfile, result.imatrix, legacy=legacy)
    if not quiet:
        click.echo(f"Wrote {outfile}: {summary(result)}", err=True)


COMMANDS = [imatrix]
