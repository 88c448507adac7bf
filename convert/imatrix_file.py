"""llama.cpp's importance-matrix files: the GGUF format and the legacy `.dat`, read and written.

An importance matrix holds, for every matmul weight a calibration run saw, the sum of the squared
input activations of each of its columns (`in_sum2`) and how many activation rows were summed
(`counts`); a quantizer weights each column's rounding error by the mean, sum / count. Both files
are written exactly as llama.cpp's `tools/imatrix/imatrix.cpp` writes them and read as
`common/imatrix-loader.cpp` and `tools/quantize/quantize.cpp` read them (the versions vendored by
llama-cpp-python 0.3.36).

GGUF (what llama-imatrix writes by default):

    general.type          "imatrix"
    imatrix.datasets      [str]   the calibration text(s)
    imatrix.chunk_count   u32     windows processed
    imatrix.chunk_size    u32     tokens per window
    <weight>.in_sum2      F32 tensor, ne = (n_cols, n_mat): raw sums of squares
    <weight>.counts       F32 tensor, ne = (1, n_mat): activations summed per matrix
    (weights in sorted order; n_mat is 1 except for stacked experts)

Legacy `.dat` (llama-imatrix --output-format dat), little-endian:

    int32 n_entries
    n_entries x { int32 len, char name[len], int32 ncall, int32 nval, float32 values[nval] }
        values[i] = sum[i] / count * ncall   (ncall = ceil(max count / chunk_size); an
        unexercised matrix stores 1)
    int32 chunk_count                          \\ optional trailer
    int32 len, char dataset[len]               /

llama-quantize turns either into one float per column and matrix: sum / count (GGUF; 1 where
the count is 0) or value / ncall (legacy) — `Imatrix.importance`.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llamalocal.convert.errors import BadInputError

GGUF_MAGIC = b"GGUF"
GENERAL_TYPE = "imatrix"
KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
SUFFIX_SUMS = ".in_sum2"
SUFFIX_COUNTS = ".counts"

# What llama-quantize records in a model quantized with an imatrix (tools/quantize/quantize.cpp).
KEY_QUANTIZE_FILE = "quantize.imatrix.file"
KEY_QUANTIZE_DATASET = "quantize.imatrix.dataset"
KEY_QUANTIZE_ENTRIES = "quantize.imatrix.entries_count"
KEY_QUANTIZE_CHUNKS = "quantize.imatrix.chunks_count"
QUANTIZE_STR_MAX = 127  # llama-quantize passes these strings through a 128-byte kv override

_HINT = "compute one for this model with `llamalocal imatrix MODEL.gguf -f TEXT -o FILE`"


@dataclass
class ImatrixEntry:
    """One weight's statistics."""

    sums: np.ndarray    # float32 (n_mat, n_cols): sums of squared activations (legacy: mean * ncall)
    counts: np.ndarray  # int64 (n_mat,): activation rows summed (legacy: ncall, one value)

    @property
    def n_cols(self) -> int:
        return int(self.sums.shape[1])


@dataclass
class Imatrix:
    """The contents of an imatrix file (or of a calibration run, before it is written)."""

    entries: dict[str, ImatrixEntry] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    legacy: bool = False  # read from a .dat: sums are means * ncall, counts are ncall

    def importance(self, name: str) -> np.ndarray | None:
        """What llama-quantize hands ggml's quantizer for weight `name`: float32 (n_mat * n_cols,),
        or None when the file has no entry for it."""
        e = self.entries.get(name)
        if e is None:
            return None
        if self.legacy:
            ncall = int(e.counts[0]) if e.counts.size else 0
            return (e.sums / np.float32(ncall) if ncall > 0 else e.sums).reshape(-1).astype(np.float32)
        out = np.ones_like(e.sums, dtype=np.float32)
        seen = e.counts > 0
        out[seen] = e.sums[seen] / e.counts[seen, None].astype(np.float32)
        return out.reshape(-1)


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------

def read_imatrix(path: str | Path) -> Imatrix:
    """Read an imatrix file in either format (told apart by the GGUF magic).

    Raises:
        BadInputError: missing, empty, truncated or not an imatrix file.
    """
    p = Path(path)
    if not p.is_file():
        raise BadInputError(f"no imatrix file {p}; {_HINT}")
    with open(p, "rb") as f:
        magic = f.read(4)
    try:
        return _read_gguf(p) if magic == GGUF_MAGIC else _read_legacy(p)
    except BadInputError:
        raise
    except (ValueError, IndexError, KeyError, struct.error, OSError, UnicodeDecodeError) as e:
        raise BadInputError(f"{p} is not a readable imatrix file ({e}); it may be truncated: {_HINT}") from None


