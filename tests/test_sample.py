"""The sample shipped in samples/: Meta's layout, converts with its checklists verified, and speaks."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples"


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("samples")
    shutil.copytree(SAMPLES, root / "samples")
    return root / "samples" / "botchan-tiny"


def cli(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llamalocal", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_meta_layout_and_real_torch_save(sample):
    assert sorted(p.name for p in sample.iterdir()) == ["checklist.chk", "consolidated.00.pth", "params.json"]
    assert (sample.parent / "tokenizer.model").is_file() and (sample.parent / "tokenizer_checklist.chk").is_file()
    torch = pytest.importorskip("torch")
    state = torch.load(sample / "consolidated.00.pth", map_location="cpu", weights_only=True)
    assert state["tok_embeddings.weight"].dtype == torch.bfloat16  # as Llama-2's downloads
    assert "layers.3.attention.wk.weight" in state


def test_converts_verified_and_speaks(sample):
    r = cli("convert", sample, "--q8_0", "--force")
    assert r.returncode == 0, r.stderr
    assert "checked by md5 now" in r.stderr and "Warning" not in r.stderr
    r = cli("generate", sample, "-p", "I went to the school", "-n", "48", "--temp", "0")
    assert r.returncode == 0, r.stderr
    words = re.findall(r"[A-Za-z]+", r.stdout)
    book = set(re.findall(r"[a-z]+", (sample.parent / "heldout.txt").read_text().lower()))
    book |= {"i", "a", "the", "was", "had", "been", "than", "said", "and", "to", "of"}
    known = [w for w in words if w.lower() in book]
    assert len(words) >= 20 and len(known) / len(words) > 0.8, r.stdout  # English, not noise


def test_perplexity_on_the_end_of_the_book_means_something(sample):
    # a model that learnt nothing scores near its vocabulary (1024); this one far below it
    cli("convert", sample, "--q8_0", "--force")
    r = cli("perplexity", sample, "-f", sample.parent / "heldout.txt", "--json")
    assert r.returncode == 0, r.stderr
    import json

    ppl = json.loads(r.stdout)["ppl"]
    assert 5 < ppl < 250, ppl
