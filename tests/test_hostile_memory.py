"""Hostile checkpoints, class "memory amplification": small files that would make the converter
allocate gigabytes (a dict copied by REDUCE, a deflated pickle, memo bloat, a huge zip directory).
Each is refused before the memory is spent: peak RSS stays near a plain refusal's.

Also here: the budgets themselves, re-measured against what real state dicts need."""

from __future__ import annotations

import io
import struct
import zipfile

import hostile
import numpy as np
import pytest
from hostile import (
    EMPTY_DICT,
    MARK,
    POP,
    PROTO2,
    REDUCE,
    SETITEMS,
    STOP,
    TUPLE1,
    assert_refused,
    g,
    get,
    i,
    put,
    run_convert,
    s,
    state,
    tensor,
    write_shard,
)

from llamalocal.convert import checkpoint as ck
from llamalocal.convert import torch_save

base_model, model = hostile.base_model, hostile.model  # fixtures

# A refusal costs the interpreter and the converter's imports (~45-60 MiB); an amplification would
# cost gigabytes. What a refused file may add on top of that:
MAX_EXTRA_MIB = 64


def baseline_rss(model_dir) -> float:
    """Peak RSS of a refusal that builds nothing (a shard that is not a zip)."""
    (model_dir / "consolidated.00.pth").write_bytes(b"not a checkpoint")
    r = run_convert(model_dir)
    assert r.code == 2, r.describe()
    return r.max_rss_mib


def test_ordered_dict_copied_by_reduce(model):
    """{ints: 0} with 100,000 entries, then OrderedDict(that dict) 200 times: Python's unpickler
    would make 200 copies (the issue saw a 6 MB file reach 8.1 GB). torch never passes a state dict's
    items as an argument (it sends them with SETITEMS), so the first such call is refused."""
    n = 100_000
    big = EMPTY_DICT + put(0) + MARK + b"".join(i(k) + i(0) for k in range(n)) + SETITEMS
    copies = (g("collections", "OrderedDict") + put(1) + POP
              + (get(1) + get(0) + TUPLE1 + REDUCE + POP) * 200)
    write_shard(model, PROTO2 + big + copies + STOP)
    r = run_convert(model)
    assert_refused(r, "OrderedDict", "not as torch does", clean=(model.parent,))
    assert r.max_rss_mib < baseline_rss(model) + MAX_EXTRA_MIB, r.describe()


def test_deflated_pickle_is_refused_unread(model, tmp_path):
    """A data.pkl deflated from 95 MiB to a few hundred KB: torch never compresses, so it is
    refused from the zip directory without inflating a byte."""
    path = model / "consolidated.00.pth"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("consolidated.00/data.pkl", PROTO2 + MARK * (95 * 2**20) + STOP)
        z.writestr("consolidated.00/byteorder", "little")
    assert path.stat().st_size < 2**20
    assert_refused(run_convert(model), "compressed", clean=(model.parent,))


