"""Fuzz `llamalocal convert` with mutated real checkpoints, for a bounded time.

Each case copies a real Meta-layout fixture (../shared/fixtures/meta-tiny, torch-written; a
synthetic sample when it is absent), damages one thing, and runs the real CLI in a child under
resource limits (address space, CPU time, file size; tests/hostile.py). What it damages:

  pickle   data.pkl, re-wrapped in a valid zip with the original storages: bit flips, byte edits,
           inserted/deleted/duplicated ranges, truncation, opcode-aware edits (an int argument set
           to a boundary value, a string replaced, an opcode swapped for another), and hostile
           gadgets spliced in (deep nesting, shared-structure DAGs, REDUCE with a dict, memo bloat)
  zip      the file's own bytes, CRCs left stale: a central-directory, local-header or end-record
           field set to a boundary value, bytes flipped in the headers, truncation, garbage appended
  params   params.json: a known or new key set to a value of another type or range (NaN,
           Infinity, huge ints, strings, arrays), a key deleted, the text itself flipped or cut

Every outcome is classified. Expected: `ok` (it still converts: the output exists and nothing
else is left) or `refused` (exit 2, one `Error:` line, no traceback, no raw control characters,
nothing left). Anything else is a finding and is saved under --out with the files and stderr:
`crash` (killed by a signal), `hang` (past --timeout), `traceback`, `exit_code`, `multiline`,
`control_chars`, `memory` (peak RSS over --max-rss-mib), `leftover`.

    python scripts/fuzz_convert.py --minutes 20 --jobs 2 --out /tmp/fuzz
    python scripts/fuzz_convert.py --cases 200 --seed 7        # a fixed number, reproducible

Prints a progress line a minute and the counts at the end (exit code 1 if anything was found).
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import pickletools
import random
import shutil
import struct
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import hostile  # noqa: E402  (tests/hostile.py: the limited child runner and pickle builders)

from llamalocal.convert.torch_save import write_raw_checkpoint  # noqa: E402

FIXTURES = REPO.parent / "shared" / "fixtures" / "meta-tiny"
PRESETS = ["q8_0", "q8_0", "q4_0", "f16", "q4_k_m"]  # what a case converts to (quick ones, real quantizers)

INTS = [0, 1, -1, 2, 7, 255, 256, 65535, 65536, 2**31 - 1, -2**31, 2**32, 2**32 + 1, 2**62, 2**63 - 1, 2**63,
        -2**63, 2**64, 2**64 + 4, 10**30, -(10**30), 2**1000]
STRINGS = ["", "0", "storage", "cpu", "../../../etc/passwd", "x" * 5000, "\x1b[31m\nWrote x", "\udcff",
           "torch", "FloatStorage", "layers.0.attention.wq.weight", "tok_embeddings.weight", "\x00"]
JSON_VALUES = [None, True, False, 0, -1, 1, 3, 2**31, 2**63, 10**30, 10**400, 1.5, -0.0, 1e-320, 1e308,
               float("nan"), float("inf"), float("-inf"), "1", "", "x" * 10_000, [], [1], {}, {"a": 1}]


# ---------------------------------------------------------------------------------------------
# Base models
# ---------------------------------------------------------------------------------------------

def base_models(work: Path) -> list[Path]:
    """Model folders to mutate (each with tokenizer.model in its parent): the real fixtures."""
    if (FIXTURES / "tiny-v2" / "params.json").is_file():
        root = work / "base"
        shutil.copytree(FIXTURES, root)
        for p in root.rglob("*"):
            p.chmod(0o755 if p.is_dir() else 0o644)
        return [root / "tiny-v2", root / "tiny-v1"]
    print("fuzz: ../shared/fixtures absent; mutating a synthetic sample instead", file=sys.stderr)
    from llamalocal.convert.params import ModelParams
    from llamalocal.convert.sample import SampleSpec, build_sample

    p = ModelParams(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=64, norm_eps=1e-5)
    return [build_sample(work / "base", "sample", SampleSpec(params=p, n_shards=2, vocab_size=400))]


_CLASS = {"f16": "HalfStorage", "bf16": "BFloat16Storage", "f32": "FloatStorage"}
_ITEMSIZE = {"HalfStorage": 2, "BFloat16Storage": 2, "FloatStorage": 4, "DoubleStorage": 8, "IntStorage": 4,
             "LongStorage": 8, "ByteStorage": 1}


def _layout(shard: Path) -> list[dict]:
    """The base shard's tensors as editable records (name, shape, stride, key, offset, class)."""
    from llamalocal.convert.checkpoint import open_checkpoint

    with open_checkpoint(shard) as ck:
        return [{"name": t.name, "shape": list(t.shape), "stride": list(t.stride), "key": t.storage_key,
                 "offset": t.storage_offset, "cls": _CLASS[t.dtype_name]} for t in ck.tensors.values()]


