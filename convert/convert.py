"""`convert()`: a Meta download to one GGUF in a single streaming pass.

Orchestration only: the pieces live in their own modules (checkpoint reading, shard merging,
tensor names, params, tokenizer, presets/quantization, GGUF writing). Each tensor is read,
merged, quantized straight to its final type and written in blocks of rows, so peak memory
does not grow with model size and there is no f16 scratch file.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from queue import Empty, Full, Queue
from typing import Protocol

import gguf
import numpy as np

from convert import presets
from convert.checklist import read_checklist, verify_checklist
from convert.checkpoint import open_checkpoint
from convert.gguf_out import StreamingGGUFWriter
from convert.merge import MergedTensor, check_replicated, merged_shape
from convert.params import ModelParams, load_params
from convert.quantize import quantize_rows, quantized_nbytes
from convert.tensor_names import SKIPPED, lookup, meta_names
from convert.tokenizer import Vocab, add_to_gguf, find_tokenizer, load_vocab
from llamalocal.errors import BadInputError, CheckpointError, DiskSpaceError, OutputExistsError

SHARD_GLOB = "consolidated.*.pth"
CHECKLIST = "checklist.chk"
TOKENIZER_CHECKLIST = "tokenizer_checklist.chk"
BLOCK_BYTES = 16 * 1024 * 1024  # f32 rows handed to one worker at a time
DISK_MARGIN = 64 * 1024 * 1024


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


@dataclass
class ConvertResult:
    path: Path
    preset: str
    n_params: int
    file_bytes: int
    seconds: float
    tensors: list[TensorPlan] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

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


def expected_shapes(p: ModelParams, n_vocab: int) -> dict[str, tuple[int, ...]]:
    """Every tensor's merged shape as params.json implies it (Meta's model.py)."""
    kv_dim = p.kv_heads * p.head_dim
    per_layer = {
        "attention.wq.weight": (p.dim, p.dim),
        "attention.wk.weight": (kv_dim, p.dim),
        "attention.wv.weight": (kv_dim, p.dim),
        "attention.wo.weight": (p.dim, p.dim),
        "attention_norm.weight": (p.dim,),
        "feed_forward.w1.weight": (p.hidden_dim, p.dim),
        "feed_forward.w2.weight": (p.dim, p.hidden_dim),
        "feed_forward.w3.weight": (p.hidden_dim, p.dim),
        "ffn_norm.weight": (p.dim,),
    }
    shapes = {"tok_embeddings.weight": (n_vocab, p.dim), "norm.weight": (p.dim,), "output.weight": (n_vocab, p.dim)}
    for i in range(p.n_layers):
        shapes.update({f"layers.{i}.{k}": v for k, v in per_layer.items()})
    return shapes


def _plan_tensors(shards: list, p: ModelParams, preset: presets.Preset) -> tuple[list[TensorPlan], int]:
    """Check names and shapes against params.json; choose each tensor's output type."""
    names = [n for n in shards[0].tensors if n not in SKIPPED]
    for i, s in enumerate(shards[1:], start=1):
        if set(n for n in s.tensors if n not in SKIPPED) != set(names):
            raise CheckpointError(f"consolidated.{i:02d}.pth holds different tensors from consolidated.00.pth; "
                                  "the shards are not from the same model")
    unknown = [n for n in names if lookup(n) is None]
    if unknown:
        raise CheckpointError(f"unknown tensor names {unknown[:5]}{' ...' if len(unknown) > 5 else ''}: "
                              "not a Meta LLaMA checkpoint llamalocal knows")

    plans: dict[str, TensorPlan] = {}
    for name in names:
        gguf_name, rule, _ = lookup(name)  # type: ignore[misc]
        shape = merged_shape(name, [tuple(s.tensors[name].shape) for s in shards], rule.split_dim)
        plans[name] = TensorPlan(name, gguf_name, shape, rule.split_dim, gguf.GGMLQuantizationType.F32, 0)

    emb = plans.get("tok_embeddings.weight")
    if emb is None or len(emb.shape) != 2:
        raise CheckpointError("tok_embeddings.weight is missing or not 2-D; not a complete LLaMA checkpoint")
    n_vocab = emb.shape[0]
    if p.vocab_size > 0 and p.vocab_size != n_vocab:
        raise CheckpointError(f"params.json says vocab_size {p.vocab_size} but tok_embeddings has {n_vocab} rows")
    expected = expected_shapes(p, n_vocab)
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

    ordered = [plans[n] for n in meta_names(p.n_layers)]
    for t in ordered:
        i_layer = int(t.gguf_name.split(".")[1]) if t.gguf_name.startswith("blk.") else None
        t.qtype = presets.tensor_type(preset, t.gguf_name, t.shape, n_layers=p.n_layers, n_head=p.n_heads,
                                      n_head_kv=p.kv_heads, i_layer=i_layer)
        t.nbytes = quantized_nbytes(t.shape, t.qtype)
    return ordered, n_vocab


def _write_metadata(w: StreamingGGUFWriter, p: ModelParams, vocab: Vocab, preset: presets.Preset,
                    name: str, n_ctx: int) -> None:
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
    if p.rope_theta is not None:
        g.add_rope_freq_base(p.rope_theta)
    add_to_gguf(g, vocab)


