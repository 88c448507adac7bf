"""What this machine (or a hypothetical one) has: RAM, cores, CPU features and ggml's devices.

Devices come from ggml's own backend registry, through the shared libraries llama-cpp-python
ships, so the list is exactly what llama.cpp will offload to: CUDA, Metal, Vulkan, ROCm (HIP),
SYCL, RPC workers — whatever the installed build has. A device is anything ggml lists, with a
kind ("cpu", "gpu" for dedicated memory, "unified" for memory shared with the CPU) and a budget.

Apple Silicon: ggml's Metal device reports Metal's `recommendedMaxWorkingSetSize` as its memory,
which is the real limit (about two-thirds to three-quarters of RAM), not all of RAM.
"""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import dataclass, field, replace

from llamalocal.units import GiB, MiB

_UNIFIED_BACKENDS = ("metal", "mtl")


@dataclass
class Device:
    """One place tensors can live. `free_bytes` is what the planner may use (for Metal: the
    recommended working set, as ggml reports it)."""

    name: str            # ggml's device name: "CPU", "CUDA0", "Metal", "Vulkan0"; a worker's own device
    kind: str            # "cpu" | "gpu" | "unified" | "rpc" (a `llamalocal worker` on another machine)
    total_bytes: int
    free_bytes: int
    backend: str         # ggml's backend (registry) name: "CPU", "CUDA", "Metal", "RPC", ...
    description: str     # "NVIDIA GeForce RTX 4090", "Apple M2 Max", ...
    endpoint: str | None = None  # rpc: the worker's "host:port" ("hypothetical:N" for --worker-mem)


@dataclass
class Hardware:
    ram_total: int
    ram_available: int
    physical_cores: int
    logical_cores: int
    cpu_features: list[str]          # from llama.cpp's system info: "AVX2", "NEON", "REPACK", ...
    devices: list[Device]            # accelerators first, the CPU last
    backends: list[str]              # ggml backends this build has: "CPU", "CUDA", ...
    simulated: bool = False
    source: str = "detected"         # "detected", or what the hypothetical machine is
    machine: str = field(default_factory=platform.machine)

    @property
    def accelerators(self) -> list[Device]:
        """This machine's GPUs (RPC workers are not among them: see `workers`)."""
        return [d for d in self.devices if d.kind not in ("cpu", "rpc")]

    @property
    def workers(self) -> list[Device]:
        """RPC workers, in the order given (--rpc), each serving one device."""
        return [d for d in self.devices if d.kind == "rpc"]

    @property
    def unified(self) -> bool:
        return any(d.kind == "unified" for d in self.devices)

    def to_json(self) -> dict:
        return {
            "ram_total": self.ram_total, "ram_available": self.ram_available,
            "physical_cores": self.physical_cores, "logical_cores": self.logical_cores,
            "cpu_features": self.cpu_features, "backends": self.backends, "simulated": self.simulated,
            "source": self.source,
            "devices": [{"name": d.name, "kind": d.kind, "total_bytes": d.total_bytes, "free_bytes": d.free_bytes,
                         "backend": d.backend, "description": d.description}
                        | ({"endpoint": d.endpoint} if d.endpoint else {}) for d in self.devices],
        }


# ---------------------------------------------------------------------------------------------
# detection
# ---------------------------------------------------------------------------------------------

def ggml_devices() -> tuple[list[str], list[Device]]:
    """(backend names, devices) as ggml's registry lists them. Accelerators first, CPU last."""
    from llamalocal.convert import native

    devices: list[Device] = []
    for d in native.backend_devices():
        if d["type"] in (native.DEV_ACCEL, native.DEV_META):
            continue  # BLAS/AMX work on CPU memory; meta devices wrap the real ones
        if d["type"] == native.DEV_CPU:
            kind = "cpu"
        elif d["type"] == native.DEV_IGPU or d["backend"].lower() in _UNIFIED_BACKENDS:
            kind = "unified"
        else:
            kind = "gpu"
        devices.append(Device(name=d["name"], kind=kind, total_bytes=d["total"], free_bytes=d["free"],
                              backend=d["backend"], description=d["description"]))
    devices.sort(key=lambda d: d.kind == "cpu")
    return native.backend_names(), devices


def cpu_features() -> list[str]:
    """Features llama.cpp's CPU backend uses ("AVX2", "NEON", "REPACK", ...), from its system info."""
    from llamalocal.convert import native

    feats = []
    for part in native.system_info().replace("|", "\n").splitlines():
        if "=" in part:
            k, _, v = part.partition("=")
            if v.strip() == "1":
                feats.append(k.strip().split(":")[-1].strip())
    return feats


