"""Meta's own Llama-3 code (PyPI `llama-models`: llama3/model.py, checkpoint.py) as the reference.

The checkpoint is merged by Meta's `maybe_reshard_state_dict` (fairscale model parallel size 1 on
CPU, a one-process gloo group) and run by Meta's `Transformer` in float32, so neither the split
dims nor the forward pass come from llamalocal. Meta's `apply_scaling` hard-codes the rope factor
8; for another factor (Llama-3.2's 32) its own source is re-run with that one number changed.
"""

from __future__ import annotations

import inspect
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="Meta's reference model needs torch (test extra)")
pytest.importorskip("fairscale", reason="Meta's reference model needs fairscale (test extra)")
pytest.importorskip("llama_models", reason="Meta's reference code is the llama-models package (test extra)")


def init_model_parallel() -> None:
    """A one-process gloo group and fairscale model parallel size 1, once per test process."""
    import torch.distributed as dist
    from fairscale.nn.model_parallel import initialize as fs_init

    if not dist.is_initialized():
        store = Path(tempfile.mkdtemp(prefix="gloo-")) / "store"
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    if not fs_init.model_parallel_is_initialized():
        fs_init.initialize_model_parallel(1)


def scaled_rope(factor: float):
    """Meta's apply_scaling with its `scale_factor = 8` set to `factor` (the rest untouched)."""
    from llama_models.llama3 import model as meta_model

    src = inspect.getsource(meta_model.apply_scaling)
    assert "scale_factor = 8\n" in src, "Meta's apply_scaling changed; update the reference"
    namespace = dict(vars(meta_model))
    exec(src.replace("scale_factor = 8\n", f"scale_factor = {float(factor)!r}\n"), namespace)
    return namespace["apply_scaling"]


def load_meta_state_dict(model_dir: Path, n_kv_heads: int) -> dict:
    """Meta's merge of consolidated.NN.pth into one model-parallel rank (float32)."""
    from llama_models.checkpoint import maybe_reshard_state_dict

    init_model_parallel()
    default = torch.get_default_dtype()
    try:
        sd = maybe_reshard_state_dict(sorted(Path(model_dir).glob("consolidated.*.pth")), n_kv_heads=n_kv_heads)
    finally:  # Meta's loader switches the default tensor type to bfloat16
        torch.set_default_dtype(default)
        torch.set_default_tensor_type(torch.FloatTensor)
    return {k: v.float() for k, v in sd.items()}


class MetaModel:
    """Meta's Transformer for a checkpoint directory, greedy decoding included."""

    def __init__(self, model_dir: Path, max_seq_len: int = 64, rope_scaling_factor: float | None = None) -> None:
        from llama_models.llama3 import model as meta_model
        from llama_models.llama3.args import ModelArgs

        init_model_parallel()
        params = json.loads((Path(model_dir) / "params.json").read_text())
        args = ModelArgs(max_seq_len=max_seq_len, max_batch_size=1, **params)
        sd = load_meta_state_dict(model_dir, args.n_kv_heads)
        if "output.weight" not in sd:  # tied: Meta's model has its own output, the same matrix
            sd["output.weight"] = sd["tok_embeddings.weight"]
        torch.manual_seed(0)
        self.model = meta_model.Transformer(args)
        self.model.load_state_dict(sd, strict=True)
        self.model.eval()
        if args.use_scaled_rope and rope_scaling_factor not in (None, 8, 8.0):
            saved = meta_model.apply_scaling
            meta_model.apply_scaling = scaled_rope(rope_scaling_factor)
            try:
                self.model.freqs_cis = meta_model.precompute_freqs_cis(
                    args.dim // args.n_heads, args.max_seq_len * 2, args.rope_theta, args.use_scaled_rope)
            finally:
                meta_model.apply_scaling = saved

    def logits(self, tokens: list[int]) -> np.ndarray:
        """(T, vocab) for the whole sequence from position 0 (the KV cache is rewritten)."""
        with torch.inference_mode():
            out = self.model.forward(torch.tensor([tokens]), 0)
        return out[0].double().numpy()

    def greedy(self, tokens: list[int], n: int) -> list[int]:
        """n argmax tokens after `tokens`, through Meta's KV cache (start_pos), as Meta generates."""
        out: list[int] = []
        with torch.inference_mode():
            logits = self.model.forward(torch.tensor([tokens]), 0)
            while True:
                out.append(int(logits[0, -1].argmax()))
                if len(out) == n:
                    return out
                logits = self.model.forward(torch.tensor([[out[-1]]]), len(tokens) + len(out) - 1)