def _blocks(t: TensorPlan) -> Iterator[tuple[int, int]]:
    if len(t.shape) == 1:
        yield 0, 1
        return
    rows, cols = t.shape
    step = max(1, BLOCK_BYTES // (cols * 4))
    for a in range(0, rows, step):
        yield a, min(rows, a + step)


def _stream_tensors(w: StreamingGGUFWriter, plans: list[TensorPlan], shards: list, n_workers: int,
                    progress: Progress) -> None:
    """Workers read, merge and quantize blocks of rows; one writer thread appends the results in
    order, so disk writes overlap with the work. At most `window` blocks exist at any time."""
    window = 2 * n_workers + 2
    queue: Queue = Queue(maxsize=window)
    stop = threading.Event()

    def write_in_order() -> None:
        while not stop.is_set():
            try:
                item = queue.get(timeout=0.1)
            except Empty:
                continue
            if item is None:
                return
            name, future = item
            out = future.result()
            w.write(name, out)
            progress.advance(out.nbytes, name)

    buffers = threading.local()  # one float32 block per worker, reused: no fresh pages per block

    def work(t: TensorPlan, merged: MergedTensor, a: int, b: int):
        n = (b - a) * (t.shape[1] if len(t.shape) == 2 else t.shape[0])
        buf = getattr(buffers, "x", None)
        if buf is None or buf.size < n:
            buf = buffers.x = np.empty(max(n, BLOCK_BYTES // 4), dtype=np.float32)
        x = merged.rows(a, b, out=buf[:n])
        out = quantize_rows(x, t.qtype)
        return out.copy() if t.qtype == gguf.GGMLQuantizationType.F32 else out  # f32 is a view of buf

    with ThreadPoolExecutor(n_workers) as pool, ThreadPoolExecutor(1) as writer_pool:
        writer = writer_pool.submit(write_in_order)

        def put(item) -> None:
            while True:
                if writer.done():  # the writer failed (disk full, a worker's error): surface it
                    writer.result()
                    raise RuntimeError("writer stopped early")
                try:
                    queue.put(item, timeout=0.1)
                    return
                except Full:
                    continue

        try:
            for i, t in enumerate(plans):
                if i + 1 < len(plans):  # overlap the next tensor's disk read with this one's work
                    for s in shards:
                        s.prefetch(plans[i + 1].meta_name)
                merged = MergedTensor(t.meta_name, shards, t.split_dim, t.shape)
                for a, b in _blocks(t):
                    put((t.gguf_name, pool.submit(work, t, merged, a, b)))
            put(None)
            writer.result()
        except BaseException:
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def convert(model_dir: Path, preset: str | presets.Preset = "f16", outfile: Path | None = None, *,
            force: bool = False, verify: bool = True, n_ctx: int | None = None, threads: int | None = None,
            name: str | None = None, progress: Progress | None = None) -> ConvertResult:
    """Convert a Meta checkpoint directory to one GGUF file.

    Args:
        model_dir: folder with params.json and consolidated.NN.pth (tokenizer.model here or in the parent).
        preset: quantization preset name (see convert.presets), e.g. "q4_0".
        outfile: output path; default MODEL_DIR/ggml-model-<preset>.gguf.
        force: overwrite an existing output.
        verify: check checklist.chk / tokenizer_checklist.chk md5 sums first.
        n_ctx: context length to record; default Meta's (2048 LLaMA-1, 4096 Llama-2, 16384 Code Llama).
        threads: worker threads; default every core.
        progress: receives stages and byte counts.

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

    p = load_params(model_dir)
    files = shard_files(model_dir)
    tok_path = find_tokenizer(model_dir)
    warnings: list[str] = []
    if verify:
        for folder, listing in ((model_dir, CHECKLIST), (tok_path.parent, TOKENIZER_CHECKLIST)):
            if (folder / listing).is_file():
                listed = read_checklist(folder / listing)
                progress.stage(f"verifying {listing}", sum((folder / f).stat().st_size for f in listed
                                                           if (folder / f).is_file()))
                verify_checklist(folder, progress=progress.advance, checklist=listing)
            else:
                warnings.append(f"no {listing} in {folder}: file integrity not verified")
    vocab = load_vocab(tok_path)

    with ExitStack() as stack:
        shards = [stack.enter_context(open_checkpoint(f)) for f in files]
        plans, n_vocab = _plan_tensors(shards, p, pre)
        if len(vocab) > n_vocab:
            raise BadInputError(f"{tok_path} has {len(vocab)} tokens but the model's embedding has {n_vocab}; "
                                "the tokenizer belongs to another model")
        vocab = vocab.padded(n_vocab)
        for t in plans:
            if t.split_dim is None and len(shards) > 1:
                check_replicated(t.meta_name, shards)

        total = sum(t.nbytes for t in plans)
        free = shutil.disk_usage(out.parent).free
        if free < total + DISK_MARGIN:
            raise DiskSpaceError(f"{out.parent} has {free / 2**30:.1f} GiB free; the {pre.name} file needs about "
                                 f"{total / 2**30:.1f} GiB. Free some space or choose another --outfile")

        w = StreamingGGUFWriter(out)
        _write_metadata(w, p, vocab, pre, name or model_dir.resolve().name, n_ctx or p.n_ctx)
        for t in plans:
            w.add_tensor_info(t.gguf_name, t.shape, t.qtype, t.nbytes)
        n_workers = threads or os.cpu_count() or 1
        try:
            w.open()
            progress.stage(f"writing {out.name}", total)
            _stream_tensors(w, plans, shards, n_workers, progress)
            w.finish()
        except BaseException:
            w.abort()
            raise

    n_params = sum(int(_numel(t.shape)) for t in plans)
    return ConvertResult(out, pre.name, n_params, out.stat().st_size, time.perf_counter() - t0, plans, warnings)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n

