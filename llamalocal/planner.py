"""Where each part of a model goes, and why: llama.cpp's `n_gpu_layers`, planned before loading.

Memory model (what llama.cpp 0.3.36's vendored build allocates; numbers checked against its own
log lines and against the RSS of a real CPU run, see tests/test_planner.py):

- Weights: each layer's `blk.N.*` tensors go to the layer's device. `token_embd` always stays on
  the CPU. llama.cpp counts `n_gpu_layers` from the top, output layer first: with k > 0 the
  output layer and the last k-1 repeating layers are offloaded; k = n_layers + 1 offloads all.
- KV cache, per layer on the layer's device: 2 (K and V) x n_ctx x n_head_kv x head_dim x
  bytes(cache type); llama.cpp rounds n_ctx up to a multiple of 256.
- Compute buffers: the largest set of live activations in one ubatch, per device that runs part
  of the graph (formula in `compute_bytes`, calibrated on llama.cpp's `compute buffer size`).
- CPU side, the process's resident memory (`cpu_resident`): every CPU tensor once — the mmapped
  ones as file pages (llama.cpp maps the file with MAP_POPULATE, so all of them are resident, the
  token embedding included), plus an anonymous copy of those the CPU backend repacks into its
  interleaved layout (x86 AVX2: Q4_0/Q4_K/IQ4_NL), whose file pages stay mapped but are clean page
  cache the kernel may drop (`reclaimable_bytes`, not counted against the budget); the KV cache
  (cleared at creation, so resident at once); what the compute buffer and ggml's work buffer touch,
  which grows with the tokens in the context; the vocabulary's tables; Python and llama.cpp
  themselves. `total_bytes` is that once the context is full (the peak a long chat or document
  reaches), `start_bytes` after the first ubatch. Measured against real runs of seven shapes by
  scripts/bench_plan.py and tests/test_planner.py.
- Apple unified memory: GPU tensors are the same mmapped pages (Metal wraps host memory), so
  they are counted once, in RAM, and also against Metal's working-set budget.
- Margins: `GPU_MARGIN_BYTES` per accelerator for the driver and fragmentation.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from llamalocal import settings
from llamalocal.errors import PlanError
from llamalocal.hardware import Device, Hardware
from llamalocal.model_desc import ModelDesc
from llamalocal.settings import CTX_PAD, DEFAULT_CTX_CAP, N_BATCH
from llamalocal.units import MiB
from llamalocal.units import gib as _gib

# Measured (scripts/bench_plan.py, 0.3.36, x86): a llamalocal process that has imported llama_cpp and
# looked at the hardware is 44 MiB resident; loading a model adds ~6 MiB of ggml contexts and caches,
# and llama.cpp's vocabulary tables ~125 bytes per token and ~136 per BPE merge (Llama 3's 128256
# tokens and 280147 merges: 53 MiB; a 32000-token sentencepiece vocabulary: 4 MiB).
BASELINE_BYTES = 50 * MiB
VOCAB_TOKEN_BYTES = 125
VOCAB_MERGE_BYTES = 136
# Per accelerator, kept free: driver allocations, fragmentation (Ollama keeps 457-512 MiB).
GPU_MARGIN_BYTES = 512 * MiB
# Per RPC worker, kept free of what it advertises (its free memory, measured when asked): the
# graphs its ggml server deserializes, allocator fragmentation, the OS's own growth meanwhile.
WORKER_MARGIN_BYTES = 256 * MiB

# Disk read speeds for the paging estimate (sequential reads of a cold mmap).
_NVME_BPS = 2e9


@dataclass
class DevicePlan:
    name: str
    kind: str               # "cpu" | "gpu" | "unified"
    n_layers: int           # repeating layers placed here (+1 in `has_output` for the output layer)
    weights_bytes: int
    kv_bytes: int
    compute_bytes: int
    total_bytes: int        # cpu: the process's peak resident memory, once the context is full
    budget_bytes: int
    has_output: bool = False
    reclaimable_bytes: int = 0  # cpu: file pages of repacked weights, droppable under pressure
    start_bytes: int = 0    # cpu: resident after loading and the first ubatch of a prompt
    endpoint: str | None = None  # rpc: the worker's host:port
    first_layer: int | None = None  # split plans: the first repeating layer here (they are consecutive)
    why: str = ""           # split plans: where the budget comes from and why these layers

    @property
    def need_bytes(self) -> int:
        """What must fit the budget (resident memory less what the kernel can drop)."""
        return self.total_bytes - self.reclaimable_bytes

    @property
    def fits(self) -> bool:
        return self.need_bytes <= self.budget_bytes


@dataclass
class Split:
    """What llama.cpp is told for a plan across several devices (RPC workers, --tensor-split).

    llama.cpp puts the first `n_layers + 1 - n_gpu_layers` layers on this machine's CPU and
    spreads the rest over `devices` in order by `tensor_split`; the last of them gets the output
    layer. llamalocal keeps that last device local: this machine's last GPU, or on a machine
    without one the CPU itself as a split device (holding only the output layer, so the layers
    before keep the CPU backend's repacked weights)."""

    devices: list[str]          # llama.cpp's device list: "rpc:HOST:PORT", a local ggml device name, "CPU"
    tensor_split: list[float]   # over `devices`: their layer counts (the last one's includes the output layer)
    n_gpu_layers: int           # llama.cpp's count of layers off the CPU's front (output included)
    counts: list[int]           # repeating layers per plan device, in the plan's order (this CPU first)
    by: str                     # "budget" or "--tensor-split A,B,..."


@dataclass
class Plan:
    model_name: str
    n_layers: int                # repeating layers; llama.cpp can offload n_layers + 1
    n_gpu_layers: int            # what to pass to llama.cpp
    threads: int
    fits: str                    # "gpu" | "partial" | "cpu" | "no"
    reason: str
    devices: list[DevicePlan]
    n_ctx: int
    cache_type: str
    use_mmap: bool
    use_mlock: bool
    requested: int | str         # the --n-gpu-layers asked for: "auto", "all" or a number
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)   # what check() refuses without --force
    hardware_source: str = "detected"
    n_ctx_train: int = 0
    n_batch: int = N_BATCH
    n_ubatch: int = N_BATCH
    split: Split | None = None   # across RPC workers / --tensor-split: what llama.cpp is told

    @property
    def cpu(self) -> DevicePlan:
        return next(d for d in self.devices if d.kind == "cpu")

    def to_json(self) -> dict:
        return {
            "model": self.model_name, "n_layers": self.n_layers, "n_gpu_layers": self.n_gpu_layers,
            "threads": self.threads, "fits": self.fits, "reason": self.reason,
            "devices": [asdict(d) | {"need_bytes": d.need_bytes} for d in self.devices],
            "n_ctx": self.n_ctx, "n_ctx_train": self.n_ctx_train, "cache_type": self.cache_type,
            "use_mmap": self.use_mmap, "use_mlock": self.use_mlock, "requested": self.requested,
            "warnings": self.warnings, "errors": self.errors, "hardware": self.hardware_source,
            "split": asdict(self.split) if self.split else None,
        }

    def describe(self) -> str:
        """What goes where and why, in a few lines (printed by plan, chat and serve)."""
        if self.split is not None:
            return self._describe_split()
        offl = self.n_gpu_layers
        if offl == 0:
            where = f"{self.n_layers} layers on CPU"
        else:
            rep = max(0, min(offl, self.n_layers + 1) - 1)
            where = f"{offl}/{self.n_layers + 1} layers on GPU ({rep} repeating + output)"
        lines = [f"{self.model_name}: {where} [{self.fits}] — {self.reason}"]
        for d in self.devices:
            head = f"  {d.name} ({d.kind}):"
            body = (f"weights {_gib(d.weights_bytes)} + KV {_gib(d.kv_bytes)} + compute {_gib(d.compute_bytes)}")
            if d.kind == "cpu":
                extra = f" -> process ~{_gib(d.start_bytes)} at start, ~{_gib(d.total_bytes)} with the context full"
                lines.append(f"{head:<22}{body}{extra}; {_gib(d.budget_bytes)} RAM available")
            else:
                lines.append(f"{head:<22}{body} = {_gib(d.total_bytes)} of {_gib(d.budget_bytes)} budget")
        lines.append(f"  ctx {self.n_ctx}, KV cache {self.cache_type}, {self.threads} threads, "
                     f"mmap {'on' if self.use_mmap else 'off'}, mlock {'on' if self.use_mlock else 'off'}")
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


    def _describe_split(self) -> str:
        s = self.split
        assert s is not None
        lines = [f"{self.model_name}: {self.n_layers} layers over {len(self.devices)} devices [{self.fits}] — "
                 f"{self.reason}"]
        for d in self.devices:
            if not d.n_layers or d.first_layer is None:
                span = "no layers"
            elif d.n_layers == 1:
                span = f"layer {d.first_layer}"
            else:
                span = f"layers {d.first_layer}-{d.first_layer + d.n_layers - 1}"
            if d.has_output:
                span = "the output layer" if span == "no layers" else span + " + output"
            body = (f"{span}: weights {_gib(d.weights_bytes)} + KV {_gib(d.kv_bytes)} + compute "
                    f"{_gib(d.compute_bytes)}")
            if d.kind == "cpu":
                body += f" -> process ~{_gib(d.start_bytes)} at start, ~{_gib(d.total_bytes)} with the context full"
                if d.reclaimable_bytes:
                    body += f" ({_gib(d.reclaimable_bytes)} of it droppable page cache)"
                body += f"; {_gib(d.budget_bytes)} RAM available"
            else:
                body += f" = {_gib(d.total_bytes)} of {_gib(d.budget_bytes)} budget"
            lines.append(f"  {_device_label(d)}: {body}{'' if d.fits else '  DOES NOT FIT'}")
            if d.why:
                lines.append(f"    ({d.why})")
        lines.append(f"  ctx {self.n_ctx}, KV cache {self.cache_type}, {self.threads} threads, "
                     f"mmap {'on' if self.use_mmap else 'off'}, mlock {'on' if self.use_mlock else 'off'}; "
                     f"llama.cpp: n_gpu_layers {self.n_gpu_layers}, devices {', '.join(s.devices)}, "
                     f"tensor_split {','.join(f'{x:g}' for x in s.tensor_split)}")
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _device_label(d: DevicePlan) -> str:
    if d.kind == "rpc":
        return f"worker {d.endpoint}"
    return "this machine's CPU" if d.kind == "cpu" else f"this machine's {d.name}"


