"""`plan`, `requirements` and `doctor`: what fits where, before loading anything."""

from __future__ import annotations

import json
import os
import platform
import shutil
from pathlib import Path

import click

from llamalocal.cli.common import (
    SIZE,
    cache_type_option,
    ctx_option,
    force_option,
    gpu_layers_option,
    json_option,
    models_dir_option,
    rpc_config,
    rpc_options,
    threads_option,
)
from llamalocal.convert.native import PINNED_LLAMA_CPP_PYTHON
from llamalocal.units import gb

RPC_CMAKE_ARGS = "-DGGML_RPC=on"  # what every install of llamalocal builds llama.cpp with (see README)


def hypothetical_options(f):
    """--gpu-mem / --unified / --ram: ask about a machine other than this one."""
    for opt in reversed([
        click.option("--gpu-mem", type=SIZE, default=None,
                     help="Plan for a discrete GPU with this much VRAM (e.g. 24GiB) instead of this machine's."),
        click.option("--unified", type=SIZE, default=None,
                     help="Plan for Apple-style unified memory of this size (e.g. 16GB)."),
        click.option("--ram", type=SIZE, default=None, help="Plan for this much system RAM."),
    ]):
        f = opt(f)
    return f


def _hardware(gpu_mem: int | None, unified: int | None, ram: int | None):
    from llamalocal import hardware

    if gpu_mem is None and unified is None and ram is None:
        return hardware.detect()
    if gpu_mem is not None and unified is not None:
        raise click.UsageError("--gpu-mem and --unified describe different machines; give one")
    return hardware.simulated(gpu_mem=gpu_mem, unified=unified, ram=ram)


@click.command()
@click.argument("model", required=False)
@ctx_option
@gpu_layers_option
@threads_option
@cache_type_option
@click.option("--mlock", is_flag=True, help="Plan for locking the weights in RAM.")
@hypothetical_options
@rpc_options
@click.option("--worker-mem", type=SIZE, multiple=True,
              help="Plan with a hypothetical RPC worker with this much memory free (repeatable): would it fit?")
@force_option
@models_dir_option
@json_option
def plan(model, n_ctx, n_gpu_layers, threads, cache_type, mlock, gpu_mem, unified, ram, rpc_endpoints, rpc_key_file,
         tensor_split, worker_mem, force, models_dir, as_json):
    """Show where MODEL would go (GPU layers, memory per device) and why, without loading it.

    MODEL is a .gguf file, a directory, or a name under the models directory; omitted, the
    newest GGUF there. With --rpc, each worker is asked for its device and free memory first,
    and the plan shows what each device (this machine's and each worker's) would hold.
    """
    from llamalocal import hardware, planner
    from llamalocal.model_desc import read_model_desc
    from llamalocal.paths import resolve_gguf

    desc = read_model_desc(resolve_gguf(model, models_dir))
    hw = _hardware(gpu_mem, unified, ram)
    cfg = rpc_config(rpc_endpoints, rpc_key_file, tensor_split, warn=lambda msg: click.echo(msg, err=True))
    workers = hardware.hypothetical_workers(list(worker_mem))
    if cfg is not None and cfg.endpoints:
        from llamalocal.rpc import RpcSession

        session = RpcSession(cfg, log=lambda msg: click.echo(msg, err=True))
        workers = session.probe(refuse_busy=False) + workers  # real ones first, in --rpc order
    hw = hardware.with_workers(hw, workers)
    p = planner.plan(desc, hw, n_ctx=n_ctx, n_gpu_layers=n_gpu_layers, cache_type=cache_type, threads=threads,
                     mlock=mlock, tensor_split=cfg.tensor_split if cfg is not None else None)
    planner.check(p, force)
    if as_json:
        click.echo(json.dumps(p.to_json(), indent=2))
    else:
        click.echo(f"hardware: {hw.source}")
        click.echo(p.describe())
    for e in p.errors:
        click.echo(f"warning (forced): {e}", err=True)
    if p.fits == "no" and as_json:
        click.echo(f"warning: {p.reason}", err=True)


@click.command()
@ctx_option
@cache_type_option
@hypothetical_options
@json_option
def requirements(n_ctx, cache_type, gpu_mem, unified, ram, as_json):
    """What Meta's models need at each preset, and what this machine can do with them.

    LLaMA 7B-65B, Llama-2 70B, Llama-3.2 1B/3B, Llama-3.1 8B/70B/405B: file size, memory at the
    context (default each model's own, at most 4096; the KV cache grows with --ctx).
    """
    from llamalocal import planner
    from llamalocal.model_desc import (
        REFERENCE_QUANTS,
        REFERENCE_SHAPES,
        reference_file_bytes,
        reference_model,
    )

    hw = _hardware(gpu_mem, unified, ram)
    rows = []
    for size in REFERENCE_SHAPES:
        for quant in REFERENCE_QUANTS:
            desc = reference_model(size, quant)
            ctx = n_ctx or planner.default_ctx(desc)
            p = planner.plan(desc, hw, n_ctx=ctx, cache_type=cache_type)
            # memory to run everything at this context, wherever it goes
            kv = planner.kv_bytes_per_layer(desc, ctx, cache_type) * desc.n_layers
            run = desc.weights_bytes + kv + planner.compute_bytes(desc, ctx) + planner.BASELINE_BYTES
            rows.append({
                "model": desc.name.rsplit(" ", 1)[0], "quant": quant, "file_bytes": reference_file_bytes(desc),
                "n_layers": desc.n_layers, "n_gpu_layers": p.n_gpu_layers, "fits": p.fits, "n_ctx": ctx,
                "memory_bytes": run, "kv_bytes": kv,
            })
    if as_json:
        click.echo(json.dumps({"hardware": hw.source, "cache_type": cache_type, "rows": rows}, indent=2))
        return
    verdict = {"gpu": "all on GPU", "cpu": "CPU only", "no": "does not fit, will page from disk"}
    click.echo(f"hardware: {hw.source}")
    click.echo(f"{'model':<16}{'quant':<7}{'file':>10}{'ctx':>7}{'memory':>11}  this machine")
    for r in rows:
        what = verdict.get(r["fits"], f"{r['n_gpu_layers']}/{r['n_layers'] + 1} layers on GPU")
        click.echo(f"{r['model']:<16}{r['quant']:<7}{gb(r['file_bytes']):>10}{r['n_ctx']:>7}"
                   f"{gb(r['memory_bytes']):>11}  {what}")