def _linux_memory() -> tuple[int, int] | None:
    """(total, available) bytes from /proc/meminfo's MemTotal and MemAvailable: the very fields
    psutil.virtual_memory() reports on Linux (tests compare the two). Read directly because
    importing psutil costs ~9 ms, a third of what `generate` may add to llama.cpp's own start-up."""
    try:
        with open("/proc/meminfo", "rb") as f:
            text = f.read()
    except OSError:
        return None
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(b":")
        if key in (b"MemTotal", b"MemAvailable"):
            parts = rest.split()
            if parts and parts[0].isdigit():
                values[key] = int(parts[0]) * 1024  # "kB" there means KiB
    if len(values) != 2:
        return None  # a kernel older than 3.14 has no MemAvailable: psutil estimates it
    return values[b"MemTotal"], values[b"MemAvailable"]


def _linux_physical_cores() -> int | None:
    """Cores as psutil.cpu_count(logical=False) counts them on Linux: the distinct sibling lists
    under /sys/devices/system/cpu/cpu*/topology (a core's hyperthreads share one)."""
    base = "/sys/devices/system/cpu"
    try:
        names = [n for n in os.listdir(base) if n.startswith("cpu") and n[3:].isdigit()]
    except OSError:
        return None
    cores = set()
    for n in names:
        for leaf in ("core_cpus_list", "thread_siblings_list"):
            try:
                with open(f"{base}/{n}/topology/{leaf}", "rb") as f:
                    cores.add(f.read().strip())
                break
            except OSError:
                continue
    return len(cores) or None


def detect() -> Hardware:
    """This machine, as the kernel (Linux: /proc, /sys) or psutil, and ggml see it."""
    memory = _linux_memory() if sys.platform.startswith("linux") else None
    physical = _linux_physical_cores() if memory is not None else None
    if memory is None or physical is None:
        import psutil

        vm = psutil.virtual_memory()
        memory = vm.total, vm.available
        physical = psutil.cpu_count(logical=False)
    ram_total, ram_available = memory
    backends, devices = ggml_devices()
    for d in devices:
        if d.kind == "cpu":
            d.free_bytes = ram_available  # ggml reports total for both
    return Hardware(
        ram_total=ram_total, ram_available=ram_available,
        physical_cores=physical or os.cpu_count() or 1, logical_cores=os.cpu_count() or 1,
        cpu_features=cpu_features(), devices=devices, backends=backends,
        simulated=False, source="detected",
    )


# ---------------------------------------------------------------------------------------------
# hypothetical machines
# ---------------------------------------------------------------------------------------------

def metal_working_set(ram: int) -> int:
    """Metal's default recommendedMaxWorkingSetSize: 2/3 of RAM up to 32 GiB, 3/4 above
    (llama.cpp logs: 8 GB -> 5461 MiB, 16 GB -> 10923 MiB, 64 GB -> 49152 MiB)."""
    return ram * 2 // 3 if ram <= 32 * GiB else ram * 3 // 4


