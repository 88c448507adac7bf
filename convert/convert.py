"""`convert()`: a Meta download to one GGUF in a single streaming pass.

Orchestration only: the pieces live in their own modules (checkpoint reading, shard merging,
model families and their tensor names, params, tokenizer, presets/quantization, GGUF writing). Each tensor is read,
merged, quantized straight to its final type and written in blocks of rows, so peak memory
does not grow with model size and there is no f16 scratch file.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from queue import Empty, Queue
from typing import Protocol

import gguf
import numpy as np

from llamalocal.convert import imatrix_file, presets, verified
from llamalocal.convert.checklist import read_checklist, verify_checklist
from llamalocal.convert.checkpoint import Checkpoint, open_checkpoint
from llamalocal.convert.direct_io import aligned_empty
from llamalocal.convert.errors import (
    BadInputError,
    CheckpointError,
    ChecksumError,
    DiskSpaceError,
    OutputExistsError,
    Terminated,
)
from llamalocal.convert.families import (
    LAYER_TENSORS,
    ROPE_FREQS,
    SKIPPED,
    Family,
    check_supported,
    check_tensor_names,
    detect,
    expected_shapes,
    is_instruct,
    meta_names,
    model_name,
    rope_freq_factors,
)
from llamalocal.convert.gguf_out import StreamingGGUFWriter
from llamalocal.convert.imatrix_file import Imatrix, match_model, read_imatrix
from llamalocal.convert.merge import (
    ShardSlice,
    blocks,
    check_replicas,
    check_replicated,
    kv_replicas,
    merged_shape,
    same_values,
)
from llamalocal.convert.params import ModelParams, load_params
from llamalocal.convert.quantize import quantize_block, quantized_nbytes
from llamalocal.convert.tokenizer import Vocab, add_to_gguf, find_tokenizer, load_vocab

SHARD_GLOB = "consolidated.*.pth"
CHECKLIST = "checklist.chk"
TOKENIZER_CHECKLIST = "tokenizer_checklist.chk"
BLOCK_ELEMENTS = 4 * 2**20  # values read and handed to a worker at a time (8 MiB of fp16)
DISK_MARGIN = 64 * 1024 * 1024
# Rows an embedding may have beyond the tokenizer's pieces (Code Llama: 16); more means the two do
# not belong together, and padding a vocabulary to a hostile row count would not end.
MAX_VOCAB_PADDING = 1024


class Progress(Protocol):
    """What the converter reports; the CLI draws it as tqdm bars on stderr."""

    def stage(self, name: str, total_bytes: int) -> None: ...
    def advance(self, nbytes: int, label: str = "") -> None: ...


class _Silent:
    def stage(self, name: str, total_bytes: int) -> None:
        pass

    def advance(self, nbytes: int, label: str = "") -> None:
        pass


@dataclass
class TensorPlan:
    meta_name: str
    gguf_name: str
    shape: tuple[int, ...]  # numpy order: (rows, cols)
    split_dim: int | None
    qtype: gguf.GGMLQuantizationType
    nbytes: int
    replicas: int = 1  # consecutive shards holding copies of the same rows (merge.kv_replicas)
    values: np.ndarray | None = None  # computed here, not read from the checkpoint (rope_freqs)
    importance: np.ndarray | None = None  # float32 per column, from an imatrix


@dataclass
class ConvertResult:
    path: Path
    preset: str
    n_params: int
    file_bytes: int
    seconds: float
    tensors: list[TensorPlan] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was verified and how
    family: str = ""  # the family's label: "Llama-3.1"
    n_ctx: int = 0  # the context length recorded
    rope_scaling_factor: float | None = None  # Meta's scaled-rope factor written into rope_freqs
    tied_embeddings: bool = False  # no output.weight: llama.cpp uses token_embd as the output
    kv_replicas: int = 1  # shards per KV head copy that were merged into one (405B MP16: 2)
    imatrix_entries: int = 0  # tensors quantized with importance from an imatrix (0: none)

    @property
    def bits_per_weight(self) -> float:
        return self.file_bytes * 8 / self.n_params


def default_outfile(model_dir: Path, preset: presets.Preset) -> Path:
    return Path(model_dir) / f"ggml-model-{preset.name}.gguf"


def shard_files(model_dir: Path) -> list[Path]:
    files = sorted(Path(model_dir).glob(SHARD_GLOB))
    if not files:
        raise BadInputError(f"no {SHARD_GLOB} in {model_dir}; point at a Meta model folder (e.g. 7B/, llama-2-13b/)")
    expected = [f"consolidated.{i:02d}.pth" for i in range(len(files))]
    if [f.name for f in files] != expected:
        raise BadInputError(f"shards in {model_dir} are {[f.name for f in files]}; expected {expected} "
                            "(a shard is missing or misnamed)")
    return files


def _tied_output(shards: list, family: Family) -> bool:
    """Whether output.weight is tok_embeddings: the same storage in the pickle or, in a family whose
    small sizes tie them (Llama-3.2), absent (llama.cpp then uses the embeddings) or equal."""
    def same_storage(s) -> bool:
        a, b = s.tensors["tok_embeddings.weight"], s.tensors["output.weight"]
        return (a.storage_key, a.storage_offset, a.shape) == (b.storage_key, b.storage_offset, b.shape)

    if "tok_embeddings.weight" not in shards[0].tensors:
        return False  # reported as missing by _plan_tensors
    if any("output.weight" not in s.tensors for s in shards):
        return family.tied_output  # elsewhere a missing output.weight is a missing tensor
    if all(same_storage(s) for s in shards):
        return True
    return family.tied_output and all(
        s.tensors["tok_embeddings.weight"].shape == s.tensors["output.weight"].shape for s in shards) and all(
        same_values(s, "tok_embeddings.weight", "output.weight", BLOCK_ELEMENTS) for s in shards)


def _plan_tensors(shards: list, p: ModelParams, preset: presets.Preset, family: Family,
                  replicas: int = 1, has_imatrix: bool = False) -> tuple[list[TensorPlan], int, bool]:
    """Check names and shapes against params.json; choose each tensor's output type.

    Returns (the tensors to write, in order; the vocabulary size; whether the output is tied)."""
    names = [n for n in shards[0].tensors if n not in SKIPPED]
    for i, s in enumerate(shards[1:], start=1):
        if set(n for n in s.tensors if n not in SKIPPED) != set(names):
            raise CheckpointError(f"consolidated.{i:02d}.pth holds different tensors from consolidated.00.pth; "
                                  "the shards are not from the same model")
    check_tensor_names(names, shards[0].path)
    unknown = [n for n in names if family.lookup(n) is None]
    if unknown:
        raise CheckpointError(f"unknown tensor names {unknown[:5]}{' ...' if len(unknown) > 5 else ''}: "
                              "not a Meta LLaMA checkpoint llamalocal knows")
    tied = _tied_output(shards, family)
    if tied:
        names = [n for n in names if n != "output.weight"]

    plans: dict[str, TensorPlan] = {}
    for name in names:
        gguf_name, rule = family.lookup(name)  # type: ignore[misc]
        r = replicas if name.endswith(("attention.wk.weight", "attention.wv.weight")) else 1
        shape = merged_shape(name, [tuple(s.tensors[name].shape) for s in shards], rule.split_dim, r)
        plans[name] = TensorPlan(name, gguf_name, shape, rule.split_dim, gguf.GGMLQuantizationType.F32, 0,
                                 replicas=r)

    emb = plans.get("tok_embeddings.weight")
    if emb is None or len(emb.shape) != 2:
        raise CheckpointError("tok_embeddings.weight is missing or not 2-D; not a complete LLaMA checkpoint")
    n_vocab = emb.shape[0]
    if p.vocab_size > 0 and p.vocab_size != n_vocab:
        raise CheckpointError(f"params.json says vocab_size {p.vocab_size} but tok_embeddings has {n_vocab} rows; "
                              "params.json and the weights do not belong together")
    expected = expected_shapes(p, n_vocab)
    if tied:
        del expected["output.weight"]
    missing = [n for n in expected if n not in plans]
    if missing:
        raise CheckpointError(f"missing tensors {missing[:4]}{' ...' if len(missing) > 4 else ''} "
                              f"(params.json says n_layers={p.n_layers}); is a shard from another model?")
    for name, shape in expected.items():
        if plans[name].shape != shape:
            raise CheckpointError(f"{name} has shape {list(plans[name].shape)} but params.json implies {list(shape)}; "
                                  "params.json and the weights do not belong together")
    extra = [n for n in plans if n not in expected]
    if extra:
        raise CheckpointError(f"tensors {extra[:4]} do not fit params.json (n_layers={p.n_layers})")

    ordered = [plans[n] for n in meta_names(p.n_layers) if n in plans]
    for t in ordered:
        i_layer = int(t.gguf_name.split(".")[1]) if t.gguf_name.startswith("blk.") else None
        t.qtype = presets.tensor_type(preset, t.gguf_name, t.shape, n_layers=p.n_layers, n_head=p.n_heads,
                                      n_head_kv=p.kv_heads, i_layer=i_layer, tied_embeddings=tied,
                                      has_imatrix=has_imatrix)
        t.nbytes = quantized_nbytes(t.shape, t.qtype)
    return ordered, n_vocab, tied


def _rope_plan(p: ModelParams, theta: float, factor: float) -> TensorPlan:
    """llama.cpp's rope_freqs.weight for Meta's scaled rope (f32, one value per frequency pair)."""
    values = rope_freq_factors(p.head_dim, theta, factor)
    return TensorPlan(ROPE_FREQS, ROPE_FREQS, values.shape, None, gguf.GGMLQuantizationType.F32, values.nbytes,
                      values=values)


def _rope_factor(p: ModelParams, family: Family, override: float | None, model_dir: Path) -> float | None:
    if override is not None and not p.use_scaled_rope:
        raise BadInputError(f"--rope-scaling-factor applies to models with use_scaled_rope in params.json "
                            f"(Llama-3.1 and later); {model_dir} is {family.label}, whose rope is not scaled")
    if not p.use_scaled_rope:
        return None
    return override or family.rope_scaling_factor  # detect() gives scaled-rope params a family with a factor


def _write_metadata(w: StreamingGGUFWriter, p: ModelParams, vocab: Vocab, preset: presets.Preset,
                    name: str, n_ctx: int, family: Family, instruct: bool) -> None:
    g = w.gguf
    g.add_name(name)
    g.add_file_type(int(preset.ftype))
    if preset.quantized:
        g.add_quantization_version(gguf.GGML_QUANT_VERSION)
    g.add_vocab_size(len(vocab))
    g.add_context_length(n_ctx)
    g.add_embedding_length(p.dim)
    g.add_block_count(p.n_layers)
    g.add_feed_forward_length(p.hidden_dim)
    g.add_rope_dimension_count(p.head_dim)
    g.add_head_count(p.n_heads)
    g.add_head_count_kv(p.kv_heads)
    g.add_layer_norm_rms_eps(p.norm_eps)
    if p.rope_theta is not None or family.rope_theta != 10000.0:  # llama.cpp's default is 10000
        g.add_rope_freq_base(p.rope_theta if p.rope_theta is not None else family.rope_theta)
    add_to_gguf(g, vocab, instruct=instruct)


# ---------------------------------------------------------------------------------------------
# importance matrix
# ---------------------------------------------------------------------------------------------

_LAYER_NAME = re.compile(r"layers\.(\d+)\.(.+)")
_IMATRIX_HINT = ("compute one with `llamalocal imatrix MODEL.gguf -f TEXT -o FILE` and pass --imatrix FILE, "
                 "or let `convert --calibrate TEXT` do both")


def _refuse_without_imatrix(p: ModelParams, preset: presets.Preset) -> None:
    """llama.cpp refuses a file some of whose tensors cannot be made without an importance matrix;
    params.json alone says which, so refuse before a shard is opened."""
    for meta, shape in expected_shapes(p, n_vocab=1).items():  # token_embd / output never need one
        m = _LAYER_NAME.fullmatch(meta)
        if m is None or m.group(2) not in LAYER_TENSORS:
            continue
        i_layer = int(m.group(1))
        name = gguf.TENSOR_NAMES[LAYER_TENSORS[m.group(2)].gguf].format(bid=i_layer) + ".weight"
        t = presets.tensor_type(preset, name, shape, n_layers=p.n_layers, n_head=p.n_heads, n_head_kv=p.kv_heads,
                                i_layer=i_layer)
        if presets.requires_imatrix(preset, name, t):
            raise BadInputError(f"--{preset.name} needs an importance matrix ({name} would be {t.name}); "
                                + _IMATRIX_HINT)


def _attach_importance(plans: list[TensorPlan], preset: presets.Preset, imx: Imatrix, source: str) -> list[str]:
    """Check the imatrix against the model (names, columns) and give each tensor its importance,
    as llama-quantize looks it up: by GGUF name, for every tensor that is quantized."""
    columns = {t.gguf_name: t.shape[-1] for t in plans if len(t.shape) == 2}
    calibrated = [t.gguf_name for t in plans if len(t.shape) == 2 and t.gguf_name.startswith("blk.")]
    warnings = match_model(imx, source, columns, calibrated)
    for t in plans:
        if preset.quantized and len(t.shape) == 2 and t.qtype not in (gguf.GGMLQuantizationType.F32,
                                                                       gguf.GGMLQuantizationType.F16):
            t.importance = imx.importance(t.gguf_name)
        if t.importance is None and presets.requires_imatrix(preset, t.gguf_name, t.qtype):
            raise BadInputError(f"{source} has no entry for {t.gguf_name}, which --{preset.name} stores as "
                                f"{t.qtype.name} and cannot make without one; " + _IMATRIX_HINT)
    return warnings


def _write_imatrix_metadata(w: StreamingGGUFWriter, imx: Imatrix, source: str) -> None:
    """What llama-quantize records (its kv overrides: strings cut to 127 bytes, counts as u32)."""
    f = imatrix_file

    def cut(text: str) -> str:
        return text.encode()[:f.QUANTIZE_STR_MAX].decode(errors="ignore")

    g = w.gguf
    g.add_string(f.KEY_QUANTIZE_FILE, cut(source))
    if imx.datasets:
        g.add_string(f.KEY_QUANTIZE_DATASET, cut(imx.datasets[0]))
    g.add_uint32(f.KEY_QUANTIZE_ENTRIES, len(imx.entries))
    if imx.chunk_count > 0:
        g.add_uint32(f.KEY_QUANTIZE_CHUNKS, imx.chunk_count)


class _Slot:
    """Buffers for one block in flight: its stored bytes as read, and its quantized bytes.
    A fixed set of slots is reused for the whole model, so memory is touched once. Parts of a
    block that are in the page cache are not copied into the slot but lent from there
    (Checkpoint.fetch_rows) until the block is quantized."""

    def __init__(self) -> None:
        self.raw = aligned_empty(0)
        self.out = aligned_empty(0)
        self._lent: list[tuple[Checkpoint, str, int, int]] = []

    def read(self, t: TensorPlan, shards: list[Checkpoint],
             slices: list[ShardSlice]) -> list[tuple[np.ndarray, bool]]:
        sizes = [shards[s.shard].read_size(t.meta_name, s.start, s.stop) for s in slices]
        if self.raw.size < sum(sizes):
            self.raw = aligned_empty(sum(sizes))  # pages of it that lent parts leave alone stay untouched
        parts, at = [], 0
        for s, size in zip(slices, sizes, strict=True):
            shard = shards[s.shard]
            values, lent = shard.fetch_rows(t.meta_name, s.start, s.stop, self.raw[at:at + size])
            if lent:
                self._lent.append((shard, t.meta_name, s.start, s.stop))
            parts.append((values.reshape(s.stop - s.start, -1) if values.ndim == 2 else values.reshape(1, -1),
                          shard.tensors[t.meta_name].dtype_name == "bf16"))
            at += size  # sizes are whole pages, so every part starts aligned
        return parts

    def give_back(self) -> None:
        """Return what was lent for the block (once it is quantized, or the conversion stopped)."""
        lent, self._lent = self._lent, []
        for shard, name, start, stop in lent:
            shard.give_back(name, start, stop)

    def output(self, nbytes: int) -> np.ndarray:
        if self.out.size < nbytes:
            self.out = aligned_empty(nbytes)
        return self.out


def _lower_thread_priority() -> None:
    """Run this thread at nice +10 (Linux sets niceness per thread; elsewhere nothing is done)."""
    if sys.platform == "linux":
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


class _Hashing:
    """Whether md5 is still running. While it is, blocks go to quantizing threads at nice +10, so
    the serial hash — the floor of a verified conversion — is never the one kept waiting; blocks
    read after it finished go to threads at normal priority (a thread's niceness cannot be lowered
    again), so against other busy processes the conversion runs at its fair share. 7B-shaped bench
    checkpoint on 2 cores, md5sum 10.6-11.0 s: 12.0-12.6 s this way, 12.9-13.5 s with one priority
    for all; with two busy processes beside it 29-34 s (md5sum 17.7 s), where threads niced to the
    end took 66-70 s."""

    def __init__(self, checks: list[Future]) -> None:
        self._running = threading.Event()
        pending = [c for c in checks if not c.done()]
        if not pending:
            return
        self._running.set()
        left, lock = [len(pending)], threading.Lock()

        def one_done(_: Future) -> None:
            with lock:
                left[0] -= 1
                if left[0] == 0:
                    self._running.clear()

        for c in pending:
            c.add_done_callback(one_done)

    @property
    def running(self) -> bool:
        return self._running.is_set()


def _stream_tensors(w: StreamingGGUFWriter, plans: list[TensorPlan], shards: list, n_workers: int,
                    progress: Progress, check: Callable[[], None] = lambda: None,
                    hashing: _Hashing | None = None) -> None:
    """This thread reads blocks of rows (shard slices) ahead into a ring of slots; workers widen
    and quantize them; one writer thread appends the results in order and hands the slots back.
    Reading, quantizing and writing all overlap, and at most `len(slots)` blocks exist at once.
    `check()` runs before each block and may raise to stop the conversion (a failed md5);
    `hashing`: while md5 runs, blocks go to workers that yield to it (see _Hashing)."""
    ring = [_Slot() for _ in range(2 * n_workers + 2)]
    slots: Queue[_Slot] = Queue()
    for slot in ring:
        slots.put(slot)
    pending: Queue = Queue()
    stop = threading.Event()

    def write_in_order() -> None:
        while not stop.is_set():
            try:
                item = pending.get(timeout=0.1)
            except Empty:
                continue
            if item is None:
                return
            name, future, slot = item
            data = future.result()
            w.write(name, data)
            if slot is not None:
                slots.put(slot)
            progress.advance(data.nbytes, name)

    def work(t: TensorPlan, parts: list[tuple[np.ndarray, bool]], slot: _Slot, first_row: int,
             first_shard: int) -> np.ndarray:
        nbytes = parts[0][0].shape[0] * t.nbytes // (t.shape[0] if len(t.shape) == 2 else 1)
        if t.replicas > 1:  # copies of the same KV heads: compared, then written once
            check_replicas(t.meta_name, [values for values, _ in parts], first_shard)
            parts = parts[:1]
        try:
            return quantize_block(parts, t.qtype, slot.output(nbytes), first_row=first_row, importance=t.importance)
        except ValueError as e:
            raise CheckpointError(f"{t.meta_name}: {e}; the checkpoint is damaged, download it again") from None
        finally:
            slot.give_back()  # the stored values are not needed once quantized

    # threads are started on first use: the yielding pool only has some while md5 runs
    with ExitStack() as cleanup:
        # however it ends, once every thread has stopped: what blocks in flight were lent goes back
        def give_all_back() -> None:
            for slot in ring:
                slot.give_back()

        cleanup.callback(give_all_back)
        pool = cleanup.enter_context(ThreadPoolExecutor(n_workers))
        yielding = cleanup.enter_context(ThreadPoolExecutor(n_workers, initializer=_lower_thread_priority))
        writer_pool = cleanup.enter_context(ThreadPoolExecutor(1))
        writer = writer_pool.submit(write_in_order)

        def free_slot() -> _Slot:
            while True:
                if writer.done():  # the writer failed (disk full, a worker's error): surface it
                    writer.result()
                    raise RuntimeError("writer stopped early")
                try:
                    return slots.get(timeout=0.1)
                except Empty:
                    continue

        try:
            for t in plans:
                if t.values is not None:
                    done: Future = Future()
                    done.set_result(t.values)
                    pending.put((t.gguf_name, done, None))
                    continue
                for first_row, slices in blocks(t.meta_name, shards, t.split_dim, t.shape, BLOCK_ELEMENTS,
                                                t.replicas):
                    check()
                    slot = free_slot()
                    parts = slot.read(t, shards, slices)
                    workers = yielding if hashing is not None and hashing.running else pool
                    pending.put((t.gguf_name, workers.submit(work, t, parts, slot, first_row, slices[0].shard), slot))
            pending.put(None)
            writer.result()
        except BaseException:
            stop.set()
            for workers in (pool, yielding):
                workers.shutdown(wait=True, cancel_futures=True)
            raise


class _SharedProgress:
    """One bar fed from two threads (md5 hashing and the writer). Counts that arrive before the
    bar is drawn are held until it is."""

    def __init__(self, target: Progress) -> None:
        self._target = target
        self._lock = threading.Lock()
        self._held = 0
        self._drawn = False

    def stage(self, name: str, total_bytes: int) -> None:
        with self._lock:
            self._target.stage(name, total_bytes)
            self._drawn = True
            if self._held:
                self._target.advance(self._held)
                self._held = 0

    def advance(self, nbytes: int, label: str = "") -> None:
        with self._lock:
            if self._drawn:
                self._target.advance(nbytes, label)
            else:
                self._held += nbytes


def _start_verifying(model_dir: Path, tok_path: Path, pool: ThreadPoolExecutor, progress: Progress,
                     cancel: threading.Event, warnings: list[str], notes: list[str],
                     reverify: bool) -> tuple[list[Future], int]:
    """Start checking checklist.chk and tokenizer_checklist.chk on `pool`, alongside the
    conversion (the output is published only after every sum matched). Files verified in an
    earlier run and unchanged since (convert.verified) are not hashed again unless `reverify`.
    Returns the pending checks and the bytes they will hash."""
    checks, nbytes = [], 0
    for folder, listing in ((model_dir, CHECKLIST), (tok_path.parent, TOKENIZER_CHECKLIST)):
        if not (folder / listing).exists():  # one that is not a regular file is refused by read_checklist
            if listing == TOKENIZER_CHECKLIST and folder.resolve() == model_dir.resolve():
                continue  # Llama-3: tokenizer.model sits beside the shards, listed in checklist.chk
            warnings.append(f"no {listing} in {folder}: file integrity not verified")
            continue
        sums = read_checklist(folder / listing)  # a malformed list is an error now, not later
        earlier = {} if reverify else {n: when for n, md5 in sums.items()
                                       if (when := verified.verified_on(folder / n, md5)) is not None}
        todo = [n for n in sums if n not in earlier]
        if earlier:
            days = sorted(set(earlier.values()))
            notes.append(f"{listing}: {len(earlier)} of {len(sums)} files taken as verified without hashing "
                         f"(their md5 matched on {', '.join(days)} and their size, mtime, ctime and inode are "
                         "unchanged since; --verify hashes them again)")
        if not todo:
            continue
        notes.append(f"{listing}: {len(todo)} file{'s' if len(todo) > 1 else ''} checked by md5 now")
        nbytes += sum((folder / f).stat().st_size for f in todo if (folder / f).is_file())

        def check(folder: Path = folder, listing: str = listing, todo: list[str] = todo,
                  sums: dict[str, str] = sums) -> list[str]:
            done = verify_checklist(folder, todo, progress=progress.advance, checklist=listing, cancel=cancel)
            verified.remember({folder / n: sums[n] for n in done})
            return done

        checks.append(pool.submit(check))
    return checks, nbytes


@contextmanager
def _signals_as_exceptions() -> Iterator[None]:
    """SIGTERM and SIGHUP end a conversion the way Ctrl-C does: as an exception (Terminated) in
    the main thread, so the partial output is removed on the way out. A signal the process ignores
    (SIGHUP under nohup) stays ignored; a second one during the cleanup is ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired: list[int] = []

    def handler(signum: int, frame: object) -> None:
        if not fired:
            fired.append(signum)
            raise Terminated(signum)

    previous = {}
    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None and signal.getsignal(sig) is not signal.SIG_IGN:
            previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _display_name(model_dir: Path) -> str:
    """The model's name for general.name (the folder's, or its parent's for `original/`): valid UTF-8
    even if the name on disk is not."""
    return model_name(model_dir).encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _raise_failed(checks: list[Future]) -> None:
    for c in checks:
        if c.done() and c.exception() is not None:
            raise c.exception()  # type: ignore[misc]