def _read_gguf(p: Path) -> Imatrix:
    import gguf

    r = gguf.GGUFReader(str(p))
    general_type = r.fields.get(gguf.Keys.General.TYPE)
    kind = general_type.contents() if general_type is not None else None
    if kind not in (None, GENERAL_TYPE) or gguf.Keys.General.ARCHITECTURE in r.fields:
        raise BadInputError(f"{p} is a GGUF {kind or 'model'} file, not an imatrix; pass the file "
                            "`llamalocal imatrix` (or llama-imatrix) wrote")
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for t in r.tensors:
        if t.tensor_type != gguf.GGMLQuantizationType.F32:
            raise BadInputError(f"{p}: {t.name} is {t.tensor_type.name}; imatrix sums and counts are F32")
        ne = [int(n) for n in t.shape]  # ggml order: ne[0] is the row
        n = math.prod(ne)
        data = np.asarray(t.data, dtype=np.float32).reshape(-1)
        if data.size != n:
            raise BadInputError(f"{p} is truncated: {t.name} holds {data.size} of its {n} values; {_HINT}")
        if t.name.endswith(SUFFIX_SUMS):
            sums[t.name[:-len(SUFFIX_SUMS)]] = data.reshape(ne[1] if len(ne) > 1 else 1, ne[0]).copy()
        elif t.name.endswith(SUFFIX_COUNTS):
            counts[t.name[:-len(SUFFIX_COUNTS)]] = np.rint(data).astype(np.int64)
    if not sums and not counts:
        raise BadInputError(f"{p} holds no imatrix entries; {_HINT}")
    unpaired = sorted(set(sums) ^ set(counts))
    if unpaired:
        raise BadInputError(f"{p}: sums and counts do not pair up for {unpaired[:3]}; the file is damaged")
    entries = {}
    for name in sorted(sums):
        s, c = sums[name], counts[name]
        if s.size % c.size:
            raise BadInputError(f"{p}: {name} has {s.size} sums for {c.size} matrices; the file is damaged")
        entries[name] = ImatrixEntry(s.reshape(c.size, -1), c)
    missing = [k for k in (KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE) if k not in r.fields]
    if missing:
        # llama-quantize refuses such a file ("missing imatrix metadata")
        raise BadInputError(f"{p} lacks the imatrix metadata {', '.join(missing)}; {_HINT}")
    datasets = [str(v) for v in r.fields[KEY_DATASETS].contents()]
    return Imatrix(entries, datasets, int(r.fields[KEY_CHUNK_COUNT].contents()),
                   int(r.fields[KEY_CHUNK_SIZE].contents()))


class _Cursor:
    """Reads the legacy format field by field; running out of bytes is a truncated file."""

    def __init__(self, data: bytes, path: Path) -> None:
        self.data, self.at, self.path = data, 0, path

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.at + n > len(self.data):
            raise BadInputError(f"{self.path} is truncated (it ends inside {what}); {_HINT}")
        b = self.data[self.at:self.at + n]
        self.at += n
        return b

    def i32(self, what: str) -> int:
        return int(struct.unpack("<i", self.take(4, what))[0])

    @property
    def left(self) -> int:
        return len(self.data) - self.at


def _read_legacy(p: Path) -> Imatrix:
    c = _Cursor(p.read_bytes(), p)
    if c.left < 4:
        raise BadInputError(f"{p} is empty or truncated; {_HINT}")
    n_entries = c.i32("the entry count")
    if n_entries < 1:
        raise BadInputError(f"{p} is neither a GGUF imatrix nor a legacy .dat one (no entries); {_HINT}")
    entries: dict[str, ImatrixEntry] = {}
    for i in range(n_entries):
        what = f"entry {i + 1} of {n_entries}"
        size = c.i32(what)
        if not 0 < size <= 4096:
            raise BadInputError(f"{p} is not an imatrix file (entry {i + 1} has a name of {size} bytes); {_HINT}")
        name = c.take(size, what).decode()
        ncall, nval = c.i32(what), c.i32(what)
        if nval < 1:
            raise BadInputError(f"{p}: {name} has {nval} values; the file is damaged")
        values = np.frombuffer(c.take(4 * nval, what), dtype="<f4").astype(np.float32)
        entries[name] = ImatrixEntry(values.reshape(1, nval), np.array([ncall], dtype=np.int64))
    chunk_count, datasets = 0, []
    if c.left:  # the optional trailer
        chunk_count = c.i32("the chunk count")
        if c.left >= 4:
            size = c.i32("the dataset name")
            if size > 0:
                datasets.append(c.take(size, "the dataset name").decode(errors="replace"))
    return Imatrix(dict(sorted(entries.items())), datasets, chunk_count, 0, legacy=True)


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------

def _publish(tmp: Path, final: Path) -> None:
    os.replace(tmp, final)