# ---------------------------------------------------------------------------------------------
# doctor
# ---------------------------------------------------------------------------------------------

def gpu_hint() -> tuple[str, str] | None:
    """(backend, CMAKE_ARGS) for a GPU this machine seems to have, or None."""
    if platform.system() == "Darwin" and platform.machine() == "arm64":
        return "Metal", "-DGGML_METAL=on"
    if shutil.which("nvidia-smi") or Path("/proc/driver/nvidia").exists():
        return "CUDA", "-DGGML_CUDA=on"
    if shutil.which("rocminfo") or Path("/dev/kfd").exists():
        return "HIP", "-DGGML_HIP=on"
    if shutil.which("vulkaninfo"):
        return "Vulkan", "-DGGML_VULKAN=on"
    return None


def reinstall_command(cmake_args: str) -> str:
    """The reinstall that really rebuilds: pip would otherwise reuse the wheel it cached from the
    last build, whatever CMAKE_ARGS says. RPC is always on (llamalocal's standard build)."""
    if RPC_CMAKE_ARGS not in cmake_args:
        cmake_args = f"{cmake_args} {RPC_CMAKE_ARGS}".strip()
    return (f'pip cache remove llama_cpp_python; CMAKE_ARGS="{cmake_args}" pip install --force-reinstall '
            f"--no-deps llama-cpp-python=={PINNED_LLAMA_CPP_PYTHON}")


@click.command()
@json_option
def doctor(as_json):
    """Which backends this llama-cpp-python build has (RPC included), the devices it sees, and the
    reinstall command when a GPU or RPC is missing."""
    from llamalocal import hardware

    hw = hardware.detect()
    hint = gpu_hint()
    known = ["CPU", "Metal", "CUDA", "Vulkan", "HIP", "SYCL", "RPC"]
    have = {b.lower() for b in hw.backends}
    fix = None
    missing_gpu = bool(hint) and hint[0].lower() not in have  # type: ignore[index]
    missing_rpc = "rpc" not in have
    if missing_gpu or missing_rpc:
        gpu_args = hint[1] if hint else ""
        fix = reinstall_command(gpu_args)
    if as_json:
        click.echo(json.dumps(hw.to_json() | {
            "backend_support": {b: b.lower() in have for b in known}, "rpc": not missing_rpc,
            "gpu_detected": hint[0] if hint else None, "reinstall": fix}, indent=2))
        return
    click.echo("backends in this build: " + "  ".join(f"{b} {'yes' if b.lower() in have else 'no'}" for b in known))
    click.echo(f"CPU: {hw.physical_cores} physical / {hw.logical_cores} logical cores; "
               f"features: {' '.join(hw.cpu_features) or 'none reported'}")
    click.echo(f"RAM: {hw.ram_total / 2**30:.1f} GiB total, {hw.ram_available / 2**30:.1f} GiB available")
    for d in hw.devices:
        click.echo(f"device {d.name} ({d.kind}, {d.backend}): {d.description}; "
                   f"{d.free_bytes / 2**30:.1f} GiB free of {d.total_bytes / 2**30:.1f} GiB")
    click.echo(f"RPC (llamalocal worker, --rpc): {'yes' if not missing_rpc else 'no: this build has no libggml-rpc'}")
    if fix:
        why = []
        if missing_gpu:
            why.append(f"this machine has a {hint[0]} GPU but this llama-cpp-python build cannot use it")  # type: ignore[index]
        if missing_rpc:
            why.append("this llama-cpp-python build was compiled without RPC (pip reused a wheel cached from an "
                       "install without -DGGML_RPC=on?)")
        text = "; ".join(why)
        click.echo(text[0].upper() + text[1:] + ". Reinstall with:", err=True)
        click.echo(f"  {fix}")
    if not hw.accelerators and not missing_gpu:
        click.echo("No GPU found: llamalocal will run on the CPU.", err=True)
    if os.environ.get("CMAKE_ARGS"):
        click.echo(f"(CMAKE_ARGS is set in this shell: {os.environ['CMAKE_ARGS']})", err=True)


COMMANDS = [plan, requirements, doctor]