def convert(model_dir: Path, preset: str | presets.Preset = "f16", outfile: Path | None = None, *,
            force: bool = False, verify: bool = True, reverify: bool = False, n_ctx: int | None = None,
            threads: int | None = None, name: str | None = None, rope_scaling_factor: float | None = None,
            progress: Progress | None = None, imatrix: str | Path | Imatrix | None = None) -> ConvertResult:
    """Convert a Meta checkpoint directory to one GGUF file.

    Args:
        model_dir: folder with params.json and consolidated.NN.pth (tokenizer.model here or in the parent).
        preset: quantization preset name (see convert.presets), e.g. "q4_0".
        outfile: output path; default MODEL_DIR/ggml-model-<preset>.gguf.
        force: overwrite an existing output.
        verify: check checklist.chk / tokenizer_checklist.chk md5 sums; they are hashed alongside
            the conversion and the output is published only if every sum matches. Files verified
            before and unchanged since are taken as verified (convert.verified).
        reverify: hash every listed file even if it was verified before.
        n_ctx: context length to record; default the family's (2048 LLaMA-1, 4096 Llama-2, 16384 Code
            Llama, 8192 Llama-3, 131072 Llama-3.1 and later).
        threads: worker threads; default every core.
        name: general.name; default the model folder's name.
        rope_scaling_factor: Meta's scaled-rope factor for a model with use_scaled_rope; default the
            family's (8, and 32 for Llama-3.2 1B/3B).
        progress: receives stages and byte counts.
        imatrix: an importance matrix (llama.cpp's GGUF or legacy .dat file, or one read
            already) whose per-column weights go to ggml's quantizer, as `llama-quantize
            --imatrix` uses them; checked against the model before any work.

    Returns:
        ConvertResult with the path, sizes and time.

    Raises:
        BadInputError (and subclasses) for anything wrong with the input or the output path;
        DiskSpaceError when the output will not fit.
    """
    t0 = time.perf_counter()
    progress = progress or _Silent()
    model_dir = Path(model_dir)
    pre = preset if isinstance(preset, presets.Preset) else presets.parse_preset(preset)
    out = Path(outfile) if outfile is not None else default_outfile(model_dir, pre)
    # refuse before reading a byte
    if out.exists() and not force:
        raise OutputExistsError(f"{out} already exists; pass --force to overwrite or --outfile to choose another name")
    if out.is_dir():
        raise BadInputError(f"{out} is a directory; --outfile takes a file name")
    if not out.parent.is_dir():
        raise BadInputError(f"{out.parent} does not exist; create it or choose another --outfile")
    if not os.access(out.parent, os.W_OK):
        raise BadInputError(f"cannot write in {out.parent} (permission denied); choose another --outfile")

    imx = imatrix if isinstance(imatrix, Imatrix) or imatrix is None else read_imatrix(imatrix)
    imatrix_source = str(imatrix) if imx is not None and not isinstance(imatrix, Imatrix) else "imatrix"
    if imx is not None and not pre.quantized:
        raise BadInputError(f"--imatrix applies to quantized presets; --{pre.name} stores every weight as is")

    p = load_params(model_dir)
    check_supported(dict(p.extra), model_dir)
    if imx is None:
        _refuse_without_imatrix(p, pre)
    files = shard_files(model_dir)
    tok_path = find_tokenizer(model_dir)
    warnings: list[str] = []
    notes: list[str] = []
    shared = _SharedProgress(progress)
    cancel = threading.Event()
    with ThreadPoolExecutor(2) as hashers, ExitStack() as stack:
        stack.callback(cancel.set)  # however this ends, stop hashing first
        stack.enter_context(_signals_as_exceptions())
        checks, hashed_bytes = (_start_verifying(model_dir, tok_path, hashers, shared, cancel, warnings, notes,
                                                 reverify) if verify else ([], 0))
        n_workers = threads or os.cpu_count() or 1
        try:
            vocab = load_vocab(tok_path)
            family = detect(p, vocab.kind, model_dir, tok_path)
            factor = _rope_factor(p, family, rope_scaling_factor, model_dir)
            shards = [stack.enter_context(open_checkpoint(f)) for f in files]
            replicas = kv_replicas(shards, p.kv_heads)
            if replicas > 1:  # write the real KV heads once (405B MP16: 8 heads copied over 16 shards)
                p = replace(p, n_kv_heads=p.kv_heads // replicas)
            plans, n_vocab, tied = _plan_tensors(shards, p, pre, family, replicas, has_imatrix=imx is not None)
            if imx is not None:
                warnings += _attach_importance(plans, pre, imx, imatrix_source)
            if factor is not None:
                plans.insert(0, _rope_plan(p, p.rope_theta or family.rope_theta, factor))
            if len(vocab) > n_vocab:
                raise BadInputError(f"{tok_path} has {len(vocab)} tokens but the model's embedding has {n_vocab}; "
                                    "the tokenizer belongs to another model")
            if n_vocab - len(vocab) > MAX_VOCAB_PADDING:
                raise BadInputError(f"the model's embedding has {n_vocab} rows but {tok_path} only {len(vocab)} "
                                    "tokens; the tokenizer belongs to another model")
            vocab = vocab.padded(n_vocab)
            for t in plans:
                if t.split_dim is None and t.values is None and len(shards) > 1:
                    check_replicated(t.meta_name, shards)

            total = sum(t.nbytes for t in plans)
            free = shutil.disk_usage(out.parent).free
            if free < total + DISK_MARGIN:
                raise DiskSpaceError(f"{out.parent} has {free / 2**30:.1f} GiB free; the {pre.name} file needs "
                                     f"about {total / 2**30:.1f} GiB. Free some space or choose another --outfile")

            w = StreamingGGUFWriter(out)
            ctx = n_ctx or family.n_ctx
            _write_metadata(w, p, vocab, pre, name or _display_name(model_dir), ctx, family, is_instruct(model_dir))
            if imx is not None:
                _write_imatrix_metadata(w, imx, imatrix_source)
            for t in plans:
                w.add_tensor_info(t.gguf_name, t.shape, t.qtype, t.nbytes)
            try:
                w.open()
                shared.stage(f"{'md5 + ' if checks else ''}writing {out.name}", total + hashed_bytes)
                _stream_tensors(w, plans, shards, n_workers, shared, check=lambda: _raise_failed(checks),
                                hashing=_Hashing(checks))
                for c in checks:
                    c.result()  # every md5 matched: only now does the file get its name
                w.finish()
            except BaseException:
                w.abort()
                raise
        except BadInputError as e:
            if not isinstance(e, ChecksumError):
                for c in checks:  # a damaged download explains any other input error: say that instead
                    if isinstance(c.exception(), ChecksumError):
                        raise c.exception() from None  # type: ignore[misc]
            raise

    n_params = sum(int(_numel(t.shape)) for t in plans if t.values is None)
    used = sum(t.importance is not None for t in plans)
    return ConvertResult(out, pre.name, n_params, out.stat().st_size, time.perf_counter() - t0, plans, warnings,
                         notes, family=family.label, n_ctx=ctx, rope_scaling_factor=factor, tied_embeddings=tied,
                         kv_replicas=replicas, imatrix_entries=used)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n

