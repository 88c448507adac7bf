"""Build a sample checkpoint in Meta's download layout, for trying llamalocal without Meta's weights.

    python scripts/make_sample.py samples            # samples/tokenizer.model, samples/sample/...
    python scripts/make_sample.py samples --shards 2 --layers 8 --dim 512

Random weights (the model talks nonsense), real file formats: torch zip shards split the way
Meta's model parallelism splits them, params.json, checklist.chk, a trained sentencepiece tokenizer.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llamalocal.convert.params import ModelParams  # noqa: E402
from llamalocal.convert.sample import SampleSpec, build_sample  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("target", type=Path, help="folder to create (tokenizer.model goes here, the model in NAME/)")
    ap.add_argument("--name", default="sample")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=None, help="grouped-query attention (Llama-2 70B style)")
    ap.add_argument("--shards", type=int, default=1, help="model-parallel shards (13B=2, 33B=4, 65B=8)")
    ap.add_argument("--dtype", choices=["f16", "bf16", "f32"], default="f16")
    ap.add_argument("--vocab", type=int, default=512, help="tokenizer pieces to train")
    ap.add_argument("--tokenizer", type=Path, default=None, help="use this tokenizer.model instead of training one")
    a = ap.parse_args()
    p = ModelParams(dim=a.dim, n_layers=a.layers, n_heads=a.heads, n_kv_heads=a.kv_heads, multiple_of=256,
                    norm_eps=1e-6 if a.kv_heads is None else 1e-5)
    d = build_sample(a.target, a.name, SampleSpec(params=p, n_shards=a.shards, dtype=a.dtype, vocab_size=a.vocab),
                     tokenizer=a.tokenizer)
    print(d)


if __name__ == "__main__":
    main()
