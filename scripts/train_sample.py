"""Train the small sample model the README's first command runs, and store it in Meta's layout.

The sample is a tiny Llama-2-shaped model (grouped-query attention, ffn_dim_multiplier, bf16,
one shard) trained on a public-domain book — Natsume Soseki's *Botchan* in the 1919 English
translation (Project Gutenberg eBook #8868), which the sentencepiece source distribution on PyPI
carries as its test text — with a sentencepiece tokenizer trained on the same text with LLaMA's
settings. It is small (a few MB) but trained, so a newcomer's first run prints recognisable words
and `llamalocal perplexity` on the held-out end of the book means something.

    python scripts/train_sample.py            # writes samples/ (needs torch: pip install torch==2.13.0)
    python scripts/train_sample.py --steps 50 --out /tmp/s   # a quick run

Output, exactly as Meta's downloads are laid out:

    samples/tokenizer.model, tokenizer_checklist.chk
    samples/botchan-tiny/consolidated.00.pth (torch.save), params.json, checklist.chk
    samples/heldout.txt                      the last 8 % of the book, never trained on

The model code below is Meta's llama/model.py architecture written out in plain torch (RMSNorm,
interleaved-pair rotary embeddings, repeat_kv, SwiGLU), with Meta's parameter names.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCE = ("sentencepiece", "0.2.0", "sentencepiece-0.2.0/test/botchan.txt")
HELDOUT_FRACTION = 0.08  # the end of the book: never trained on, never used to choose the model
VALID_FRACTION = 0.04  # just before it: picks the step to keep (the model overfits a small book)


@dataclass(frozen=True)
class Params:
    """params.json, with Meta's key names (Llama-2 style)."""

    dim: int = 192
    n_layers: int = 4
    n_heads: int = 6
    n_kv_heads: int = 2
    vocab_size: int = -1  # as in Meta's downloads: taken from the tokenizer
    multiple_of: int = 256
    ffn_dim_multiplier: float = 1.3
    norm_eps: float = 1e-5


def book_text() -> str:
    """Botchan, from the sentencepiece sdist (pip's own client fetches it), Gutenberg boilerplate removed."""
    name, version, member = SOURCE
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        f"{name}=={version}", "-d", tmp], check=True)
        tarball = next(Path(tmp).glob(f"{name}-{version}.tar.gz"))
        with tarfile.open(tarball) as tf:
            f = tf.extractfile(member)
            assert f is not None
            raw = f.read()
    text = raw.decode("utf-8-sig").replace("\r\n", "\n")
    start = text.index("*** START OF THIS PROJECT GUTENBERG EBOOK")
    start = text.index("\n", start) + 1
    end = text.index("*** END OF THIS PROJECT GUTENBERG EBOOK")
    end = text.rindex("End of Project Gutenberg", start, end)
    return text[start:end].strip() + "\n"


def train_tokenizer(text: str, vocab_size: int) -> bytes:
    """LLaMA's sentencepiece settings: BPE, byte fallback, split digits, identity normalisation."""
    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text.splitlines()), model_writer=out, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", add_dummy_prefix=True,
        remove_extra_whitespaces=False, character_coverage=0.9995, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=2, max_sentence_length=100000, minloglevel=2,
    )
    return out.getvalue()