def write_imatrix(path: str | Path, imx: Imatrix, *, legacy: bool | None = None) -> Path:
    """Write `imx` (raw sums and counts) as llama-imatrix does: GGUF, or the legacy `.dat` when
    `legacy` (default: when the name does not end in .gguf, as llama-imatrix's --output-format
    decides). Written under a temporary name and renamed, so a failure leaves nothing."""
    p = Path(path)
    if imx.legacy:
        raise ValueError("a legacy imatrix holds means, not sums; it cannot be written again")
    as_dat = (p.suffix.lower() != ".gguf") if legacy is None else legacy
    tmp = p.with_name(f".{p.name}.partial")
    try:
        (_write_legacy if as_dat else _write_gguf)(tmp, imx)
        _publish(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return p


def _write_gguf(p: Path, imx: Imatrix) -> None:
    import gguf

    w = gguf.GGUFWriter(str(p), arch=GENERAL_TYPE)
    w.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)  # llama-imatrix writes no architecture
    w.add_type(GENERAL_TYPE)
    w.add_key_value(KEY_DATASETS, list(imx.datasets), gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING)
    w.add_uint32(KEY_CHUNK_COUNT, imx.chunk_count)
    w.add_uint32(KEY_CHUNK_SIZE, imx.chunk_size)
    for name in sorted(imx.entries):
        e = imx.entries[name]
        n_mat = len(e.counts)
        # ne (n_cols, n_mat) and (1, n_mat); ggml stores no trailing dimensions of 1 (ggml_n_dims)
        sums_shape, counts_shape = ((-1,), (1,)) if n_mat == 1 else ((n_mat, -1), (n_mat, 1))
        w.add_tensor(name + SUFFIX_SUMS, np.ascontiguousarray(e.sums, dtype=np.float32).reshape(sums_shape))
        w.add_tensor(name + SUFFIX_COUNTS, e.counts.astype(np.float32).reshape(counts_shape))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _write_legacy(p: Path, imx: Imatrix) -> None:
    chunk = max(1, imx.chunk_size)
    out = [struct.pack("<i", len(imx.entries))]
    for name in sorted(imx.entries):
        e = imx.entries[name]
        ncall = (int(e.counts.max()) + chunk - 1) // chunk  # rounded up: no accidental zeros
        counts = e.counts.astype(np.float32)[:, None]
        sums = e.sums.astype(np.float32)
        unseen = np.broadcast_to(counts == 0, sums.shape)
        values = np.where(unseen, np.float32(1.0), sums / np.where(counts == 0, np.float32(1), counts))
        values = (values * np.float32(ncall)).astype("<f4")
        raw = name.encode()
        out += [struct.pack("<i", len(raw)), raw, struct.pack("<ii", ncall, values.size), values.tobytes()]
    dataset = (imx.datasets[-1] if imx.datasets else "").encode()
    out += [struct.pack("<i", imx.chunk_count), struct.pack("<i", len(dataset)), dataset]
    p.write_bytes(b"".join(out))


# ---------------------------------------------------------------------------------------------
# matching a model
# ---------------------------------------------------------------------------------------------

def match_model(imx: Imatrix, source: str, columns: Mapping[str, int], calibrated: Iterable[str]) -> list[str]:
    """Check that an imatrix belongs to a model before any work.

    Args:
        imx: the imatrix.
        source: its file name, for messages.
        columns: every 2-D weight of the model -> its row length (ggml's ne[0]).
        calibrated: the weights the model's quantization would use importance for (those
            llama-imatrix covers: every blk.* matmul).

    Returns:
        Warnings (weights it does not cover, which are then quantized without).

    Raises:
        BadInputError: an entry names a weight the model does not have, or has another number
            of columns: the imatrix is from another model.
    """
    foreign = [n for n in imx.entries if n not in columns]
    if foreign:
        raise BadInputError(f"{source} is not for this model: it has entries for {foreign[:3]}"
                            f"{' ...' if len(foreign) > 3 else ''}, which this model does not have; {_HINT}")
    for name, e in imx.entries.items():
        if e.sums.size != columns[name]:
            raise BadInputError(f"{source} is not for this model: {name} has {columns[name]} columns here but "
                                f"{e.sums.size} values in the imatrix; {_HINT}")
    wanted = list(calibrated)
    uncovered = [n for n in wanted if n not in imx.entries]
    if wanted and len(uncovered) == len(wanted):
        raise BadInputError(f"{source} covers none of this model's weights; {_HINT}")
    if uncovered:
        return [f"{source} has no entry for {len(uncovered)} of {len(wanted)} weights "
                f"({', '.join(uncovered[:3])}{' ...' if len(uncovered) > 3 else ''}); they are quantized without one"]
    return []
