"""What is in a GGUF file, and which converted models are under the models directory.

Both read headers only (model_desc's gguf-py reader memory-maps the file; tensor data is not
touched), so `info` and `list` are instant even for 70B files. `info` adds the placement the
planner would choose on this machine, so a user sees what will fit before loading anything.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from llamalocal.errors import LlamalocalError


@dataclass
class ModelInfo:
    """What `info --json` prints."""

    path: str
    name: str
    arch: str
    file_type: str
    file_bytes: int
    n_params: int
    bits_per_weight: float  # 8 * weight bytes / parameters
    n_layers: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_vocab: int
    n_ctx_train: int
    tensor_type_bytes: dict[str, int]  # ggml type ("q4_0", "q6_k", "f32") -> bytes of tensors of that type
    plan: dict[str, Any] | None  # planner.Plan.to_json() on this machine, None if it could not be made
    plan_text: str  # planner.Plan.describe(), or why there is no plan

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def model_info(path: str | Path, *, n_ctx: int | None = None, n_gpu_layers: int | str = "auto",
               threads: int | None = None, with_plan: bool = True) -> ModelInfo:
    """Describe a GGUF file from its header, with the plan for loading it on this machine.

    Args:
        path: the .gguf file.
        n_ctx, n_gpu_layers, threads: what the plan is made for (as `run` would be given them).
        with_plan: False skips hardware detection and planning.

    Raises:
        ModelNotFoundError, GGUFError: missing, not a GGUF, or a damaged header.
    """
    from llamalocal.model_desc import read_model_desc

    p = Path(path)
    desc = read_model_desc(p)
    plan_json: dict[str, Any] | None = None
    plan_text = "not planned"
    if with_plan:
        plan_json, plan_text = _plan(desc, n_ctx=n_ctx, n_gpu_layers=n_gpu_layers, threads=threads)
    weights = desc.weights_bytes
    return ModelInfo(
        path=str(p), name=desc.name, arch=desc.arch, file_type=desc.file_type, file_bytes=desc.file_bytes,
        n_params=desc.n_params, bits_per_weight=8 * weights / desc.n_params if desc.n_params else 0.0,
        n_layers=desc.n_layers, n_embd=desc.n_embd, n_head=desc.n_head, n_head_kv=desc.n_head_kv,
        n_ff=desc.n_ff, n_vocab=desc.n_vocab, n_ctx_train=desc.n_ctx_train,
        tensor_type_bytes=dict(sorted(desc.tensor_type_bytes.items(), key=lambda kv: -kv[1])),
        plan=plan_json, plan_text=plan_text)


def _plan(desc: Any, *, n_ctx: int | None, n_gpu_layers: int | str, threads: int | None
          ) -> tuple[dict[str, Any] | None, str]:
    """The planner's placement for this machine; a plan that cannot be made is reported, not raised."""
    from llamalocal import hardware, planner
    from llamalocal.runner import resolve_ctx

    ctx = resolve_ctx(n_ctx, desc.n_ctx_train)
    try:
        plan = planner.plan(desc, hardware.detect(), n_ctx=ctx, n_gpu_layers=n_gpu_layers, threads=threads)
    except LlamalocalError as e:
        return None, f"no plan: {e}"
    return plan.to_json(), plan.describe()


# ---------------------------------------------------------------------------------------------
# list


@dataclass
class ListedModel:
    """One element of `list --json`."""

    name: str  # path relative to the models directory
    path: str
    size_bytes: int
    file_type: str  # "q4_0", "f16", ...; "unreadable" for a damaged header
    n_params: int | None
    modified: str  # ISO 8601, local time, seconds

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def list_models(root: Path, on_error: Callable[[Path, Exception], None] | None = None) -> list[ListedModel]:
    """The GGUF files under `root` (two levels, as paths.find_ggufs looks), newest first.

    A file whose header cannot be read is listed as "unreadable" (and reported to `on_error`)
    rather than hiding the rest.
    """
    from llamalocal.model_desc import read_model_desc
    from llamalocal.paths import find_ggufs

    out = []
    for p in find_ggufs(root):
        st = p.stat()
        try:
            desc = read_model_desc(p)
            ftype, n_params = desc.file_type, desc.n_params
        except LlamalocalError as e:
            ftype, n_params = "unreadable", None
            if on_error is not None:
                on_error(p, e)
        modified = dt.datetime.fromtimestamp(st.st_mtime).isoformat(timespec="seconds")
        out.append(ListedModel(name=str(p.relative_to(root)), path=str(p), size_bytes=st.st_size,
                               file_type=ftype, n_params=n_params, modified=modified))
    return out