def os_reserve(ram: int) -> int:
    """RAM a hypothetical machine's OS and other programs keep: 1 GiB, or 10 % of RAM if more, at most 4 GiB."""
    return min(max(GiB, ram // 10), 4 * GiB)


_APPLE_FEATURES = ["NEON", "ARM_FMA", "FP16_VA", "DOTPROD", "ACCELERATE", "REPACK"]
_X86_FEATURES = ["SSE3", "SSSE3", "AVX", "AVX2", "F16C", "FMA", "REPACK"]


def simulated(gpu_mem: int | None = None, unified: int | None = None, ram: int | None = None,
              base: Hardware | None = None, *, cores: int | None = None, name: str | None = None,
              features: list[str] | None = None) -> Hardware:
    """A hypothetical machine: "would it fit on ...".

    Args:
        gpu_mem: a discrete GPU with this much VRAM (all of it free).
        unified: Apple-style unified memory of this size; RAM is this size and the GPU's budget
            Metal's default working set (see `metal_working_set`).
        ram: system RAM (default: `unified`, else the base machine's).
        base: the machine to take the CPU (cores, features) and unspecified parts from;
            default the real one, detected.
        cores, name, features: override the CPU's physical cores, the GPU's name, CPU features.
    """
    if base is None and (cores is None or features is None or (ram is None and unified is None)):
        base = detect()
    if ram is not None:
        ram_total = ram
    elif unified is not None:
        ram_total = unified
    else:
        ram_total = base.ram_total  # type: ignore[union-attr]
    # asking only about a GPU: the RAM is this machine's, as it is now
    available = (base.ram_available if ram is None and unified is None  # type: ignore[union-attr]
                 else ram_total - os_reserve(ram_total))
    phys = cores or (base.physical_cores if base else 4)
    feats = features if features is not None else (
        _APPLE_FEATURES if unified is not None else (base.cpu_features if base else _X86_FEATURES))

    devices: list[Device] = []
    backends = ["CPU"]
    parts = []
    if unified is not None:
        ws = metal_working_set(unified)
        devices.append(Device(name or "Metal", "unified", ws, ws, "Metal", f"simulated Apple Silicon, {unified / GiB:g} GiB"))
        backends.insert(0, "Metal")
        parts.append(f"{unified / GiB:g} GiB unified memory (working set {ws // MiB} MiB)")
    if gpu_mem is not None:
        devices.append(Device(name or "CUDA0", "gpu", gpu_mem, gpu_mem, "CUDA", f"simulated GPU, {gpu_mem / GiB:g} GiB"))
        backends.insert(0, "CUDA")
        parts.append(f"{gpu_mem / GiB:g} GiB GPU")
    devices.append(Device("CPU", "cpu", ram_total, available, "CPU", "simulated CPU"))
    if unified is None:
        parts.append(f"{ram_total / GiB:g} GiB RAM")
    return Hardware(
        ram_total=ram_total, ram_available=available, physical_cores=phys,
        logical_cores=base.logical_cores if base and not cores else phys, cpu_features=list(feats),
        devices=devices, backends=backends, simulated=True, source="hypothetical: " + ", ".join(parts),
    )


# ---------------------------------------------------------------------------------------------
# RPC workers (llamalocal.rpc probes them; here they become devices)
# ---------------------------------------------------------------------------------------------

def with_workers(hw: Hardware, workers: list[Device]) -> Hardware:
    """`hw` plus RPC workers (kind "rpc"): local devices first, the CPU, then the workers."""
    if not workers:
        return hw
    names = ", ".join(f"{w.endpoint} ({w.name}, {w.free_bytes / GiB:.1f} GiB)" for w in workers)
    backends = hw.backends if "RPC" in hw.backends else [*hw.backends, "RPC"]
    return replace(hw, devices=[*hw.devices, *workers], backends=backends,
                   source=f"{hw.source} + {len(workers)} RPC worker{'s' if len(workers) > 1 else ''}: {names}")


def hypothetical_workers(sizes: list[int]) -> list[Device]:
    """Workers that do not exist (plan --worker-mem): a CPU with this much memory free each."""
    return [Device(name="CPU", kind="rpc", total_bytes=size, free_bytes=size, backend="RPC",
                   description=f"hypothetical worker, {size / GiB:g} GiB", endpoint=f"hypothetical:{i}")
            for i, size in enumerate(sizes, 1)]


def _x86(ram_gb: int, gpu_gb: int | None = None, gpu_name: str | None = None, cores: int = 8) -> Hardware:
    hw = simulated(gpu_mem=gpu_gb * GiB if gpu_gb else None, ram=ram_gb * GiB, cores=cores,
                   features=_X86_FEATURES, name=gpu_name)
    return hw


def _apple(ram_gb: int, cores: int, name: str) -> Hardware:
    return simulated(unified=ram_gb * GiB, cores=cores, features=_APPLE_FEATURES, name=name)


# Named machines for tests and `--profile`-style questions. Sizes as sold (GB == GiB for RAM/VRAM).
PROFILES = {
    "m1-8gb": lambda: _apple(8, 4, "Metal (Apple M1)"),
    "m2-16gb": lambda: _apple(16, 4, "Metal (Apple M2)"),
    "m2-max-96gb": lambda: _apple(96, 8, "Metal (Apple M2 Max)"),
    "rtx3080-10gb": lambda: _x86(32, 10, "CUDA0 (RTX 3080)"),
    "rtx4090-24gb": lambda: _x86(64, 24, "CUDA0 (RTX 4090)", cores=16),
    "a100-80gb": lambda: _x86(256, 80, "CUDA0 (A100 80GB)", cores=32),
    "x86-16gb": lambda: _x86(16),
    "x86-8gb": lambda: _x86(8, cores=4),
}


def profile(name: str) -> Hardware:
    """One of PROFILES by name."""
    try:
        hw = PROFILES[name]()
    except KeyError:
        from llamalocal.errors import BadInputError

        raise BadInputError(f"unknown hardware profile {name!r}; choose one of {', '.join(PROFILES)}") from None
    return replace(hw, source=f"profile {name}: {hw.source.removeprefix('hypothetical: ')}")
