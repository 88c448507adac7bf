"""Building the Llama-3 GGUF vocabulary from Meta's tiktoken tokenizer.model, against the peer.

    python scripts/bench_vocab.py [TOKENIZER.model] [--rounds 5]

llamalocal: `load_vocab` (ranks, GPT-2 byte text, Meta's 256 special tokens, the merges rebuilt
from the ranks) plus writing every tokenizer key into a vocab-only GGUF.
Peer: the same vocabulary step of the route llama.cpp's maintainers point Llama-3 users to:
transformers' TikTokenConverter (what convert_llama_weights_to_hf.py's Llama3Converter runs)
rebuilding vocabulary and merges and building the `tokenizers` object, then tokenizer.json written.
(That route then has convert_hf_to_gguf.py load tokenizer.json again; not counted here, so the
ratio favours the peer.) Needs `pip install "transformers>=4.45,<5"` for the peer; without it only
llamalocal is timed.

Prints per-round seconds, min and median of each, and the ratio; checks both built the same merges.
Default tokenizer: ../shared/fixtures/llama3-tokenizer/tokenizer.model, else llama-models' copy.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llamalocal.convert.gguf_out import StreamingGGUFWriter  # noqa: E402
from llamalocal.convert.tiktoken_bpe import SPECIAL_TOKENS  # noqa: E402
from llamalocal.convert.tokenizer import add_to_gguf, load_vocab  # noqa: E402


def default_tokenizer() -> Path:
    shared = REPO.parent / "shared" / "fixtures" / "llama3-tokenizer" / "tokenizer.model"
    if shared.is_file():
        return shared
    spec = importlib.util.find_spec("llama_models")
    if spec is None or spec.origin is None:
        raise SystemExit("no tokenizer given, ../shared absent and llama-models not installed")
    return Path(spec.origin).parent / "llama3" / "tokenizer.model"


def ours(tokenizer: Path, out: Path) -> tuple[float, list[str]]:
    t0 = time.perf_counter()
    vocab = load_vocab(tokenizer)
    w = StreamingGGUFWriter(out)
    g = w.gguf
    for add, v in ((g.add_context_length, 8192), (g.add_embedding_length, 64), (g.add_block_count, 1),
                   (g.add_feed_forward_length, 64), (g.add_head_count, 1), (g.add_vocab_size, len(vocab))):
        add(v)
    add_to_gguf(g, vocab, instruct=True)
    w.open()
    w.finish()
    return time.perf_counter() - t0, vocab.merges


def peer(tokenizer: Path, out_dir: Path) -> tuple[float, list[str]]:
    from transformers.convert_slow_tokenizer import TikTokenConverter

    t0 = time.perf_counter()
    conv = TikTokenConverter(vocab_file=str(tokenizer), additional_special_tokens=list(SPECIAL_TOKENS))
    tok = conv.converted()
    tok.save(str(out_dir / "tokenizer.json"))
    secs = time.perf_counter() - t0
    _, merges = conv.extract_vocab_merges_from_model(str(tokenizer))  # (not timed) for the equality check
    return secs, [f"{a} {b}" for a, b in merges]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("tokenizer", nargs="?", type=Path, default=None)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    tokenizer = a.tokenizer or default_tokenizer()
    has_peer = importlib.util.find_spec("transformers") is not None
    if not has_peer:
        print("transformers not installed: timing llamalocal only", file=sys.stderr)
    times: dict[str, list[float]] = {"llamalocal": [], "peer": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):  # interleaved, so a load change hits both alike
            secs, merges = ours(tokenizer, Path(tmp) / "vocab.gguf")
            times["llamalocal"].append(secs)
            line = f"round {r + 1}: llamalocal {secs:.2f} s"
            if has_peer:
                psecs, pmerges = peer(tokenizer, Path(tmp))
                times["peer"].append(psecs)
                if pmerges != merges:
                    raise SystemExit("the peer built different merges")
                line += f", peer {psecs:.2f} s"
            print(line, flush=True)
    for name, ts in times.items():
        if ts:
            print(f"{name}: min {min(ts):.2f} s, median {statistics.median(ts):.2f} s")
    if has_peer:
        print(f"peer / llamalocal: min {min(times['peer']) / min(times['llamalocal']):.1f}x, "
              f"median {statistics.median(times['peer']) / statistics.median(times['llamalocal']):.1f}x")


if __name__ == "__main__":
    main()