# ---------------------------------------------------------------------------------------------
# the pieces
# ---------------------------------------------------------------------------------------------

def padded_ctx(n_ctx: int) -> int:
    return math.ceil(n_ctx / CTX_PAD) * CTX_PAD


def kv_bytes_per_layer(model: ModelDesc, n_ctx: int, cache_type: str = "f16") -> int:
    """K and V for one layer: 2 x n_ctx x n_head_kv x head_dim x bytes(cache type)."""
    per_element = settings.cache_type(cache_type).bytes_per_element
    return int(2 * padded_ctx(n_ctx) * model.n_head_kv * model.head_dim * per_element)


def _attention_floats(model: ModelDesc, n_kv: int, u: int, flash_attn: bool) -> int:
    """f32 activations of one ubatch's attention: the KQ matrix (n_kv x u x n_head; flash attention
    never forms it) and its mask (n_kv x u), with q/k/v/kqv/residual around them."""
    n_embd_kv = model.head_dim * model.n_head_kv
    kq = 0 if flash_attn else n_kv * u * model.n_head
    return kq + n_kv * u + (5 * model.n_embd + 2 * n_embd_kv) * u


def _ffn_floats(model: ModelDesc, u: int) -> int:
    """gate/up/act (4 n_ff) and 3 n_embd per token."""
    return (4 * model.n_ff + 3 * model.n_embd) * u


