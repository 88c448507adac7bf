"""convert.checkpoint (torch-free, restricted reader) and convert.torch_save (torch-free writer)."""

from __future__ import annotations

import gc
import pickle
import struct
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import llamalocal.convert.torch_save as torch_save
from llamalocal.convert.checkpoint import BF16, open_checkpoint
from llamalocal.convert.direct_io import aligned_empty
from llamalocal.convert.torch_save import save_state_dict, to_bf16, write_raw_checkpoint
from llamalocal.errors import CheckpointError, UnsafePickleError

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TINY = SHARED / "fixtures" / "meta-tiny"
needs_shared = pytest.mark.skipif(not TINY.is_dir(), reason=f"{TINY} (torch-written fixtures) not present")

rng = np.random.default_rng(0)


def _f32(*shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def _stored(x: np.ndarray, dtype: str) -> np.ndarray:
    """The float32 values a file of `dtype` holds for x."""
    if dtype == "f16":
        return x.astype(np.float16).astype(np.float32)
    if dtype == "bf16":
        return (to_bf16(x).astype(np.uint32) << 16).view(np.float32)
    return x


# ---------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["f16", "bf16", "f32"])
def test_round_trip(tmp_path, dtype):
    tensors = {"tok_embeddings.weight": _f32(40, 16), "layers.0.attention.wq.weight": _f32(16, 16),
               "norm.weight": _f32(16), "scalar": np.float32(1.5), "empty": np.zeros((0, 16), np.float32)}
    p = tmp_path / "consolidated.00.pth"
    save_state_dict(p, tensors, dtype=dtype)
    with open_checkpoint(p) as ck:
        assert list(ck.tensors) == list(tensors)  # file order
        for name, x in tensors.items():
            x = np.asarray(x)
            t = ck.tensors[name]
            assert t.shape == x.shape and t.dtype_name == dtype
            assert t.nbytes == x.size * {"f16": 2, "bf16": 2, "f32": 4}[dtype]
            got = ck.rows(name)
            assert got.dtype == np.float32 and got.shape == x.shape
            assert np.array_equal(got, _stored(x, dtype))
        # blocks of rows are slices of the whole, and read_rows() gives the stored bits
        w = tensors["tok_embeddings.weight"]
        assert np.array_equal(ck.rows("tok_embeddings.weight", 7, 23), _stored(w, dtype)[7:23])
        assert np.array_equal(ck.rows("norm.weight", 3, 9), _stored(tensors["norm.weight"], dtype)[3:9])
        raw = ck.read_rows("tok_embeddings.weight", 0, None, aligned_empty(ck.read_size("tok_embeddings.weight")))
        assert raw.shape == w.shape
        assert np.array_equal(ck.read_rows("tok_embeddings.weight", 7, 23, aligned_empty(ck.read_size(
            "tok_embeddings.weight", 7, 23))), raw[7:23])
        if dtype == "bf16":
            assert ck.tensors["norm.weight"].dtype == BF16 and raw.dtype == np.uint16
            assert np.array_equal(raw, to_bf16(w))
        else:
            assert raw.dtype == np.dtype({"f16": np.float16, "f32": np.float32}[dtype])
        del raw
        assert ck.nbytes == sum(t.nbytes for t in ck.tensors.values())
        with pytest.raises(ValueError):
            ck.rows("tok_embeddings.weight", 30, 41)
        with pytest.raises(CheckpointError, match="no tensor 'nope'"):
            ck.rows("nope")


def test_bf16_rounds_to_nearest_even():
    bits = np.array([0x3F808000,  # exactly half-way, even below: stays 0x3F80
                     0x3F818000,  # half-way, odd below: rounds up to 0x3F82
                     0x3F808001,  # just above half-way: up
                     0x3F807FFF,  # just below: down
                     0x7F7FFFFF,  # largest float32 rounds to inf
                     0x7F800000, 0xFF800000, 0x80000000], np.uint32)
    assert to_bf16(bits.view(np.float32)).tolist() == [0x3F80, 0x3F82, 0x3F81, 0x3F80, 0x7F80, 0x7F80, 0xFF80, 0x8000]
    assert np.isnan((to_bf16(np.array([np.nan], np.float32)).astype(np.uint32) << 16).view(np.float32)[0])


def test_views_of_one_array_share_one_storage(tmp_path):
    base = _f32(6, 8)
    p = tmp_path / "shared.pth"
    save_state_dict(p, {"all": base, "top": base[:2], "mid": base[2:4], "row": base[5]}, dtype="f32")
    assert [n for n in zipfile.ZipFile(p).namelist() if "/data/" in n] == ["shared/data/0"]
    with open_checkpoint(p) as ck:
        t = ck.tensors
        assert {i.storage_key for i in t.values()} == {"0"}
        assert [t[n].storage_offset for n in ("all", "top", "mid", "row")] == [0, 0, 16, 40]
        assert np.array_equal(ck.rows("mid"), base[2:4])
        assert np.array_equal(ck.rows("row"), base[5])
        assert np.array_equal(ck.rows("mid", 1, 2), base[3:4])


def test_non_contiguous_tensor_is_refused(tmp_path):
    base = _f32(4, 6)
    p = tmp_path / "t.pth"
    save_state_dict(p, {"w": base, "w_t": base.T}, dtype="f32")  # a transposed view: stride (1, 6)
    with pytest.raises(CheckpointError, match=r"w_t is not contiguous.*stride \(1, 6\)"):
        open_checkpoint(p)


def test_rows_from_many_threads(tmp_path):
    w = _f32(512, 64)
    p = tmp_path / "m.pth"
    save_state_dict(p, {"w": w}, dtype="f16")
    with open_checkpoint(p) as ck, ThreadPoolExecutor(4) as pool:
        blocks = list(pool.map(lambda a: ck.rows("w", a, a + 16), range(0, 512, 16)))
    assert np.array_equal(np.concatenate(blocks), _stored(w, "f16"))


def test_reading_after_close_is_refused(tmp_path):
    p = tmp_path / "v.pth"
    save_state_dict(p, {"w": np.arange(6, dtype=np.float32)}, dtype="f32")
    ck = open_checkpoint(p)
    assert ck.rows("w").tolist() == [0, 1, 2, 3, 4, 5]
    ck.close()
    ck.close()  # twice is fine
    with pytest.raises(ValueError, match="closed"):
        ck.rows("w")


def test_zip64_records_read_back(tmp_path, monkeypatch):
    # Force the >4 GiB layout (zip64 extra fields, 8-byte descriptors) on a tiny file.
    monkeypatch.setattr(torch_save, "_ZIP32_LIMIT", 1000)
    p = tmp_path / "z.pth"
    w, b = _f32(40, 50), _f32(3)
    save_state_dict(p, {"w": w, "b": b}, dtype="f32")
    with zipfile.ZipFile(p) as z:
        assert z.testzip() is None  # every CRC checks out
        assert z.getinfo("z/data/0").file_size == 8000
    with open_checkpoint(p) as ck:
        assert np.array_equal(ck.rows("w"), w) and np.array_equal(ck.rows("b"), b)


# ---------------------------------------------------------------------------------------------
# Real torch-written fixtures
# ---------------------------------------------------------------------------------------------

def _expected_shapes(dim, n_layers, vocab, hidden, kv_dim, shards) -> dict[str, tuple[int, ...]]:
    """Shard shapes: wq wk wv w1 w3 output split on dim 0, wo w2 tok_embeddings on dim 1."""
    s = {"tok_embeddings.weight": (vocab, dim // shards)}
    for i in range(n_layers):
        L = f"layers.{i}."
        s |= {L + "attention.wq.weight": (dim // shards, dim), L + "attention.wk.weight": (kv_dim // shards, dim),
              L + "attention.wv.weight": (kv_dim // shards, dim), L + "attention.wo.weight": (dim, dim // shards),
              L + "feed_forward.w1.weight": (hidden // shards, dim), L + "feed_forward.w2.weight": (dim, hidden // shards),
              L + "feed_forward.w3.weight": (hidden // shards, dim), L + "attention_norm.weight": (dim,),
              L + "ffn_norm.weight": (dim,)}
    return s | {"norm.weight": (dim,), "output.weight": (vocab // shards, dim)}


@needs_shared
@pytest.mark.parametrize("rel, dtype, expected", [
    ("tiny-v1/consolidated.00.pth", np.float16, _expected_shapes(256, 4, 2048, 768, 256, 2) | {"rope.freqs": (32,)}),
    ("tiny-v1/consolidated.01.pth", np.float16, _expected_shapes(256, 4, 2048, 768, 256, 2) | {"rope.freqs": (32,)}),
    ("tiny-v2/consolidated.00.pth", BF16, _expected_shapes(256, 4, 2048, 1024, 128, 1)),
])
def test_real_fixtures(rel, dtype, expected):
    with open_checkpoint(TINY / rel) as ck:
        assert {n: t.shape for n, t in ck.tensors.items()} == expected
        assert list(ck.tensors)[0] == "tok_embeddings.weight"
        for name, t in ck.tensors.items():
            assert t.dtype == dtype, name
            x = ck.rows(name)
            assert x.shape == t.shape and np.isfinite(x).all(), name
            assert np.abs(x).max() > 0, name  # trained weights, not an empty file
        assert ck.nbytes == sum(int(np.prod(s)) for s in expected.values()) * 2


@needs_shared
def test_replicated_norms_agree_between_shards():
    with open_checkpoint(TINY / "tiny-v1/consolidated.00.pth") as a, \
            open_checkpoint(TINY / "tiny-v1/consolidated.01.pth") as b:
        for name in ("norm.weight", "layers.2.ffn_norm.weight", "rope.freqs"):
            assert np.array_equal(a.rows(name), b.rows(name))
        # the split halves differ
        assert not np.array_equal(a.rows("output.weight"), b.rows("output.weight"))


@needs_shared
@pytest.mark.parametrize("model, dtype", [("tiny-v1", "f16"), ("tiny-v2", "bf16")])
def test_writer_is_byte_identical_to_torch(tmp_path, monkeypatch, model, dtype):
    """Re-saving a torch-written shard with torch_save gives the same file, byte for byte
    (the random serialization id set to the original's)."""
    src = TINY / model / "consolidated.00.pth"
    with zipfile.ZipFile(src) as z:
        sid = z.read("consolidated.00/.data/serialization_id").decode()
    monkeypatch.setattr(torch_save, "_serialization_id", lambda: sid)
    with open_checkpoint(src) as ck:
        tensors = {n: ck.rows(n) for n in ck.tensors}
    out = tmp_path / "consolidated.00.pth"
    save_state_dict(out, tensors, dtype=dtype)
    assert out.read_bytes() == src.read_bytes()


# ---------------------------------------------------------------------------------------------
# Hand-made pickles (opcodes spelled out; see `python -m pickletools` on a torch file)
# ---------------------------------------------------------------------------------------------

def _s(text: str) -> bytes:
    b = text.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def _i(n: int) -> bytes:
    return b"J" + struct.pack("<i", n)


def _g(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def _tup(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


NO_HOOKS = _g("collections", "OrderedDict") + b")R"  # backward_hooks: an empty OrderedDict


def _tensor(key="0", numel=4, shape=(4,), stride=(1,), storage=("torch", "FloatStorage"),
            rebuild="_rebuild_tensor_v2", hooks=NO_HOOKS, tail=b"") -> bytes:
    pid = _tup(_s("storage"), _g(*storage), _s(key), _s("cpu"), _i(numel)) + b"Q"
    args = _tup(pid, _i(0), _tup(*map(_i, shape)), _tup(*map(_i, stride)), b"\x89", hooks, tail)
    return _g("torch._utils", rebuild) + args + b"R"


def _state(**items: bytes) -> bytes:
    return b"\x80\x02}(" + b"".join(_s(k) + v for k, v in items.items()) + b"u."


F32x4 = {"0": np.arange(4, dtype="<f4").tobytes()}


def test_hand_made_pickle_baseline_reads(tmp_path):
    """The builders above make files the reader accepts, so the refusals below are about the payload."""
    p = tmp_path / "ok.pth"
    write_raw_checkpoint(p, _state(w=_tensor()), F32x4)
    with open_checkpoint(p) as ck:
        assert ck.rows("w").tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("case", ["parameter", "ordered_dict_with_metadata", "v3_untyped_float16"])
def test_other_torch_layouts_read(tmp_path, case):
    if case == "parameter":  # torch.nn.Parameter: _rebuild_parameter(tensor, requires_grad, hooks)
        pkl = _state(w=_g("torch._utils", "_rebuild_parameter")
                     + _tup(_tensor(), b"\x88", NO_HOOKS) + b"R")
        storages, want = F32x4, [0, 1, 2, 3]
    elif case == "ordered_dict_with_metadata":  # model.state_dict(): OrderedDict + BUILD {_metadata}
        pkl = (b"\x80\x02" + _g("collections", "OrderedDict") + b")R(" + _s("w") + _tensor() + b"u"
               + b"}" + _s("_metadata") + _g("collections", "OrderedDict") + b")R" + b"sb.")
        storages, want = F32x4, [0, 1, 2, 3]
    else:  # torch 2.x _rebuild_tensor_v3: UntypedStorage (numel in bytes) + a torch dtype
        pkl = _state(w=_tensor(numel=8, storage=("torch.storage", "UntypedStorage"), rebuild="_rebuild_tensor_v3",
                               tail=_g("torch", "float16")))
        storages, want = {"0": np.array([0, 1, 2, 3], "<f2").tobytes()}, [0, 1, 2, 3]
    p = tmp_path / "x.pth"
    write_raw_checkpoint(p, pkl, storages)
    with open_checkpoint(p) as ck:
        assert ck.rows("w").tolist() == want


# ---------------------------------------------------------------------------------------------
# Security: hostile pickles inside valid torch zips
# ---------------------------------------------------------------------------------------------

def _payloads(marker: Path) -> dict[str, tuple[bytes, str]]:
    """name -> (data.pkl bytes, the module.name the refusal must mention or the opcode)."""
    cmd = f"touch {marker}"
    call = _g("os", "system") + _tup(_s(cmd)) + b"R"
    return {
        "os.system": (b"\x80\x02" + call + b".", "os.system"),
        "posix.system": (b"\x80\x02" + _g("posix", "system") + _tup(_s(cmd)) + b"R.", "posix.system"),
        "builtins.eval": (b"\x80\x02" + _g("builtins", "eval") + _tup(_s(f"__import__('os').system({cmd!r})"))
                          + b"R.", "builtins.eval"),
        "__builtin__.eval": (b"\x80\x02" + _g("__builtin__", "eval") + _tup(_s(f"__import__('os').system({cmd!r})"))
                             + b"R.", "__builtin__.eval"),
        "subprocess.Popen": (b"\x80\x02" + _g("subprocess", "Popen") + _tup(b"(" + _s("touch") + _s(str(marker)) + b"l")
                             + b"R.", "subprocess.Popen"),
        "stack_global": (b"\x80\x04" + _s("os") + _s("system") + b"\x93" + _tup(_s(cmd)) + b"R.", "os.system"),
        # after a real tensor, inside the next tensor's rebuild arguments (where backward_hooks go)
        "nested": (_state(ok=_tensor(), evil=_tensor(hooks=call)), "os.system"),
        "getattr": (b"\x80\x02" + _g("builtins", "getattr") + _tup(_g("collections", "OrderedDict"), _s("__init__"))
                    + b"R.", "builtins.getattr"),
        "numpy_reconstruct": (b"\x80\x02" + _g("numpy.core.multiarray", "_reconstruct") + b".",
                              "numpy.core.multiarray._reconstruct"),
        "dotted_name": (b"\x80\x04" + _s("torch._utils") + _s("_rebuild_tensor_v2.__globals__") + b"\x93.",
                        "torch._utils._rebuild_tensor_v2.__globals__"),
        "inst": (b"\x80\x02(" + _s(cmd) + b"ios\nsystem\n.", "INST"),
        "obj": (b"\x80\x02(" + _g("collections", "OrderedDict") + b"o.", "OBJ"),
        "newobj": (b"\x80\x02" + _g("collections", "OrderedDict") + b")\x81.", "NEWOBJ"),
        "ext1": (b"\x80\x02\x82\x01.", "EXT1"),
        # allowed names used for something else: calling a storage class, setting a tensor's state
        "call_storage_class": (b"\x80\x02" + _g("torch", "FloatStorage") + b")R.", "calls"),
        "build_on_tensor": (b"\x80\x02" + _tensor() + b"}" + _s("offset") + _i(99) + b"sb.", "BUILD"),
    }


def test_payloads_are_live(tmp_path):
    """Control: plain pickle runs these payloads (so the refusals below are real refusals)."""
    for name in ("os.system", "builtins.eval", "stack_global"):
        marker = tmp_path / f"ran-{name}"
        pickle.loads(_payloads(marker)[name][0])
        assert marker.exists(), name


@pytest.mark.parametrize("name", list(_payloads(Path("x"))))
def test_hostile_pickle_is_refused(tmp_path, name):
    marker = tmp_path / "MARKER"
    pkl, mentioned = _payloads(marker)[name]
    p = tmp_path / "consolidated.00.pth"
    write_raw_checkpoint(p, pkl, F32x4)
    with pytest.raises(UnsafePickleError) as e:
        open_checkpoint(p)
    assert mentioned in str(e.value)
    assert not marker.exists()


def test_meta_tensor_is_explained(tmp_path):
    # exactly what torch.save({"m": torch.empty(3, 4, device="meta")}) pickles
    pkl = _state(m=_g("torch._utils", "_rebuild_meta_tensor_no_storage")
                 + _tup(_g("torch", "float32"), _tup(_i(3), _i(4)), _tup(_i(4), _i(1)), b"\x89") + b"R")
    p = tmp_path / "meta.pth"
    write_raw_checkpoint(p, pkl)
    with pytest.raises(CheckpointError, match="saved without its data.*meta"):
        open_checkpoint(p)


# ---------------------------------------------------------------------------------------------
# Broken files
# ---------------------------------------------------------------------------------------------

def _good(tmp_path: Path) -> Path:
    p = tmp_path / "consolidated.00.pth"
    save_state_dict(p, {"tok_embeddings.weight": _f32(256, 64), "norm.weight": _f32(64)}, dtype="f16")
    return p


@pytest.mark.parametrize("where", ["half", "inside_storage", "before_directory"])
def test_truncated_file(tmp_path, where):
    p = _good(tmp_path)
    data = p.read_bytes()
    with zipfile.ZipFile(p) as z:
        storage = z.getinfo("consolidated.00/data/0").header_offset + 200
        directory = z.start_dir
    cut = {"half": len(data) // 2, "inside_storage": storage, "before_directory": directory}[where]
    p.write_bytes(data[:cut])
    with pytest.raises(CheckpointError, match="truncated"):
        open_checkpoint(p)


def test_storage_shorter_than_its_tensor(tmp_path):
    p = tmp_path / "short.pth"
    write_raw_checkpoint(p, _state(w=_tensor(numel=8, shape=(8,))), F32x4)  # says 8 floats, holds 4
    with pytest.raises(CheckpointError, match="data/0 has 16 bytes but the pickle says 8 x 4"):
        open_checkpoint(p)


def test_tensor_past_its_storage(tmp_path):
    p = tmp_path / "past.pth"
    write_raw_checkpoint(p, _state(w=_tensor(numel=4, shape=(5,))), F32x4)
    with pytest.raises(CheckpointError, match="runs past the end of its storage"):
        open_checkpoint(p)


def test_missing_storage_record(tmp_path):
    p = tmp_path / "nostorage.pth"
    write_raw_checkpoint(p, _state(w=_tensor()), {})
    with pytest.raises(CheckpointError, match="data/0 is missing"):
        open_checkpoint(p)


def test_legacy_format(tmp_path):
    p = tmp_path / "old.pth"
    # the first bytes torch writes with _use_new_zipfile_serialization=False: the magic number,
    # the protocol version 1001, then the system info dict
    p.write_bytes(b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19.\x80\x02M\xe9\x03.\x80\x02}q\x00(X\x10\x00\x00\x00"
                  + b"\x00" * 100)
    with pytest.raises(CheckpointError, match=r"legacy format\): re-save it with torch>=1.6 "
                                              r"`torch.save\(torch.load\(f\), f\)`"):
        open_checkpoint(p)


@pytest.mark.parametrize("content, message", [
    (b"", "empty"),
    (b"hello, this is not a checkpoint" * 10, "not a torch checkpoint"),
    (b"PK\x03\x04" + b"\x00" * 300, "truncated or corrupt"),
])
def test_not_a_checkpoint(tmp_path, content, message):
    p = tmp_path / "x.pth"
    p.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        open_checkpoint(p)


def test_zip_without_data_pkl(tmp_path):
    p = tmp_path / "other.zip"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("archive/readme.txt", "hi")
    with pytest.raises(CheckpointError, match=r"no \*/data.pkl record"):
        open_checkpoint(p)


def test_corrupt_data_pkl(tmp_path):
    p = tmp_path / "c.pth"
    write_raw_checkpoint(p, b"\x80\x02}(X\xff\xff\xff\x7fabc")
    with pytest.raises(CheckpointError, match="data.pkl is corrupt"):
        open_checkpoint(p)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        open_checkpoint(tmp_path / "nope.pth")
    with pytest.raises(CheckpointError, match="is a directory"):
        open_checkpoint(tmp_path)


@pytest.mark.parametrize("storage, rebuild, tail, dtype_name", [
    (("torch", "IntStorage"), "_rebuild_tensor_v2", b"", "torch.int32 (stored as torch.IntStorage)"),
    (("torch", "LongStorage"), "_rebuild_tensor_v2", b"", "torch.int64"),
    (("torch.storage", "UntypedStorage"), "_rebuild_tensor_v3", _g("torch", "uint16"), "torch.uint16"),
])
def test_unsupported_dtype_is_named(tmp_path, storage, rebuild, tail, dtype_name):
    itemsize = {"IntStorage": 4, "LongStorage": 8, "UntypedStorage": 1}[storage[1]]
    numel = 16 // itemsize
    shape = (16 // (2 if rebuild.endswith("v3") else itemsize),)
    p = tmp_path / "i.pth"
    write_raw_checkpoint(p, _state(w=_tensor(numel=numel, shape=shape, storage=storage, rebuild=rebuild, tail=tail)),
                         {"0": bytes(16)})
    with pytest.raises(CheckpointError, match=dtype_name.replace("(", r"\(").replace(")", r"\)")):
        open_checkpoint(p)


# ---------------------------------------------------------------------------------------------
# Bounded memory
# ---------------------------------------------------------------------------------------------

def test_reading_every_block_keeps_rss_low(tmp_path):
    """Reading a 200 MiB tensor block by block never holds more than a block: the file's pages
    are not mapped into the process, and each block's buffer goes when the block does."""
    psutil = pytest.importorskip("psutil")
    rows, cols = 12800, 4096  # 200 MiB of float32
    size = rows * cols * 4
    p = tmp_path / "big.pth"
    save_state_dict(p, {"w": np.zeros((rows, cols), np.float32)}, dtype="f32")
    proc = psutil.Process()
    with open_checkpoint(p) as ck:
        gc.collect()
        base = proc.memory_info().rss
        peak = 0
        for a in range(0, rows, 256):  # 4 MiB blocks
            block = ck.rows("w", a, a + 256)
            peak = max(peak, proc.memory_info().rss - base)
        del block
        # control: the whole tensor at once does show up in RSS
        whole = ck.rows("w")
        held = proc.memory_info().rss - base
        del whole
    assert held > 0.75 * size, f"control failed: the whole tensor raised RSS by only {held / 2**20:.0f} MiB"
    assert peak < size / 8, f"RSS grew {peak / 2**20:.0f} MiB reading a {size / 2**20:.0f} MiB tensor by blocks"
