"""planner: the right decisions on simulated machines, and predictions that match llama.cpp."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from llamalocal import hardware, planner
from llamalocal.errors import PlanError
from llamalocal.hardware import GiB, MiB
from llamalocal.model_desc import read_model_desc, reference_model


def P(profile: str, size: str, quant: str, **kw) -> planner.Plan:
    return planner.plan(reference_model(size, quant), hardware.profile(profile), **kw)


# Each case with why it is the right decision (default context: 2048 for LLaMA-1, 4096 for Llama-2).
def test_7b_q4_0_fits_m1_8gb():
    # 3.83 GB of weights + 1 GiB KV + ~0.2 GiB compute = 4.7 GiB < working set 5461 MiB less margin
    p = P("m1-8gb", "7B", "q4_0")
    assert p.fits == "gpu" and p.n_gpu_layers == 33
    assert p.devices[0].kind == "unified" and "fits entirely" in p.reason


def test_13b_q4_0_on_m1_8gb_pages():
    # 7.4 GB of weights in 8 GB of RAM shared with the OS: it will page
    p = P("m1-8gb", "13B", "q4_0")
    assert p.fits == "no" and "page from disk" in p.reason


def test_13b_q4_0_fits_m2_16gb():
    # 7.4 GB + 1.6 GiB KV < 10.9 GiB working set
    assert P("m2-16gb", "13B", "q4_0").fits == "gpu"


def test_65b_q4_0_fits_m2_max_96gb():
    # 36.8 GB + 5 GiB KV < 72 GiB working set
    assert P("m2-max-96gb", "65B", "q4_0").fits == "gpu"


def test_13b_q4_0_fits_4090():
    p = P("rtx4090-24gb", "13B", "q4_0")
    assert p.fits == "gpu" and p.n_gpu_layers == 41
    gpu, cpu = p.devices
    assert gpu.kind == "gpu" and gpu.n_layers == 40 and gpu.has_output
    # only token_embd stays on the CPU, and the CPU compute buffer is the small host one
    assert cpu.weights_bytes == reference_model("13B", "q4_0").token_embd_bytes
    assert cpu.kv_bytes == 0


def test_65b_q4_0_splits_on_4090_with_64gb():
    # 36.8 GB of weights + 5 GiB KV: ~0.5 GB per layer, 23.5 GiB budget -> about 45 layers on the GPU,
    # the rest (~17 GB) in 64 GB of RAM
    p = P("rtx4090-24gb", "65B", "q4_0")
    assert p.fits == "partial"
    assert 40 <= p.n_gpu_layers <= 52
    gpu, cpu = p.devices
    assert gpu.total_bytes <= gpu.budget_bytes < gpu.total_bytes + 1 * GiB  # nearly full, not over
    assert cpu.fits and cpu.n_layers == 81 - p.n_gpu_layers
    assert "limited by VRAM" in p.reason
    # one more layer would not fit
    more = P("rtx4090-24gb", "65B", "q4_0", n_gpu_layers=p.n_gpu_layers + 1)
    assert more.errors


def test_30b_q4_0_splits_on_3080():
    # 18.4 GB + 3 GiB KV does not fit 10 GiB; about half the layers do
    p = P("rtx3080-10gb", "30B", "q4_0")
    assert p.fits == "partial" and 20 <= p.n_gpu_layers <= 35


def test_70b_q4_0_fits_a100():
    p = P("a100-80gb", "70B", "q4_0")
    assert p.fits == "gpu" and p.n_ctx == 4096
    # grouped-query attention: 8 KV heads -> KV is 1/8 of a 64-head cache
    assert p.devices[0].kv_bytes == 2 * 4096 * 8 * 128 * 2 * 80


def test_7b_f16_on_x86_8gb_pages():
    p = P("x86-8gb", "7B", "f16")
    assert p.fits == "no" and p.n_gpu_layers == 0
    assert "page from disk" in p.reason and p.warnings


def test_7b_q4_0_on_x86_16gb_cpu():
    p = P("x86-16gb", "7B", "q4_0")
    assert p.fits == "cpu" and p.n_gpu_layers == 0 and p.threads == 8
    (cpu,) = p.devices
    # x86 repacks Q4_0 layer weights: the copy is counted, and its source pages are droppable;
    # the context fills from start_bytes to total_bytes
    desc = reference_model("7B", "q4_0")
    assert cpu.reclaimable_bytes > 0 and cpu.weights_bytes == desc.weights_bytes + cpu.reclaimable_bytes
    assert cpu.start_bytes < cpu.total_bytes
    assert cpu.total_bytes > desc.weights_bytes + cpu.reclaimable_bytes + cpu.kv_bytes


def test_explicit_layers_honoured_exactly():
    p = P("rtx4090-24gb", "65B", "q4_0", n_gpu_layers=20)
    assert p.n_gpu_layers == 20 and not p.errors and p.fits == "partial"
    gpu = p.devices[0]
    # llama.cpp's count: the output layer first, then the last 19 repeating layers
    assert gpu.has_output and gpu.n_layers == 19
    one = P("rtx4090-24gb", "65B", "q4_0", n_gpu_layers=1)
    assert one.devices[0].has_output and one.devices[0].n_layers == 0


def test_explicit_too_many_refused_unless_forced():
    p = P("rtx3080-10gb", "30B", "q4_0", n_gpu_layers=61)
    with pytest.raises(PlanError, match=r"does not fit .*needs .* GiB.*budget"):
        planner.check(p)
    assert planner.check(p, force=True).n_gpu_layers == 61
    with pytest.raises(PlanError):
        planner.check(P("rtx3080-10gb", "30B", "q4_0", n_gpu_layers="all"))


def test_impossible_layer_count_refused_even_forced():
    p = P("a100-80gb", "7B", "q4_0", n_gpu_layers=40)
    with pytest.raises(PlanError, match="impossible"):
        planner.check(p, force=True)


def test_layers_without_gpu_refused():
    with pytest.raises(PlanError, match="GPU"):
        planner.check(P("x86-16gb", "7B", "q4_0", n_gpu_layers=10))


def test_ctx_beyond_training_refused():
    p = P("a100-80gb", "7B", "q4_0", n_ctx=4096)
    with pytest.raises(PlanError, match="2048"):
        planner.check(p)
    assert P("a100-80gb", "70B", "q4_0", n_ctx=4096).errors == []


def test_quantized_cache_and_context_change_kv():
    a = P("x86-16gb", "7B", "q4_0", n_ctx=2048)
    b = P("x86-16gb", "7B", "q4_0", n_ctx=2048, cache_type="q8_0")
    c = P("x86-16gb", "7B", "q4_0", n_ctx=1024)
    assert a.cpu.kv_bytes == 1024 * MiB  # 2 x 2048 x 4096 x 2 bytes x 32 layers
    assert b.cpu.kv_bytes == a.cpu.kv_bytes * 17 // 32
    assert c.cpu.kv_bytes == a.cpu.kv_bytes // 2


def test_json_shape():
    p = P("rtx4090-24gb", "65B", "q4_0")
    j = json.loads(json.dumps(p.to_json()))
    for key in ("n_layers", "n_gpu_layers", "threads", "fits", "reason", "devices"):
        assert key in j
    assert j["fits"] in ("gpu", "partial", "cpu", "no")
    assert [d["kind"] for d in j["devices"]] == ["gpu", "cpu"]
    for d in j["devices"]:
        for key in ("name", "kind", "weights_bytes", "kv_bytes", "compute_bytes", "total_bytes", "budget_bytes"):
            assert isinstance(d[key], int if key not in ("name", "kind") else str)
    text = p.describe()
    assert "limited by VRAM" in text and "CPU" in text and len(text.splitlines()) <= 8


# llama.cpp 0.3.36's own `CPU compute buffer size` lines, read with verbose=True on this machine:
# (n_embd, n_head, n_head_kv, n_ff, n_ctx, n_ubatch) -> MiB
MEASURED_COMPUTE = [
    ((4096, 32, 32, 11008), 512, 512, 105.51), ((4096, 32, 32, 11008), 1024, 512, 122.01),
    ((4096, 32, 32, 11008), 2048, 512, 188.01), ((4096, 32, 32, 11008), 4096, 512, 320.01),
    ((4096, 32, 32, 11008), 512, 128, 26.38), ((4096, 32, 32, 11008), 4096, 128, 80.00),
    ((1024, 8, 2, 2816), 2048, 512, 66.50), ((1024, 8, 2, 2816), 8192, 512, 155.01),
    ((1024, 8, 2, 2816), 8192, 256, 77.50),
]


@pytest.mark.parametrize("shape,n_ctx,n_ubatch,mib", MEASURED_COMPUTE)
def test_compute_formula_matches_llama_cpp_logs(shape, n_ctx, n_ubatch, mib):
    d = reference_model("7B", "q4_0")
    d.n_embd, d.n_head, d.n_head_kv, d.n_ff = shape
    assert planner.compute_bytes(d, n_ctx, n_ubatch) / MiB == pytest.approx(mib, rel=0.05)


def test_compute_buffer_read_from_llama_cpp(tmp_path):
    """The same check live: load a small model verbosely and read llama.cpp's own figure."""
    from test_model_desc import write_gguf

    path = write_gguf(tmp_path / "s.gguf", n_layers=1, n_embd=256, n_ff=688, n_head=4, n_head_kv=2,
                      n_vocab=2000, n_ctx=1024)
    code = textwrap.dedent(f"""
        import llama_cpp
        llama_cpp.Llama(model_path={str(path)!r}, n_ctx=1024, n_gpu_layers=0, n_threads=1, verbose=True)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    lines = [ln for ln in out.stderr.splitlines() if "CPU compute buffer size" in ln and "sched_reserve" in ln]
    assert lines, out.stderr[-2000:]
    mib = float(lines[-1].split("=")[1].split()[0])
    assert planner.compute_bytes(read_model_desc(path), 1024) / MiB == pytest.approx(mib, rel=0.05)


# ---------------------------------------------------------------------------------------------
# accuracy: predicted resident memory vs real CPU runs of several shapes
# ---------------------------------------------------------------------------------------------

ACCURACY_SHAPES = [
    # (name, preset, ctx, model shape, KV cache type): what each one exercises
    ("tiny-gqa", "q8_0", 4096, dict(n_layers=4, n_embd=256, n_ff=1024, n_head=4, n_head_kv=2, n_vocab=2048), "f16"),
    # compute and work buffers dominate a small model at a long context
    ("7b1l-q4_0", "q4_0", 1024, dict(n_layers=1, n_embd=4096, n_ff=11008, n_head=32, n_vocab=32000), "f16"),
    # x86 repacks Q4_0: an anonymous copy beside the mapped file, whose tail is unmapped
    ("llama3-vocab", "f16", 512, dict(n_layers=2, n_embd=512, n_ff=1536, n_head=8, n_head_kv=2,
                                      vocab="llama-bpe", n_ctx=131072), "f16"),
    # Llama 3's 128256 tokens and 280147 merges: llama.cpp's vocabulary tables
    ("7b1l-q8_0-fa", "q8_0", 2048, dict(n_layers=1, n_embd=4096, n_ff=11008, n_head=32, n_vocab=32000), "q8_0"),
    # a quantized KV cache runs with flash attention: no KQ matrix, no f16 copy of it
]


@pytest.mark.slow
@pytest.mark.parametrize("name,preset,ctx,shape,cache", ACCURACY_SHAPES, ids=[s[0] for s in ACCURACY_SHAPES])
def test_plan_matches_measured_resident_memory(tmp_path_factory, llama_cpp_src, name, preset, ctx, shape, cache):
    """`plan --json`'s CPU start_bytes and total_bytes against the peak RSS of `llamalocal generate`
    (a child process, VmHWM polled) with a first-ubatch prompt and with one that fills the context."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from bench_plan import plan_cpu, run_peak, text_for
    from synth_gguf import make

    path = make(tmp_path_factory.mktemp("plan") / f"{name}.gguf", preset, **shape)
    cpu = plan_cpu(path, ctx, 2, cache)
    vocab = shape.get("vocab", "spm")
    for key, n_tokens in (("start_bytes", min(512, ctx) - 8), ("total_bytes", ctx - 8)):
        peak, n = run_peak(path, ctx, 2, text_for(vocab, n_tokens), cache)
        assert n == n_tokens + 1  # and BOS
        err = (cpu[key] - peak) / peak
        print(f"{name} {key}: planned {cpu[key] / MiB:.1f} MiB, measured {peak / MiB:.1f} MiB ({err:+.1%})")
        assert abs(err) <= 0.05, f"{name} {key}: planned {cpu[key] / MiB:.1f} MiB, measured {peak / MiB:.1f} MiB"


def test_tied_output_is_counted_once_on_the_cpu_and_copied_to_a_gpu():
    # Llama-3.2 1B ties its output to the embeddings: on the CPU one tensor serves both; a GPU that
    # gets the output layer gets a copy of token_embd (llama.cpp duplicates it there)
    desc = reference_model("Llama-3.2 1B", "f16")
    assert desc.tied_output
    (cpu,) = P("x86-16gb", "Llama-3.2 1B", "f16").devices
    assert cpu.weights_bytes == desc.weights_bytes  # f16: nothing repacked
    gpu, host = P("rtx4090-24gb", "Llama-3.2 1B", "f16").devices
    # the GPU: every layer, the output norm and a copy of token_embd; the CPU: token_embd, rope_freqs
    assert gpu.has_output and gpu.weights_bytes == desc.weights_bytes - desc.other_bytes
    assert host.weights_bytes == desc.token_embd_bytes + desc.other_bytes