def compute_bytes(model: ModelDesc, n_ctx: int, n_ubatch: int = N_BATCH, flash_attn: bool = False) -> int:
    """The compute buffer llama.cpp reserves for a device running whole layers: the worst-case
    graph, a full ubatch (u tokens) against the whole context, with every token's logits.

    The peak of three phases, in f32 activations: attention (`_attention_floats`), the logits
    (n_vocab x u, two n_embd rows per token) and the FFN (`_ffn_floats`). Checked against
    llama.cpp's `CPU compute buffer size` on seven shapes (scripts/bench_plan.py).
    """
    u = min(n_ubatch, padded_ctx(n_ctx))
    logits = (model.n_vocab + 2 * model.n_embd) * u
    return 4 * max(_attention_floats(model, padded_ctx(n_ctx), u, flash_attn), logits, _ffn_floats(model, u))


def touched_compute_bytes(model: ModelDesc, n_tokens: int, n_ubatch: int = N_BATCH,
                          flash_attn: bool = False) -> int:
    """What a CPU run has touched of its compute buffer and of ggml's work buffer once `n_tokens`
    are in the context (the reserved buffer is larger; untouched pages are not resident).

    The graph of the last ubatch sees n_kv = n_tokens rounded up to 256 cells. Only one token's
    logits are computed (llama-cpp-python asks for the last position), so the logits phase is
    small. Without flash attention the KQ soft-max is converted to f16 for the KQV product in
    ggml's work buffer (n_kv x u x n_head x 2 bytes), a separate allocation beside the graph.
    """
    u = min(n_ubatch, n_tokens)
    n_kv = padded_ctx(n_tokens)
    # the last layer runs its FFN on the output rows alone (llama.cpp selects them first)
    ffn = (4 * model.n_ff + 3 * model.n_embd // 2) * (u if model.n_layers > 1 else 1)
    graph = 4 * max(_attention_floats(model, n_kv, u, flash_attn), ffn, model.n_vocab + 2 * model.n_embd)
    work = 0 if flash_attn else 2 * n_kv * u * model.n_head
    return graph + work


def vocab_bytes(model: ModelDesc) -> int:
    """llama.cpp's tables for the vocabulary (tokens, their texts and pieces, BPE merge ranks)."""
    return model.n_vocab * VOCAB_TOKEN_BYTES + model.n_merges * VOCAB_MERGE_BYTES


def host_compute_bytes(model: ModelDesc, n_ctx: int, n_ubatch: int = N_BATCH) -> int:
    """The CPU's compute buffer when every layer runs on a GPU: input embeddings and the mask."""
    u = min(n_ubatch, padded_ctx(n_ctx))
    return 4 * (model.n_embd + padded_ctx(n_ctx)) * u


def repack_types(features: list[str]) -> set[str]:
    """ggml types the CPU backend repacks into its interleaved layout (ggml-cpu/repack.cpp)."""
    f = set(features)
    if "REPACK" not in f:
        return set()
    types: set[str] = set()
    if "AVX2" in f:
        types |= {"q4_0", "q4_k", "iq4_nl", "mxfp4"}
        if "AVX512" in f:
            types.add("q2_k")
    if "NEON" in f and "DOTPROD" in f:
        types |= {"q4_0", "q4_k", "q5_k", "q6_k", "iq4_nl", "mxfp4"}
        if "MATMUL_INT8" in f:
            types.add("q8_0")
    return types


def _layer_repack_bytes(model: ModelDesc, i: int, types: set[str]) -> int:
    if not types or not model.layer_type_bytes:
        return 0
    return sum(b for t, b in model.layer_type_bytes[i].items() if t in types)


def _mapped_bytes(model: ModelDesc, where: list[int], rtypes: set[str]) -> int | None:
    """Bytes of the file llama.cpp keeps mapped and populated for the CPU: the span from the first to
    the last tensor the CPU reads from the mapping (not repacked, not offloaded) — llama.cpp unmaps
    only what lies outside it. None without a file order (reference models)."""
    if not model.file_order:
        return None

    def from_mapping(layer: int, ggml_type: str) -> bool:
        if layer < 0:
            return True  # token_embd (read by get_rows, never repacked), rope_freqs ...
        return where[layer] < 0 and ggml_type not in rtypes

    used = [i for i, (layer, t, _) in enumerate(model.file_order) if from_mapping(layer, t)]
    if not used:
        return 0
    return sum(b for _, _, b in model.file_order[used[0]:used[-1] + 1])


def _assign(n_layers: int, k: int, accels: list[Device]) -> list[int]:
    """llama.cpp's placement: for layers 0..n_layers (n_layers = output), the index of the
    accelerator it goes to, or -1 for the CPU. Split between several by their free memory."""
    if not accels or k <= 0:
        return [-1] * (n_layers + 1)
    start = max(n_layers + 1 - k, 0)
    act = min(k, n_layers + 1)
    total = sum(max(d.free_bytes, 1) for d in accels)
    splits, acc = [], 0.0
    for d in accels:
        acc += max(d.free_bytes, 1)
        splits.append(acc / total)
    out = []
    for il in range(n_layers + 1):
        if il < start:
            out.append(-1)
            continue
        x = (il - start) / act
        out.append(next((j for j, s in enumerate(splits) if s > x), len(accels) - 1))
    return out


def _layout(model: ModelDesc, hw: Hardware, k: int, n_ctx: int, cache_type: str, n_ubatch: int,
            mlock: bool) -> list[DevicePlan]:
    accels = hw.accelerators
    return _place(model, hw, _assign(model.n_layers, k, accels), accels, n_ctx, cache_type, n_ubatch, mlock)


def _budget(d: Device) -> int:
    margin = WORKER_MARGIN_BYTES if d.kind == "rpc" else GPU_MARGIN_BYTES
    return max(d.free_bytes - margin, 0)


def _place(model: ModelDesc, hw: Hardware, where: list[int], targets: list[Device], n_ctx: int,
           cache_type: str, n_ubatch: int, mlock: bool, *, output_repack: bool = True) -> list[DevicePlan]:
    """Memory per device for a placement: `where[il]` (il = 0..n_layers, n_layers = the output
    layer) is an index into `targets` (accelerators, RPC workers) or -1 for this machine's CPU.
    `output_repack`: whether an output layer on the CPU goes through the CPU backend's repacking
    (not when the CPU is one of llama.cpp's split devices: those layers get its plain buffer)."""
    accels = targets
    kv_layer = kv_bytes_per_layer(model, n_ctx, cache_type)
    flash_attn = settings.cache_type(cache_type).needs_flash_attn
    compute = compute_bytes(model, n_ctx, n_ubatch, flash_attn)
    rtypes = repack_types(hw.cpu_features)

    plans = [DevicePlan(d.name, d.kind, 0, 0, 0, 0, 0, _budget(d), endpoint=d.endpoint) for d in accels]
    cpu_layers = cpu_weights = cpu_kv = repack = 0
    cpu_output = False
    for il, j in enumerate(where):
        is_output = il == model.n_layers
        # a tied output matrix is token_embd itself on the CPU, a copy of it on another device
        w = ((model.output_bytes if j < 0 else model.offloaded_output_bytes) if is_output
             else model.layer_bytes[il])
        kv = 0 if is_output else kv_layer
        if j < 0:
            cpu_weights += w
            cpu_kv += kv
            if is_output:
                cpu_output = True
                if output_repack and not model.tied_output and model.output_type in rtypes:
                    repack += model.output_bytes
            else:
                cpu_layers += 1
                repack += _layer_repack_bytes(model, il, rtypes)
        else:
            p = plans[j]
            p.weights_bytes += w
            p.kv_bytes += kv
            if is_output:
                p.has_output = True
            else:
                p.n_layers += 1
    for p in plans:
        if p.weights_bytes:
            p.compute_bytes = compute
        p.total_bytes = p.weights_bytes + p.kv_bytes + p.compute_bytes

    cpu_weights += model.token_embd_bytes + model.other_bytes
    runs_layers = bool(cpu_layers or cpu_output or not accels)
    # what the mapping keeps resident: all CPU tensors (a reference model), or the span the file
    # order gives; of it, the pages of repacked tensors are never read again and may be dropped
    mapped = _mapped_bytes(model, where, rtypes)
    if mapped is None:
        mapped, reclaimable = cpu_weights, repack
    else:
        reclaimable = max(0, mapped - (cpu_weights - repack))

    def resident(n_tokens: int) -> int:
        """The process once `n_tokens` are in the context: every CPU tensor once (mapped file pages,
        or the repacked copy instead of them), KV, touched compute, tables, Python."""
        if runs_layers:
            touched = touched_compute_bytes(model, n_tokens, n_ubatch, flash_attn)
        else:
            touched = host_compute_bytes(model, n_tokens, n_ubatch)
        total = BASELINE_BYTES + vocab_bytes(model) + mapped + repack + cpu_kv + touched
        if hw.unified:
            # Metal wraps the same RAM: the GPU part is in this process's memory too
            total += sum(p.total_bytes for p in plans if p.kind == "unified")
        return total

    cpu_compute = compute if runs_layers else host_compute_bytes(model, n_ctx, n_ubatch)
    cpu = DevicePlan(
        name="CPU", kind="cpu", n_layers=cpu_layers, weights_bytes=mapped + repack, kv_bytes=cpu_kv,
        compute_bytes=cpu_compute, total_bytes=resident(n_ctx), budget_bytes=hw.ram_available,
        has_output=cpu_output, reclaimable_bytes=0 if mlock else reclaimable,
        start_bytes=resident(min(n_ctx, n_ubatch)),
    )
    return plans + [cpu]


# ---------------------------------------------------------------------------------------------
# the plan
# ---------------------------------------------------------------------------------------------

def default_ctx(model: ModelDesc) -> int:
    return min(model.n_ctx_train or DEFAULT_CTX_CAP, DEFAULT_CTX_CAP)


def plan(model: ModelDesc, hw: Hardware, *, n_ctx: int | None = None, n_gpu_layers: int | str = "auto",
         cache_type: str = "f16", threads: int | None = None, mlock: bool = False, n_batch: int = N_BATCH,
         n_ubatch: int = N_BATCH, tensor_split: list[float] | None = None) -> Plan:
    """Plan where `model` goes on `hw`.

    Args:
        model: from `read_model_desc` or `reference_model`.
        hw: from `hardware.detect()` or `hardware.simulated(...)`.
        n_ctx: context length; default the model's own, at most 4096.
        n_gpu_layers: "auto" (the largest that fits), "all", or a number honoured exactly
            (llama.cpp's count: n_layers + 1 includes the output layer).
        cache_type: KV cache type ("f16", "q8_0", ...).
        threads: default the physical cores.
        mlock: lock the weights in RAM (nothing can be paged out or dropped).
        tensor_split: proportions of the repeating layers over the devices of a split plan, in
            its order (see `_plan_split`). A split plan is made when `hw` has RPC workers or
            this is given; `n_gpu_layers` must then be "auto".

    Returns:
        The Plan. Problems that must stop a load without --force are in `plan.errors`;
        `check(plan, force)` raises them.

    Raises:
        PlanError: options that contradict each other (a --tensor-split of the wrong length,
            --n-gpu-layers with a split).
    """
    n_ctx = n_ctx or default_ctx(model)
    full = model.n_layers + 1
    accels = hw.accelerators
    errors: list[str] = []
    warnings: list[str] = []

    if model.n_ctx_train and n_ctx > model.n_ctx_train:
        errors.append(f"--ctx {n_ctx} is larger than the {model.n_ctx_train} tokens {model.name} was trained "
                      f"on; quality collapses past it. Use --ctx {model.n_ctx_train} or less")

    if hw.workers or tensor_split is not None:
        split, devices, fits, reason = _plan_split(model, hw, n_ctx=n_ctx, cache_type=cache_type, n_ubatch=n_ubatch,
                                                   mlock=mlock, tensor_split=tensor_split,
                                                   n_gpu_layers=n_gpu_layers, errors=errors)
        cpu = next(d for d in devices if d.kind == "cpu")
        if not cpu.fits and mlock:
            errors.append(f"--mlock needs {_gib(cpu.need_bytes)} locked in RAM but {_gib(cpu.budget_bytes)} is available")
        if fits == "no":
            warnings.append(reason)
        return Plan(
            model_name=model.name, n_layers=model.n_layers, n_gpu_layers=split.n_gpu_layers,
            threads=threads or hw.physical_cores, fits=fits, reason=reason, devices=devices, n_ctx=n_ctx,
            cache_type=cache_type, use_mmap=True, use_mlock=mlock, requested=n_gpu_layers, warnings=warnings,
            errors=errors, hardware_source=hw.source, n_ctx_train=model.n_ctx_train, n_batch=n_batch,
            n_ubatch=n_ubatch, split=split,
        )

    def layout(k: int) -> list[DevicePlan]:
        return _layout(model, hw, k, n_ctx, cache_type, n_ubatch, mlock)

    def accels_fit(devs: list[DevicePlan]) -> bool:
        return all(d.fits for d in devs if d.kind != "cpu")

    if n_gpu_layers == "auto":
        k = 0
        if accels:
            # monotone: more layers on the GPUs never uses less GPU memory, so search from the top
            k = next((k for k in range(full, -1, -1) if accels_fit(layout(k))), 0)
        devices = layout(k)
    else:
        k = full if n_gpu_layers == "all" else int(n_gpu_layers)
        if k > full:
            errors.append(f"--n-gpu-layers {k} is impossible: {model.name} has {model.n_layers} layers "
                          f"(+1 output layer = {full} at most; 'all' means {full})")
            k = full
        if k > 0 and not accels:
            errors.append(f"--n-gpu-layers {n_gpu_layers} asks for a GPU but this llama-cpp-python build has "
                          f"none (backends: {', '.join(hw.backends)}); run `llamalocal doctor`")
            devices = layout(0)
        else:
            devices = layout(k)
            for d in devices:
                if d.kind != "cpu" and not d.fits:
                    errors.append(
                        f"--n-gpu-layers {n_gpu_layers} does not fit {d.name}: needs {_gib(d.total_bytes)} "
                        f"(weights {_gib(d.weights_bytes)} + KV {_gib(d.kv_bytes)} + compute {_gib(d.compute_bytes)}) "
                        f"but its budget is {_gib(d.budget_bytes)} (free less {GPU_MARGIN_BYTES // MiB} MiB); "
                        f"at most {_max_fitting(model, hw, layout, full)} layers fit")
        if not accels:
            k = 0

    cpu = next(d for d in devices if d.kind == "cpu")
    fits, reason = _classify(model, hw, devices, k, full, n_gpu_layers, layout)
    if not cpu.fits and mlock:
        errors.append(f"--mlock needs {_gib(cpu.total_bytes)} locked in RAM but {_gib(cpu.budget_bytes)} is available")
    if fits == "no":
        warnings.append(reason)

    return Plan(
        model_name=model.name, n_layers=model.n_layers, n_gpu_layers=k, threads=threads or hw.physical_cores,
        fits=fits, reason=reason, devices=devices, n_ctx=n_ctx, cache_type=cache_type, use_mmap=True,
        use_mlock=mlock, requested=n_gpu_layers, warnings=warnings, errors=errors,
        hardware_source=hw.source, n_ctx_train=model.n_ctx_train, n_batch=n_batch, n_ubatch=n_ubatch,
    )


# ---------------------------------------------------------------------------------------------
# the split: RPC workers and --tensor-split
# ---------------------------------------------------------------------------------------------

def proportional_counts(n: int, proportions: list[float]) -> list[int]:
    """Layers per device for proportions, by llama.cpp's own rule (llama_model::load_tensors):
    layer t of n goes to the first device whose cumulative share exceeds t / n."""
    total = float(sum(proportions))
    cuts, acc = [], 0.0
    for x in proportions:
        acc += x
        cuts.append(acc / total)
    counts = [0] * len(proportions)
    for t in range(n):
        counts[next((j for j, c in enumerate(cuts) if c > t / n), len(cuts) - 1)] += 1
    return counts


def _largest_remainder(n: int, weights: list[int], caps: list[int]) -> list[int]:
    """n split in proportion to `weights` (whole numbers summing to at least n), none above its cap."""
    total = sum(weights)
    shares = [n * w / total for w in weights]
    counts = [min(int(x), c) for x, c in zip(shares, caps, strict=True)]
    order = sorted(range(len(weights)), key=lambda j: shares[j] - int(shares[j]), reverse=True)
    while sum(counts) < n:
        for j in order:
            if sum(counts) < n and counts[j] < caps[j]:
                counts[j] += 1
    return counts


def _plan_split(model: ModelDesc, hw: Hardware, *, n_ctx: int, cache_type: str, n_ubatch: int, mlock: bool,
                tensor_split: list[float] | None, n_gpu_layers: int | str,
                errors: list[str]) -> tuple[Split, list[DevicePlan], str, str]:
    """A plan across this machine's CPU, its RPC workers and its GPUs.

    The plan's devices, in layer order: this machine's CPU (the first layers, where llama.cpp's
    CPU layers always are, and the token embeddings), each worker in --rpc order, then this
    machine's GPUs; the output layer stays on this machine (the last GPU, else the CPU), as do
    the logits computed from it. Repeating layers go by `tensor_split` (llama.cpp's meaning:
    proportions over these devices, in this order) or, by default, in proportion to how many
    layers each device's budget holds, so every device ends up equally full. Every device is
    then checked against its budget: a worker that cannot hold its share is an error (refused
    unless forced), caught here rather than by an allocation failure on the worker.
    """
    n = model.n_layers
    workers, accels = hw.workers, hw.accelerators
    remote = workers + accels                       # llama.cpp's device order: workers first, as it orders them
    out_j = len(remote) - 1 if accels else -1       # the output layer: the last local GPU, else the CPU
    cpu_dev = next(d for d in hw.devices if d.kind == "cpu")
    order = [cpu_dev, *remote]                      # the plan's order; tensor_split is over these

    if n_gpu_layers != "auto":
        raise PlanError(f"--n-gpu-layers {n_gpu_layers} cannot be combined with RPC workers or --tensor-split: "
                        "the split decides where layers go (by budget, or --tensor-split A,B,... over "
                        f"{', '.join(_order_label(d) for d in order)})")
    if tensor_split is not None:
        if len(tensor_split) != len(order):
            raise PlanError(f"--tensor-split has {len(tensor_split)} values but the plan has {len(order)} devices "
                            f"({', '.join(_order_label(d) for d in order)}): give one proportion per device, "
                            "in that order")
        if any(x < 0 for x in tensor_split) or sum(tensor_split) <= 0:
            raise PlanError(f"--tensor-split {','.join(f'{x:g}' for x in tensor_split)}: proportions must be 0 or "
                            "more, and not all 0")

    def where(counts: list[int]) -> list[int]:
        w: list[int] = []
        for j, c in enumerate(counts):
            w += [j - 1] * c                        # plan device 0 is the CPU (-1), then remote[j - 1]
        return w + [out_j]

    def layout(counts: list[int]) -> list[DevicePlan]:
        # an output layer on the CPU is in the CPU split device's plain buffer: not repacked
        return _place(model, hw, where(counts), remote, n_ctx, cache_type, n_ubatch, mlock, output_repack=False)

    def fits_at(j: int, c: int) -> bool:
        counts = [0] * len(order)
        counts[j] = c
        counts[1 if j == 0 else 0] += n - c          # the rest elsewhere: a device's fit depends on its own layers
        plans = layout(counts)
        dev = plans[-1] if j == 0 else plans[j - 1]  # _place lists remote devices, then the CPU
        return dev.fits

    def capacity(j: int) -> int:
        lo, hi = 0, n                                # fitting is monotone in the layers a device holds
        if not fits_at(j, 0):
            return 0
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits_at(j, mid) else (lo, mid - 1)
        return lo

    caps = [capacity(j) for j in range(len(order))] if len(order) > 1 else [n]
    if tensor_split is not None:
        counts = proportional_counts(n, tensor_split)
        by = "--tensor-split " + ",".join(f"{x:g}" for x in tensor_split)
    elif sum(caps) >= n:
        counts = _largest_remainder(n, caps, caps)
        by = "budget"
    else:                                            # not enough anywhere: fill the others, the CPU pages the rest
        counts = [0] + caps[1:]
        counts[0] = n - sum(counts)
        by = "budget"
    plans = layout(counts)
    if tensor_split is None:                         # layers are not all the same size: settle the edges
        for _ in range(n):
            over = next((j for j in range(1, len(order)) if not plans[j - 1].fits and counts[j] > 0), None)
            if over is None:
                break
            slack = [j for j in range(len(order)) if j != over and counts[j] < caps[j]] or [0]
            counts[over] -= 1
            counts[slack[0]] += 1
            plans = layout(counts)

    devices = [plans[-1], *plans[:-1]]               # the plan's order: the CPU first
    first = 0
    for j, (d, c) in enumerate(zip(devices, counts, strict=True)):
        d.first_layer = first if c else None
        first += c
        d.why = _why(order[j], d, c, caps[j], by, j == 0)
        if j and not d.fits:
            errors.append(
                f"{_device_label(d)} cannot hold its {c} layers: it needs {_gib(d.total_bytes)} (weights "
                f"{_gib(d.weights_bytes)} + KV {_gib(d.kv_bytes)} + compute {_gib(d.compute_bytes)}) but its "
                f"budget is {_gib(d.budget_bytes)}; at most {caps[j]} layers fit there"
                + ("" if tensor_split is None else "; change --tensor-split"))

    llama_devices: list[str] = []
    shares: list[float] = []
    for j, dev in enumerate(remote, 1):
        has_output = j - 1 == out_j
        if counts[j] or has_output:                  # a device with nothing is not given to llama.cpp at all
            llama_devices.append(f"rpc:{dev.endpoint}" if dev.kind == "rpc" else dev.name)
            shares.append(counts[j] + (1 if has_output else 0))
    if out_j < 0:
        llama_devices.append("CPU")
        shares.append(1)
    split = Split(devices=llama_devices, tensor_split=shares, n_gpu_layers=n + 1 - counts[0], counts=counts, by=by)

    cpu = devices[0]
    if not cpu.fits:
        return split, devices, "no", _paging_reason(cpu)
    on_workers = sum(counts[1:len(workers) + 1])
    fits = "rpc" if on_workers else ("gpu" if counts[0] == 0 else "partial")
    spread = ", ".join(f"{_device_label(d)} {c}" for d, c in zip(devices, counts, strict=True))
    what = ("split by budget, each device equally full" if by == "budget" else f"{by} as asked")
    return split, devices, fits, f"{what}: {spread} of {n} layers; the output layer and logits stay on this machine"


def _order_label(d: Device) -> str:
    return f"worker {d.endpoint}" if d.kind == "rpc" else ("this machine's CPU" if d.kind == "cpu" else d.name)


def _why(dev: Device, d: DevicePlan, count: int, cap: int, by: str, is_cpu: bool) -> str:
    share = "its share by budget" if by == "budget" else f"its share of {by}"
    if is_cpu:
        where = "the token embeddings" + (f", the first {count} layers (repacked where the CPU backend can)"
                                          if count else "")
        out = ", the output layer (logits stay here)" if d.has_output else ""
        return f"{where}{out}; budget: the RAM available; holds up to {cap} layers; {share}"
    if dev.kind == "rpc":
        return (f"{dev.description}: advertises {_gib(dev.free_bytes)} free, budget {WORKER_MARGIN_BYTES // MiB} "
                f"MiB less; holds up to {cap} layers; {share}")
    return (f"{dev.description}: {_gib(dev.free_bytes)} free, budget {GPU_MARGIN_BYTES // MiB} MiB less; holds up "
            f"to {cap} layers; {share}" + ("; the output layer, as the last local device" if d.has_output else ""))


def _max_fitting(model: ModelDesc, hw: Hardware, layout, full: int) -> int:
    return next((k for k in range(full, -1, -1)
                 if all(d.fits for d in layout(k) if d.kind != "cpu")), 0)


def _classify(model: ModelDesc, hw: Hardware, devices: list[DevicePlan], k: int, full: int,
              requested: int | str, layout) -> tuple[str, str]:
    cpu = next(d for d in devices if d.kind == "cpu")
    gpus = [d for d in devices if d.kind != "cpu"]
    if not cpu.fits:
        return "no", _paging_reason(cpu)
    if not gpus:
        return "cpu", f"CPU only: no GPU backend in this build ({', '.join(hw.backends)}); fits in RAM"
    if k == full:
        where = ", ".join(f"{d.name} {_gib(d.total_bytes)} of {_gib(d.budget_bytes)}" for d in gpus)
        return "gpu", ("fits entirely" if requested == "auto" else f"--n-gpu-layers {requested}: all offloaded") + f" ({where})"
    # what stopped us: the device that would overflow with all layers
    fullplan = layout(full)
    over = [d for d in fullplan if d.kind != "cpu" and not d.fits]
    what = "Metal's working set" if any(d.kind == "unified" for d in over) else "VRAM"
    limit = ""
    if over:
        d = over[0]
        limit = (f"; all {full} need {_gib(d.total_bytes)} on {d.name}, its budget is "
                 f"{_gib(d.budget_bytes)} (short by {_gib(d.total_bytes - d.budget_bytes)})")
    label = "partial" if k > 0 else "cpu"
    if requested != "auto":
        return label, f"--n-gpu-layers {requested} as asked" + limit
    return label, f"limited by {what}: {k} of {full} layers fit" + limit


def _paging_reason(cpu: DevicePlan) -> str:
    short = cpu.need_bytes - cpu.budget_bytes
    per_token = short / _NVME_BPS
    return (f"does not fit in RAM: the CPU side needs {_gib(cpu.need_bytes)} but {_gib(cpu.budget_bytes)} is available "
            f"(short by {_gib(short)}); the model will page from disk through mmap, re-reading about "
            f"{_gib(short)} per token — at ~2 GB/s (NVMe) that is {per_token:.1f} s per token or worse")


def check(p: Plan, force: bool = False) -> Plan:
    """Refuse a plan that cannot work, unless forced.

    Raises:
        PlanError: `p.errors` is not empty and `force` is false; with the numbers. An impossible
            --n-gpu-layers (more than the model has) is refused even with force.
    """
    hard = [e for e in p.errors if "is impossible" in e]
    if hard:
        raise PlanError(hard[0])
    if p.errors and not force:
        raise PlanError(p.errors[0] + " (--force to try anyway)")
    return p