def _rebuild(layout: list[dict], storages: dict[str, bytes]) -> bytes:
    items = []
    for t in layout:
        numel = len(storages.get(t["key"], b"")) // _ITEMSIZE.get(t["cls"], 1)
        items.append((hostile.s(t["name"]), hostile.tensor(tuple(t["shape"]), key=t["key"], numel=numel,
                                                           offset=t["offset"], stride=tuple(t["stride"]),
                                                           cls=t["cls"])))
    return hostile.state(*items)


def mutate_layout(layout: list[dict], storages: dict[str, bytes], rng: random.Random) -> tuple[bytes, str]:
    """A structurally sound pickle describing the tensors differently: a name, a shape, a stride,
    an offset or a dtype changed, a tensor dropped or repeated under another name."""
    layout = [dict(t, shape=list(t["shape"]), stride=list(t["stride"])) for t in layout]
    t = rng.choice(layout)
    kind = rng.choice(["name", "shape", "shape", "stride", "offset", "class", "drop", "alias", "swap_names"])
    if kind == "name":
        t["name"] = rng.choice([u["name"] for u in layout] + STRINGS + ["layers.99.attention.wq.weight",
                                                                      "layers.1.attention.wq.bias", "rope.freqs"])
    elif kind == "shape":
        how = rng.choice(["transpose", "flatten", "unsqueeze", "halve", "double", "boundary"])
        if how == "transpose" and len(t["shape"]) == 2:
            t["shape"].reverse()
            t["stride"] = [t["shape"][1], 1]
        elif how == "flatten":
            t["shape"], t["stride"] = [math.prod(t["shape"])], [1]
        elif how == "unsqueeze":
            t["shape"].insert(0, 1)
            t["stride"].insert(0, math.prod(t["shape"]))
        elif how in ("halve", "double"):
            t["shape"][0] = t["shape"][0] // 2 if how == "halve" else t["shape"][0] * 2
        else:
            t["shape"][rng.randrange(len(t["shape"]))] = rng.choice([0, 1, 2**31, 2**32 - 1, 2**40])
        kind = f"shape.{how}"
    elif kind == "stride":
        t["stride"][rng.randrange(len(t["stride"]))] = rng.choice([0, 2, 3, 2**20, 2**61])
    elif kind == "offset":
        t["offset"] = rng.choice([1, 7, 4096, math.prod(t["shape"]), 2**40])
    elif kind == "class":
        t["cls"] = rng.choice(list(_ITEMSIZE))
    elif kind == "drop":
        layout.remove(t)
    elif kind == "alias":
        layout.append(dict(t, name=rng.choice([u["name"] for u in layout]) + rng.choice(["", "x"])))
    else:
        u = rng.choice(layout)
        t["name"], u["name"] = u["name"], t["name"]
    return _rebuild(layout, storages), f"layout:{kind}"


def _pickle_of(shard: Path) -> tuple[bytes, dict[str, bytes]]:
    """data.pkl and the storages of a torch zip (read with zipfile: the base files are sound)."""
    import zipfile

    with zipfile.ZipFile(shard) as z:
        names = z.namelist()
        pkl = next(n for n in names if n.endswith("/data.pkl"))
        prefix = pkl[:-len("data.pkl")]
        storages = {n[len(prefix) + 5:]: z.read(n) for n in names if n.startswith(prefix + "data/")}
        return z.read(pkl), storages


# ---------------------------------------------------------------------------------------------
# Mutations
# ---------------------------------------------------------------------------------------------

def _encode_int(n: int) -> bytes:
    return hostile.i(n) if n.bit_length() < 2000 else b"L" + str(n).encode() + b"L\n"


