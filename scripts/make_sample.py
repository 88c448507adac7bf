"""Build a sample checkpoint in Meta's download layout, for trying llamalocal without Meta's weights.

    python scripts/make_sample.py samples            # samples/tokenizer.model, samples/sample/...
    python scripts/make_sample.py samples --shards 2 --layers 8 --dim 512
    python scripts/make_sample.py samples --llama3   # samples/Llama3.1-sample/ with Meta's Llama-3 tokenizer
    python scripts/make_sample.py samples --llama3 --name Llama3.2-sample --tie-output --shards 2

Random weights (the model talks nonsense), real file formats: torch zip shards split the way
Meta's model parallelism splits them, params.json, checklist.chk, and a trained sentencepiece
tokenizer or, with --llama3, Meta's Llama-3 tokenizer (tiktoken; ../shared's copy or the one the
llama-models package ships, or --tokenizer) beside the shards, as Meta lays Llama-3 out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llamalocal.convert.families import LLAMA3_VOCAB  # noqa: E402
from llamalocal.convert.params import ModelParams  # noqa: E402
from llamalocal.convert.sample import TIED_SHARED, UNTIED, SampleSpec, build_sample  # noqa: E402


def llama3_tokenizer() -> Path:
    """Meta's Llama-3 tokenizer.model: ../shared's copy, else the identical one llama-models ships."""
    from llamalocal.convert.sample import llama3_tokenizer_file

    found = llama3_tokenizer_file(REPO.parent / "shared/fixtures/llama3-tokenizer/tokenizer.model")
    if found is None:
        raise SystemExit("--llama3 needs Meta's tokenizer.model: pass --tokenizer, or pip install llama-models")
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("target", type=Path, help="folder to create (tokenizer.model goes here, the model in NAME/)")
    ap.add_argument("--name", default=None, help="model folder; default sample (Llama3.1-sample with --llama3)")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=None, help="grouped-query attention (Llama-2 70B, Llama-3 style)")
    ap.add_argument("--shards", type=int, default=1, help="model-parallel shards (13B=2, 33B=4, 65B=8)")
    ap.add_argument("--dtype", choices=["f16", "bf16", "f32"], default=None, help="default f16 (bf16 with --llama3)")
    ap.add_argument("--vocab", type=int, default=512, help="tokenizer pieces to train")
    ap.add_argument("--tokenizer", type=Path, default=None, help="use this tokenizer.model instead of training one")
    ap.add_argument("--llama3", action="store_true",
                    help="Llama-3.1 layout: Meta's tiktoken tokenizer, 128256-token embedding split on the vocabulary, "
                         "rope_theta 500000 with scaled rope")
    ap.add_argument("--tie-output", action="store_true", help="output.weight is tok_embeddings (Llama-3.2 1B/3B)")
    a = ap.parse_args()
    if a.llama3:
        p = ModelParams(dim=a.dim, n_layers=a.layers, n_heads=a.heads, n_kv_heads=a.kv_heads or max(1, a.heads // 4),
                        vocab_size=LLAMA3_VOCAB, multiple_of=256, ffn_dim_multiplier=1.3, norm_eps=1e-5,
                        rope_theta=500_000.0, use_scaled_rope=True)
        name, dtype, tokenizer = a.name or "Llama3.1-sample", a.dtype or "bf16", a.tokenizer or llama3_tokenizer()
    else:
        p = ModelParams(dim=a.dim, n_layers=a.layers, n_heads=a.heads, n_kv_heads=a.kv_heads, multiple_of=256,
                        norm_eps=1e-6 if a.kv_heads is None else 1e-5)
        name, dtype, tokenizer = a.name or "sample", a.dtype or "f16", a.tokenizer
    spec = SampleSpec(params=p, n_shards=a.shards, dtype=dtype, vocab_size=a.vocab,
                      tie_output=TIED_SHARED if a.tie_output else UNTIED)
    print(build_sample(a.target, name, spec, tokenizer=tokenizer))


if __name__ == "__main__":
    main()