def test_stored_pickle_over_the_size_budget(model):
    big = PROTO2 + b"N0" * ((ck.MAX_PICKLE_BYTES // 2) + 10) + b"N" + STOP
    write_shard(model, big)
    r = run_convert(model)
    assert_refused(r, "data.pkl' is", "at most", clean=(model.parent,))
    assert r.max_rss_mib < baseline_rss(model) + MAX_EXTRA_MIB


def test_memo_bloat(model):
    n = ck.MAX_MEMO + 10
    write_shard(model, PROTO2 + b"".join(i(0) + put(k) + POP for k in range(n)) + b"N" + STOP)
    assert_refused(run_convert(model), "memo entries", clean=(model.parent,))


def test_opcode_budget(model):
    write_shard(model, PROTO2 + b"N0" * ck.MAX_OPCODES + b"N" + STOP)
    assert_refused(run_convert(model), "opcodes", clean=(model.parent,))


def test_within_every_budget_the_cost_is_bounded(model):
    """The most objects a pickle within the budgets can build (one empty dict per opcode) still
    costs only tens of MiB, and the file is then refused for what it holds."""
    write_shard(model, PROTO2 + EMPTY_DICT * (ck.MAX_OPCODES - 3) + STOP)
    r = run_convert(model)
    assert_refused(r, "holds no tensors", clean=(model.parent,))
    assert r.max_rss_mib < baseline_rss(model) + MAX_EXTRA_MIB, r.describe()


def test_many_tensors_on_one_storage(model):
    """Tensor records are small: as many as the opcode budget allows, all on one storage."""
    one = tensor(key="0", numel=4)
    n = ck.MAX_OPCODES // 40
    write_shard(model, state(*[(s(f"t{k}"), one) for k in range(n)]), {"0": bytes(16)})
    r = run_convert(model)
    assert_refused(r, "unknown tensor names", clean=(model.parent,))
    assert r.max_rss_mib < baseline_rss(model) + MAX_EXTRA_MIB, r.describe()


def test_zip_directory_over_its_budget(model):
    """zipfile reads the whole central directory into memory and makes an object per record: one
    bigger than MAX_DIRECTORY_BYTES is refused before that read."""
    path = model / "consolidated.00.pth"
    with open(path, "wb") as f:
        z = torch_save._TorchZipWriter(f, "consolidated.00")
        z.record("data.pkl", 3, [PROTO2 + b"}"])
        n = ck.MAX_DIRECTORY_BYTES // 60 + 1000
        for k in range(n):
            z.record(f"data/{k}", 0, [])
        z.finish()
    r = run_convert(model)
    assert_refused(r, "zip directory", clean=(model.parent,))
    assert r.max_rss_mib < baseline_rss(model) + MAX_EXTRA_MIB, r.describe()


def test_zip_directory_claiming_more_than_the_file(model):
    path = write_shard(model, state((s("w"), tensor())), {"0": bytes(16)})
    data = bytearray(path.read_bytes())
    eocd, z64 = data.rfind(b"PK\x05\x06"), data.rfind(b"PK\x06\x06")
    struct.pack_into("<I", data, eocd + 12, 0xFFFFFFFF)
    struct.pack_into("<Q", data, z64 + 40, 2**40)
    path.write_bytes(bytes(data))
    assert_refused(run_convert(model), "consolidated.00.pth", clean=(model.parent,))


# ---------------------------------------------------------------------------------------------
# The budgets against real layouts
# ---------------------------------------------------------------------------------------------

def _405b_state(n_shards: int) -> dict:
    """Llama-3.1-405B's tensors (126 layers, dim 16384, FFN 53248, 8 KV heads, vocab 128256) as
    one model-parallel shard holds them, as torch_save's pickler writes them (byte for byte what
    torch.save writes, tests/test_checkpoint.py::test_writer_is_byte_identical_to_torch)."""
    dim, ffn, kv, vocab, mp = 16384, 53248, 8 * 128, 128256, n_shards
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (vocab, dim // mp)}
    for n in range(126):
        shapes.update({f"layers.{n}.{k}": v for k, v in {
            "attention.wq.weight": (dim // mp, dim), "attention.wk.weight": (kv // mp, dim),
            "attention.wv.weight": (kv // mp, dim), "attention.wo.weight": (dim, dim // mp),
            "feed_forward.w1.weight": (ffn // mp, dim), "feed_forward.w2.weight": (dim, ffn // mp),
            "feed_forward.w3.weight": (ffn // mp, dim), "attention_norm.weight": (dim,),
            "ffn_norm.weight": (dim,)}.items()})
    shapes.update({"norm.weight": (dim,), "output.weight": (vocab // mp, dim)})
    return {name: torch_save._Tensor(torch_save._Storage(str(k), "bf16", int(np.prod(shape)), None), 0, shape,
                                     torch_save._contiguous_stride(shape))
            for k, (name, shape) in enumerate(shapes.items())}


@pytest.mark.parametrize("n_shards", [1, 8, 16])
def test_budgets_leave_a_wide_margin_over_405b(n_shards):
    pkl = torch_save._pickle(_405b_state(n_shards))
    cost = ck._scan(pkl, "405B")
    assert 10 * len(pkl) <= ck.MAX_PICKLE_BYTES
    assert 10 * cost.opcodes <= ck.MAX_OPCODES
    assert 10 * cost.memo <= ck.MAX_MEMO
    assert 10 * cost.depth <= ck.MAX_DEPTH
    # the zip directory: a 46-byte entry per record, its name, and a zip64 offset (8 bytes + 4)
    names = [f"consolidated.00/data/{k}" for k in range(len(_405b_state(n_shards)))] + ["consolidated.00/data.pkl"] * 7
    directory = sum(46 + len(n) + 12 for n in names)
    assert 10 * directory <= ck.MAX_DIRECTORY_BYTES


def test_budgets_leave_a_wide_margin_over_torchs_own_state_dict():
    """model.state_dict() as torch itself saves it (an OrderedDict with _metadata, nn.Parameter
    variant too), for a module with 405B's 126 layers and Meta's names, in protocols 2 and 5."""
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.wq, self.wk, self.wv, self.wo = (nn.Linear(2, 2, bias=False) for _ in range(4))

    class FeedForward(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1, self.w2, self.w3 = (nn.Linear(2, 2, bias=False) for _ in range(3))

    class Norm(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(2))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention, self.feed_forward = Attention(), FeedForward()
            self.attention_norm, self.ffn_norm = Norm(), Norm()

    class Transformer(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok_embeddings = nn.Embedding(8, 2)
            self.layers = nn.ModuleList(Block() for _ in range(126))
            self.norm, self.output = Norm(), nn.Linear(2, 8, bias=False)

    m = Transformer()
    for obj in (m.state_dict(), {k: nn.Parameter(v) for k, v in m.state_dict().items()}):
        for protocol in (2, 5):
            buf = io.BytesIO()
            torch.save(obj, buf, pickle_protocol=protocol)
            with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as z:
                pkl = z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
            cost = ck._scan(pkl, "torch")
            assert 10 * len(pkl) <= ck.MAX_PICKLE_BYTES
            assert 10 * cost.opcodes <= ck.MAX_OPCODES, cost
            assert 10 * cost.memo <= ck.MAX_MEMO, cost
            assert 10 * cost.depth <= ck.MAX_DEPTH, cost
