"""Where models are: the models directory and resolving MODEL arguments.

A MODEL argument is a path (a .gguf file or a directory) or a name under the models directory
(`13B`, `llama-2-7b`). Default models directory: $LLAMALOCAL_MODELS, else the current directory.
A name not found there is looked up under ~/.llama/checkpoints, where Meta's `llama model
download` puts Llama-3.x models (`Llama3.1-8B-Instruct`).
"""

from __future__ import annotations

import os
from pathlib import Path

from llamalocal.errors import ModelNotFoundError

GGUF_SUFFIX = ".gguf"
META_CHECKPOINTS = Path("~/.llama/checkpoints")  # Meta's downloader (llama-stack / llama-models)


def meta_checkpoints() -> Path:
    return META_CHECKPOINTS.expanduser()


def models_dir(explicit: Path | None = None) -> Path:
    if explicit is not None:
        return Path(explicit)
    return Path(os.environ.get("LLAMALOCAL_MODELS") or ".")


def is_imatrix_name(path: Path) -> bool:
    """An importance-matrix file by its name (imatrix.gguf, imatrix-*.gguf, *.imatrix.gguf): GGUF too,
    but not a model."""
    name = path.name.lower()
    return name.startswith("imatrix") or name.endswith(".imatrix.gguf")


def find_ggufs(root: Path) -> list[Path]:
    """GGUF model files under `root` (two levels deep), newest first. Partial (.tmp) files and
    importance matrices (`is_imatrix_name`) are skipped."""
    if not root.is_dir():
        return []
    found = [p for pattern in ("*.gguf", "*/*.gguf") for p in root.glob(pattern)
             if p.is_file() and not is_imatrix_name(p)]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def resolve_model_dir(model: str | Path, models_root: Path | None = None) -> Path:
    """A checkpoint directory: `model` as a path, else as a name under the models directory."""
    p = Path(model).expanduser()
    if p.is_dir():
        return p
    root = models_dir(models_root)
    candidates = [root / str(model), meta_checkpoints() / str(model)]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise ModelNotFoundError(
        f"no model directory {str(model)!r} (looked at {p}, {candidates[0]} and {candidates[1]}); "
        "pass the directory holding params.json and consolidated.*.pth, or set --models-dir"
    )


def _best_in_dir(d: Path) -> Path | None:
    """The best GGUF in a directory: highest precision that exists is not 'best' for a laptop,
    so prefer the most recently written one, as the user most likely just converted it."""
    files = find_ggufs(d)
    return files[0] if files else None


def resolve_gguf(model: str | Path | None, models_root: Path | None = None) -> Path:
    """A GGUF file from a MODEL argument (path, directory, name) or, if None, the newest one."""
    root = models_dir(models_root)
    if model is None:
        newest = _best_in_dir(root)
        if newest is None:
            raise ModelNotFoundError(
                f"no .gguf model under {root.resolve()}; convert one with `llamalocal convert MODEL --q4_0` "
                "or pass a path / --models-dir"
            )
        return newest
    p = Path(model).expanduser()
    for candidate in (p, root / str(model), meta_checkpoints() / str(model)):
        if candidate.is_file():
            return candidate
        if candidate.is_dir():
            best = _best_in_dir(candidate)
            if best is not None:
                return best
            raise ModelNotFoundError(f"{candidate} has no .gguf file; convert it first with `llamalocal convert {model}`")
    with_suffix = root / f"{model}{GGUF_SUFFIX}"
    if with_suffix.is_file():
        return with_suffix
    raise ModelNotFoundError(f"no model {str(model)!r}: not a file, a directory or a name under {root.resolve()}")