GADGETS = [
    lambda: hostile.EMPTY_TUPLE + hostile.TUPLE1 * 5000,                      # deep
    lambda: hostile.EMPTY_TUPLE + (hostile.DUP + hostile.TUPLE2) * 64,          # shared DAG
    lambda: hostile.g("collections", "OrderedDict") + hostile.EMPTY_DICT + hostile.TUPLE1 + hostile.REDUCE,
    lambda: hostile.MARK * 200,
    lambda: b"".join(hostile.i(0) + hostile.put(k) + hostile.POP for k in range(2000)),
    lambda: hostile.g("os", "system"),
    lambda: hostile.g("torch._utils", "_rebuild_tensor_v2"),
    lambda: hostile.s("\x1b]0;t\x07\nWrote "),
    lambda: b"\x8a\xff" + b"\x7f" * 255,                                         # LONG1 of 2040 bits
    lambda: b"\x8b" + struct.pack("<i", 3000) + b"\x01" * 3000,                # LONG4 (refused opcode)
    lambda: b"\x8f",                                                            # EMPTY_SET
    lambda: b"C\x04abcd",                                                       # SHORT_BINBYTES
]


def mutate_pickle(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    if len(data) < 2:
        return data + bytes([rng.randrange(256)]), "pickle:insert"
    b = bytearray(data)
    kind = rng.choice(["flip", "byte", "insert", "delete", "dup", "truncate", "int", "string", "opcode",
                       "gadget", "gadget", "int", "int"])
    if kind == "flip":
        for _ in range(rng.randint(1, 8)):
            at = rng.randrange(len(b))
            b[at] ^= 1 << rng.randrange(8)
    elif kind == "byte":
        b[rng.randrange(len(b))] = rng.randrange(256)
    elif kind == "insert":
        at = rng.randrange(len(b))
        b[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    elif kind == "delete":
        at = rng.randrange(len(b))
        del b[at:at + rng.randint(1, 64)]
    elif kind == "dup":
        at, n = rng.randrange(len(b)), rng.randint(1, 512)
        b[at:at] = b[at:at + n]
    elif kind == "truncate":
        del b[rng.randrange(len(b)):]
    else:
        try:
            return _mutate_opcodes(data, b, kind, rng)
        except (ValueError, IndexError, StopIteration):  # an already-mutated pickle genops cannot walk
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
            kind = "flip"
    return bytes(b), f"pickle:{kind}"


def _mutate_opcodes(data: bytes, b: bytearray, kind: str, rng: random.Random) -> tuple[bytes, str]:
    ops = [(op, arg, int(pos or 0)) for op, arg, pos in pickletools.genops(data)]
    if kind == "int":
        picks = [(op, arg, pos) for op, arg, pos in ops if op.name in ("BININT", "BININT1", "BININT2", "LONG1")]
        op, arg, pos = rng.choice(picks)
        end = next(p for _, _, p in ops if p > pos)
        b[pos:end] = _encode_int(rng.choice(INTS))
    elif kind == "string":
        picks = [(op, arg, pos) for op, arg, pos in ops if op.name in ("BINUNICODE", "SHORT_BINUNICODE")]
        op, arg, pos = rng.choice(picks)
        end = next(p for _, _, p in ops if p > pos)
        b[pos:end] = hostile.s(rng.choice(STRINGS))
    elif kind == "opcode":
        op, arg, pos = rng.choice(ops[1:-1])
        b[pos] = ord(rng.choice(pickletools.opcodes).code)
    else:  # gadget: spliced in at an opcode boundary
        _, _, pos = rng.choice(ops[1:])
        b[pos:pos] = rng.choice(GADGETS)()
    return bytes(b), f"pickle:{kind}"


def _central(data: bytes) -> list[int]:
    eocd = data.rfind(b"PK\x05\x06")
    if eocd < 0:
        return []
    cd_size, cd_offset = struct.unpack_from("<II", data, eocd + 12)
    out, at = [], cd_offset
    while at + 46 <= min(len(data), cd_offset + cd_size) and data[at:at + 4] == b"PK\x01\x02":
        out.append(at)
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", data, at + 28)
        at += 46 + name_len + extra_len + comment_len
    return out


FIELD_VALUES = {"H": [0, 1, 8, 9, 12, 14, 20, 45, 63, 64, 99, 0x7FFF, 0xFFFF],
                "I": [0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF],
                "Q": [0, 1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64 - 1]}


def mutate_zip(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    b = bytearray(data)
    central = _central(data)
    locals_ = [struct.unpack_from("<I", data, c + 42)[0] for c in central]
    eocd, z64 = data.rfind(b"PK\x05\x06"), data.rfind(b"PK\x06\x06")
    kind = rng.choice(["central", "central", "central", "local", "local", "eocd", "zip64", "flip", "truncate",
                       "append"])
    if kind == "central" and central:
        at = rng.choice(central)
        off, fmt = rng.choice([(4, "H"), (6, "H"), (8, "H"), (10, "H"), (16, "I"), (20, "I"), (24, "I"), (28, "H"),
                               (30, "H"), (32, "H"), (42, "I")])
        struct.pack_into("<" + fmt, b, at + off, rng.choice(FIELD_VALUES[fmt]))
    elif kind == "local" and locals_:
        at = rng.choice(locals_)
        if at + 30 <= len(b):
            off, fmt = rng.choice([(4, "H"), (6, "H"), (8, "H"), (18, "I"), (22, "I"), (26, "H"), (28, "H")])
            struct.pack_into("<" + fmt, b, at + off, rng.choice(FIELD_VALUES[fmt]))
    elif kind == "eocd" and eocd >= 0:
        off, fmt = rng.choice([(8, "H"), (10, "H"), (12, "I"), (16, "I"), (20, "H")])
        struct.pack_into("<" + fmt, b, eocd + off, rng.choice(FIELD_VALUES[fmt]))
    elif kind == "zip64" and z64 >= 0:
        off, fmt = rng.choice([(4, "Q"), (24, "Q"), (32, "Q"), (40, "Q"), (48, "Q")])
        struct.pack_into("<" + fmt, b, z64 + off, rng.choice(FIELD_VALUES[fmt]))
    elif kind == "flip":
        regions = [(c, c + 46) for c in central] + [(h, h + 30) for h in locals_] + [(max(0, eocd - 200), len(b))]
        lo, hi = rng.choice(regions)
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(lo, min(hi, len(b)))
            b[at] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        del b[rng.randrange(len(b)):]
    else:
        b += bytes(rng.randrange(256) for _ in range(rng.randint(1, 4096)))
    return bytes(b), f"zip:{kind}"


def mutate_params(text: str, rng: random.Random) -> tuple[bytes, str]:
    kind = rng.choice(["value", "value", "value", "delete", "new_key", "raw", "deep", "swap_types"])
    try:
        obj = json.loads(text)
    except ValueError:
        obj = {}
    if kind in ("value", "swap_types") and obj:
        key = rng.choice(sorted(obj))
        obj[key] = rng.choice(JSON_VALUES) if kind == "value" else str(obj[key])
    elif kind == "delete" and obj:
        del obj[rng.choice(sorted(obj))]
    elif kind == "new_key":
        obj[rng.choice(["rope_theta", "n_kv_heads", "ffn_dim_multiplier", "use_scaled_rope", "vocab_size",
                        "max_seq_len", "x"])] = rng.choice(JSON_VALUES)
    elif kind == "deep":
        return ("[" * 100_000 + "]" * 100_000).encode(), "params:deep"
    if kind == "raw":
        b = bytearray(text.encode())
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        return bytes(b), "params:raw"
    return json.dumps(obj, allow_nan=True).encode(), f"params:{kind}"


# ---------------------------------------------------------------------------------------------
# One case
# ---------------------------------------------------------------------------------------------

def _link_model(base: Path, dest: Path) -> Path:
    """dest/<name>: symlinks to the base model's files and its parent's tokenizer files."""
    model = dest / base.name
    model.mkdir(parents=True)
    for f in base.iterdir():
        (model / f.name).symlink_to(f)
    for name in ("tokenizer.model", "tokenizer_checklist.chk"):
        if (base.parent / name).exists():
            (dest / name).symlink_to(base.parent / name)
    return model


def run_case(base: Path, pickles: dict[Path, tuple[bytes, dict, list]], work: Path, rng: random.Random,
             args: argparse.Namespace) -> tuple[str, str, Path]:
    case = Path(tempfile.mkdtemp(prefix="case-", dir=work))
    model = _link_model(base, case)
    shards = sorted(base.glob("consolidated.*.pth"))
    target = rng.choices(["pickle", "layout", "zip", "params"], weights=[30, 20, 25, 25])[0]
    if target in ("pickle", "layout"):
        shard = rng.choice(shards)
        pkl, storages, layout = pickles[shard]
        if target == "layout":
            mutated, what = mutate_layout(layout, storages, rng)
        else:
            mutated, what = pkl, "pickle"
            for _ in range(rng.choice([1, 1, 1, 2, 3])):  # sometimes several edits on top of each other
                mutated, kind = mutate_pickle(mutated, rng)
                what = kind if what == "pickle" else "pickle:stacked"
        (model / shard.name).unlink()
        write_raw_checkpoint(model / shard.name, mutated, storages)
    elif target == "zip":
        shard = rng.choice(shards)
        mutated, what = mutate_zip(shard.read_bytes(), rng)
        (model / shard.name).unlink()
        (model / shard.name).write_bytes(mutated)
    else:
        mutated, what = mutate_params((base / "params.json").read_text(), rng)
        (model / "params.json").unlink()
        (model / "params.json").write_bytes(mutated)
    preset = rng.choice(PRESETS)
    r = hostile.run_cli(["convert", model, f"--{preset}", "--quiet", "--no-verify"], timeout=args.timeout,
                        cpu_s=int(args.timeout))
    (case / "stderr.txt").write_text(r.describe())
    return classify(r, model, preset, args.max_rss_mib), what, case


def classify(r: hostile.Run, model: Path, preset: str, max_rss_mib: float) -> str:
    left = hostile.leftovers(model.parent)
    if r.timed_out:
        return "hang"
    if r.signal is not None:
        return "crash"
    if "Traceback" in r.stderr or "Fatal Python error" in r.stderr:
        return "traceback"
    if r.max_rss_mib > max_rss_mib:
        return "memory"
    if r.code == 0:
        return "ok" if left == [str(model / f"ggml-model-{preset}.gguf")] else "leftover"
    if r.code != 2:
        return "exit_code"
    lines = r.stderr.strip("\n").split("\n")
    if len(lines) != 1 or not lines[0].startswith("Error: "):
        return "multiline"
    if not lines[0].isprintable():
        return "control_chars"
    return "leftover" if left else "refused"


# ---------------------------------------------------------------------------------------------
# Main loop
# ---------------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=20.0, help="run for this long (default 20)")
    ap.add_argument("--cases", type=int, default=None, help="stop after this many cases instead")
    ap.add_argument("--jobs", type=int, default=2, help="cases run at once (default 2)")
    ap.add_argument("--seed", type=int, default=None, help="random seed (default: from the clock)")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds before a case counts as a hang")
    ap.add_argument("--max-rss-mib", type=float, default=200.0,
                    help="peak RSS above which a case is a finding (default 200; the converter at work ~150)")
    ap.add_argument("--out", type=Path, default=None, help="where findings are kept (default: a temp dir)")
    args = ap.parse_args()
    seed = args.seed if args.seed is not None else int(time.time())
    out = args.out or Path(tempfile.mkdtemp(prefix="fuzz-findings-"))
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="fuzz-work-"))
    bases = base_models(work)
    pickles = {shard: (*_pickle_of(shard), _layout(shard))
               for base in bases for shard in sorted(base.glob("consolidated.*.pth"))}

    counts: collections.Counter[str] = collections.Counter()
    by_kind: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    lock = threading.Lock()
    t0 = time.monotonic()
    deadline = t0 + args.minutes * 60
    last_report = [t0]
    n_started = [0]
    print(f"fuzz: seed {seed}, {len(bases)} base model(s), {args.jobs} jobs, findings -> {out}", file=sys.stderr)

    def worker(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        while True:
            with lock:
                if time.monotonic() > deadline or (args.cases is not None and n_started[0] >= args.cases):
                    return
                n_started[0] += 1
                number = n_started[0]
            base = rng.choice(bases)
            outcome, what, case = run_case(base, pickles, work, rng, args)
            with lock:
                counts[outcome] += 1
                by_kind[what][outcome] += 1
                if outcome not in ("ok", "refused"):
                    keep = out / f"{outcome}-{number:05d}-{what.replace(':', '-')}"
                    shutil.copytree(case, keep, symlinks=False)
                now = time.monotonic()
                if now - last_report[0] > 60:
                    last_report[0] = now
                    print(f"fuzz: {(now - t0) / 60:.1f} min, {sum(counts.values())} cases: {dict(counts)}",
                          file=sys.stderr)
            shutil.rmtree(case, ignore_errors=True)

    with ThreadPoolExecutor(args.jobs) as pool:
        for f in [pool.submit(worker, k) for k in range(args.jobs)]:
            f.result()
    shutil.rmtree(work, ignore_errors=True)

    total = sum(counts.values())
    findings = total - counts["ok"] - counts["refused"]
    minutes = (time.monotonic() - t0) / 60
    print(f"\nfuzz: {total} cases in {minutes:.1f} min (seed {seed}): {counts['ok']} converted, "
          f"{counts['refused']} refused with one line, {findings} findings")
    for what in sorted(by_kind):
        print(f"  {what:18s} " + ", ".join(f"{k} {v}" for k, v in sorted(by_kind[what].items())))
    for k in sorted(counts):
        if k not in ("ok", "refused"):
            print(f"  FINDING {k}: {counts[k]} (kept under {out})")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