def hidden_dim(p: Params) -> int:
    """Meta's FeedForward width rule."""
    hidden = int(2 * (4 * p.dim) / 3)
    hidden = int(p.ffn_dim_multiplier * hidden)
    return p.multiple_of * ((hidden + p.multiple_of - 1) // p.multiple_of)


def build_model(p: Params, n_vocab: int, dropout: float = 0.0):
    import torch
    from torch import nn

    head_dim = p.dim // p.n_heads

    class RMSNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(p.dim))

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + p.norm_eps) * self.weight

    def rope(x, freqs):  # x: (B, T, H, head_dim); Meta's interleaved pairs as complex numbers
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * freqs[None, :, None, :]).flatten(3).type_as(x)

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wq = nn.Linear(p.dim, p.n_heads * head_dim, bias=False)
            self.wk = nn.Linear(p.dim, p.n_kv_heads * head_dim, bias=False)
            self.wv = nn.Linear(p.dim, p.n_kv_heads * head_dim, bias=False)
            self.wo = nn.Linear(p.n_heads * head_dim, p.dim, bias=False)

        def forward(self, x, freqs):
            B, T, _ = x.shape
            q = rope(self.wq(x).view(B, T, p.n_heads, head_dim), freqs)
            k = rope(self.wk(x).view(B, T, p.n_kv_heads, head_dim), freqs)
            v = self.wv(x).view(B, T, p.n_kv_heads, head_dim)
            rep = p.n_heads // p.n_kv_heads  # Meta's repeat_kv
            k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
            out = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
            return self.wo(out.transpose(1, 2).reshape(B, T, -1))

    class FeedForward(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            h = hidden_dim(p)
            self.w1 = nn.Linear(p.dim, h, bias=False)
            self.w2 = nn.Linear(h, p.dim, bias=False)
            self.w3 = nn.Linear(p.dim, h, bias=False)

        def forward(self, x):
            return self.w2(torch.nn.functional.silu(self.w1(x)) * self.w3(x))

    drop = nn.Dropout(dropout)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention = Attention()
            self.feed_forward = FeedForward()
            self.attention_norm = RMSNorm()
            self.ffn_norm = RMSNorm()

        def forward(self, x, freqs):
            # dropout on the residual branches while training only: a small book is learnt by heart fast
            h = x + drop(self.attention(self.attention_norm(x), freqs))
            return h + drop(self.feed_forward(self.ffn_norm(h)))

    class Transformer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok_embeddings = nn.Embedding(n_vocab, p.dim)
            self.layers = nn.ModuleList(Block() for _ in range(p.n_layers))
            self.norm = RMSNorm()
            self.output = nn.Linear(p.dim, n_vocab, bias=False)

        def forward(self, tokens):
            T = tokens.shape[1]
            inv = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
            freqs = torch.polar(torch.ones(T, head_dim // 2), torch.outer(torch.arange(T).float(), inv))
            h = drop(self.tok_embeddings(tokens))
            for layer in self.layers:
                h = layer(h, freqs)
            return self.output(self.norm(h))

    model = Transformer()
    for name, w in model.named_parameters():
        if w.ndim == 2:
            torch.nn.init.normal_(w, std=0.02 / (math.sqrt(2 * p.n_layers) if name.endswith(("wo.weight", "w2.weight"))
                                                 else 1.0))
    return model


def train(model, ids, valid_ids, *, steps: int, batch: int, seq: int, lr: float, seed: int, log) -> tuple[float, float]:
    """AdamW with warm-up and cosine decay; every 100 steps the validation loss is measured and the
    best weights so far are kept. Returns (training loss then, validation loss)."""
    import copy

    import torch

    torch.manual_seed(seed)
    data = torch.tensor(ids, dtype=torch.long)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, steps // 20)
    loss_ema = None
    best = (math.inf, math.inf, copy.deepcopy(model.state_dict()))
    worse = 0  # evaluations in a row without a better validation loss
    t0 = time.perf_counter()
    for step in range(steps):
        scale = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for g in opt.param_groups:
            g["lr"] = lr * max(scale, 0.05)
        starts = torch.randint(0, len(data) - seq - 1, (batch,))
        x = torch.stack([data[s:s + seq] for s in starts])
        y = torch.stack([data[s + 1:s + seq + 1] for s in starts])
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_ema = loss.item() if loss_ema is None else 0.95 * loss_ema + 0.05 * loss.item()
        if step % 100 == 99 or step == steps - 1:
            valid = evaluate(model, valid_ids, seq)
            model.train()
            if valid < best[1]:
                best, worse = (float(loss_ema), valid, copy.deepcopy(model.state_dict())), 0
            else:
                worse += 1
            log(f"step {step + 1:5d}/{steps}  loss {loss_ema:.3f}  validation {valid:.3f}  "
                f"{time.perf_counter() - t0:.0f} s")
            if worse == 3:
                log("validation has not improved for 300 steps: stopping")
                break
    model.load_state_dict(best[2])
    return best[0], best[1]


def evaluate(model, ids, seq: int) -> float:
    """Mean loss (nats/token) over non-overlapping windows of `ids`."""
    import torch

    data = torch.tensor(ids, dtype=torch.long)
    total, n = 0.0, 0
    model.eval()
    with torch.no_grad():
        for s in range(0, len(data) - seq - 1, seq):
            x, y = data[s:s + seq][None], data[s + 1:s + seq + 1][None]
            total += torch.nn.functional.cross_entropy(model(x)[0], y[0], reduction="sum").item()
            n += seq
    return total / max(n, 1)


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "samples")
    ap.add_argument("--name", default="botchan-tiny")
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dropout", type=float, default=0.2)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()

    import sentencepiece as spm
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    text = book_text()
    # the book's lines carry no blank lines: hold out from the end of a sentence on
    cut = text.rfind(".\n", 0, int(len(text) * (1 - HELDOUT_FRACTION))) + 2
    vcut = text.rfind(".\n", 0, int(len(text) * (1 - HELDOUT_FRACTION - VALID_FRACTION))) + 2
    if vcut <= 2:
        raise SystemExit("no sentence end to split the book at; is the text what the script expects?")
    train_text, valid_text, heldout = text[:vcut], text[vcut:cut], text[cut:].strip() + "\n"
    log(f"Botchan: {len(text):,} characters; training on {len(train_text):,}, validating on {len(valid_text):,}, "
        f"holding out {len(heldout):,}")

    out, model_dir = a.out, a.out / a.name
    model_dir.mkdir(parents=True, exist_ok=True)
    tok_bytes = train_tokenizer(train_text, a.vocab)
    (out / "tokenizer.model").write_bytes(tok_bytes)
    (out / "tokenizer_checklist.chk").write_text(f"{_md5(out / 'tokenizer.model')}  tokenizer.model\n")
    sp = spm.SentencePieceProcessor(model_proto=tok_bytes)
    def encode(t: str) -> list[int]:
        return [i for line in t.splitlines(keepends=True) for i in sp.encode(line)]

    ids, valid_ids, held_ids = encode(train_text), encode(valid_text), encode(heldout)
    log(f"tokenizer: {sp.vocab_size()} pieces; {len(ids):,} training tokens, {len(held_ids):,} held out")

    p = Params()
    model = build_model(p, sp.vocab_size(), a.dropout)
    n_params = sum(w.numel() for w in model.parameters())
    log(f"model: {n_params / 1e6:.2f} M parameters, FFN {hidden_dim(p)}")
    final, valid = train(model, ids, valid_ids, steps=a.steps, batch=a.batch, seq=a.seq, lr=a.lr, seed=a.seed,
                         log=log)
    held = evaluate(model, held_ids, a.seq)
    log(f"kept: training loss {final:.3f}, validation {valid:.3f}, held-out {held:.3f} nats/token "
        f"(perplexity {math.exp(held):.1f})")

    state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    torch.save(state, model_dir / "consolidated.00.pth")
    (model_dir / "params.json").write_text(json.dumps(asdict(p)))
    (model_dir / "checklist.chk").write_text("".join(f"{_md5(model_dir / f)}  {f}\n"
                                                     for f in ("consolidated.00.pth", "params.json")))
    (out / "heldout.txt").write_text(heldout)
    (out / "TRAINING.json").write_text(json.dumps({
        "source": "Botchan (Master Darling), Natsume Soseki, tr. Yasotaro Morri (1919), Project Gutenberg #8868, "
                  "public domain; from the sentencepiece 0.2.0 sdist's test/botchan.txt",
        "params": asdict(p), "n_params": n_params, "vocab": sp.vocab_size(), "steps": a.steps, "batch": a.batch,
        "seq": a.seq, "lr": a.lr, "dropout": a.dropout, "seed": a.seed, "train_tokens": len(ids), "valid_tokens": len(valid_ids),
        "heldout_tokens": len(held_ids), "train_loss": round(final, 4), "valid_loss": round(valid, 4),
        "heldout_loss": round(held, 4), "torch": torch.__version__,
    }, indent=2) + "\n")
    log(f"wrote {model_dir} ({(model_dir / 'consolidated.00.pth').stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
