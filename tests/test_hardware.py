"""hardware: ggml's device list on this machine, and hypothetical machines."""

from __future__ import annotations

import subprocess
import sys

import pytest

from llamalocal import hardware
from llamalocal.errors import BadInputError
from llamalocal.hardware import GiB, MiB


def test_detect_this_machine():
    import psutil

    hw = hardware.detect()
    assert not hw.simulated
    assert "CPU" in hw.backends
    cpu = [d for d in hw.devices if d.kind == "cpu"]
    assert len(cpu) == 1 and hw.devices[-1].kind == "cpu"
    assert hw.ram_total == psutil.virtual_memory().total
    assert 0 < hw.ram_available <= hw.ram_total
    assert hw.physical_cores >= 1 and hw.logical_cores >= hw.physical_cores
    # llama.cpp's system info names at least one instruction-set feature on any real CPU
    assert hw.cpu_features and all(f == f.strip() and "=" not in f for f in hw.cpu_features)
    for d in hw.accelerators:
        assert d.kind in ("gpu", "unified") and d.total_bytes > 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the /proc and /sys readers are Linux's")
def test_linux_readers_agree_with_psutil():
    import psutil

    total, available = hardware._linux_memory()
    vm = psutil.virtual_memory()
    assert total == vm.total
    assert abs(available - vm.available) <= 256 * MiB  # read a moment apart: the system moves
    assert hardware._linux_physical_cores() == psutil.cpu_count(logical=False)
    hw = hardware.detect()
    assert hw.logical_cores == psutil.cpu_count(logical=True)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the /proc and /sys readers are Linux's")
def test_detect_does_not_import_psutil_on_linux():
    code = "import sys; from llamalocal import hardware; hardware.detect(); print('psutil' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_detect_falls_back_to_psutil(monkeypatch):
    import psutil

    monkeypatch.setattr(hardware, "_linux_memory", lambda: None)
    hw = hardware.detect()
    assert hw.ram_total == psutil.virtual_memory().total
    assert hw.physical_cores == (psutil.cpu_count(logical=False) or hw.logical_cores)


def test_ggml_devices_agree_with_llama_cpp():
    import llama_cpp

    backends, devices = hardware.ggml_devices()
    has_gpu = any(d.kind != "cpu" for d in devices)
    # llama.cpp says it can offload when any non-CPU backend is built in, RPC included (whose
    # devices appear only once a worker is added): without a worker, RPC offloads nothing
    local_gpu_backend = any(b not in ("CPU", "RPC", "BLAS") for b in backends)
    assert bool(llama_cpp.llama_supports_gpu_offload()) == (local_gpu_backend or "RPC" in backends)
    assert has_gpu == local_gpu_backend


@pytest.mark.parametrize("ram_gib,mib", [(8, 5461), (16, 10922), (32, 21845), (64, 49152), (128, 98304)])
def test_metal_working_set(ram_gib, mib):
    # values llama.cpp prints on Apple Silicon (NOTES.md): 8 GB -> 5461 MiB, 16 GB -> 10923 MiB ...
    assert abs(hardware.metal_working_set(ram_gib * GiB) // MiB - mib) <= 1


def test_simulated_unified():
    hw = hardware.simulated(unified=16 * GiB, cores=8, features=["NEON"])
    assert hw.simulated and hw.ram_total == 16 * GiB
    (gpu,) = hw.accelerators
    assert gpu.kind == "unified" and gpu.free_bytes == hardware.metal_working_set(16 * GiB)
    assert hw.ram_available == 16 * GiB - hardware.os_reserve(16 * GiB)
    assert "unified" in hw.source


def test_simulated_discrete_keeps_real_cpu():
    real = hardware.detect()
    hw = hardware.simulated(gpu_mem=10 * GiB, base=real)
    (gpu,) = hw.accelerators
    assert gpu.kind == "gpu" and gpu.total_bytes == 10 * GiB
    assert hw.ram_total == real.ram_total and hw.physical_cores == real.physical_cores
    assert hw.cpu_features == real.cpu_features


def test_profiles():
    for name in hardware.PROFILES:
        hw = hardware.profile(name)
        assert hw.simulated and hw.devices[-1].kind == "cpu"
    assert hardware.profile("x86-8gb").accelerators == []
    assert hardware.profile("rtx4090-24gb").accelerators[0].total_bytes == 24 * GiB
    assert hardware.profile("m1-8gb").accelerators[0].free_bytes // MiB == 5461
    with pytest.raises(BadInputError):
        hardware.profile("cray-1")
