"""A numpy LLaMA forward pass written from Meta's model.py, independent of the converter.

RMSNorm, interleaved-pair rotary embedding (Meta's complex multiply), grouped-query attention
(Meta's repeat_kv) and SwiGLU, all in float64 so the reference is not the noisy side.
"""

from __future__ import annotations

import numpy as np


def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope(x: np.ndarray, theta: float) -> np.ndarray:
    """x: (T, n_heads, head_dim); pairs (0,1), (2,3), ... rotated as complex numbers."""
    T, _, hd = x.shape
    inv = 1.0 / theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)  # (hd/2,)
    ang = np.outer(np.arange(T), inv)[:, None, :]  # (T, 1, hd/2)
    xc = x[..., 0::2] + 1j * x[..., 1::2]
    r = xc * np.exp(1j * ang)
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = r.real, r.imag
    return out


def forward(w: dict[str, np.ndarray], p, tokens: list[int], taps=None) -> np.ndarray:
    """Logits (T, vocab) for `tokens` with merged Meta weights `w` (meta names) and ModelParams `p`.

    `taps(name, x)`, if given, is called with every matmul's weight name and its input (T, in)."""
    w = {k: v.astype(np.float64) for k, v in w.items()}
    tap = taps or (lambda name, x: None)
    T, H, KV, hd = len(tokens), p.n_heads, p.kv_heads, p.head_dim
    theta = p.rope_theta or 10000.0
    x = w["tok_embeddings.weight"][tokens]  # (T, dim)
    mask = np.triu(np.full((T, T), -np.inf), k=1)
    for i in range(p.n_layers):
        L = f"layers.{i}."
        h = rmsnorm(x, w[L + "attention_norm.weight"], p.norm_eps)
        for m in ("wq", "wk", "wv"):
            tap(L + f"attention.{m}.weight", h)
        q = rope((h @ w[L + "attention.wq.weight"].T).reshape(T, H, hd), theta)
        k = rope((h @ w[L + "attention.wk.weight"].T).reshape(T, KV, hd), theta)
        v = (h @ w[L + "attention.wv.weight"].T).reshape(T, KV, hd)
        k, v = np.repeat(k, H // KV, axis=1), np.repeat(v, H // KV, axis=1)  # Meta's repeat_kv
        scores = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd) + mask  # (H, T, T)
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        scores /= scores.sum(-1, keepdims=True)
        att = np.einsum("hts,shd->thd", scores, v).reshape(T, H * hd)
        tap(L + "attention.wo.weight", att)
        x = x + att @ w[L + "attention.wo.weight"].T
        h = rmsnorm(x, w[L + "ffn_norm.weight"], p.norm_eps)
        tap(L + "feed_forward.w1.weight", h)
        tap(L + "feed_forward.w3.weight", h)
        a, b = h @ w[L + "feed_forward.w1.weight"].T, h @ w[L + "feed_forward.w3.weight"].T
        g = (a / (1 + np.exp(-a))) * b
        tap(L + "feed_forward.w2.weight", g)
        x = x + g @ w[L + "feed_forward.w2.weight"].T
    h = rmsnorm(x, w["norm.weight"], p.norm_eps)
    tap("output.weight", h)
    return h @ w["output.weight"].T


def load_merged(model_dir, split_dims: dict[str, int | None]) -> dict[str, np.ndarray]:
    """Every tensor of a Meta checkpoint directory merged with plain numpy (for the reference)."""
    from pathlib import Path

    from llamalocal.convert.checkpoint import open_checkpoint

    files = sorted(Path(model_dir).glob("consolidated.*.pth"))
    parts: dict[str, list[np.ndarray]] = {}
    for f in files:
        with open_checkpoint(f) as ck:
            for name, info in ck.tensors.items():
                n = info.shape[0]
                parts.setdefault(name, []).append(ck.rows(name, 0, n) if len(info.shape) == 2 else ck.rows(name, 0, n))
    merged = {}
    for name, ps in parts.items():
        d = split_dims.get(name)
        merged[name] = ps[0] if d is None or len(ps) == 1 or ps[0].ndim == 1 else np.concatenate(ps, axis=d)
    return merged
