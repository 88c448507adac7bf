"""Split plans over RPC workers (hypothetical ones here; tests/test_rpc.py checks real workers and
that llama.cpp places the layers exactly as these plans say)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from llamalocal import hardware, planner
from llamalocal.errors import PlanError
from llamalocal.hardware import GiB, MiB
from llamalocal.model_desc import reference_model


def machine(profile: str, *worker_gib: float) -> hardware.Hardware:
    return hardware.with_workers(hardware.profile(profile),
                                 hardware.hypothetical_workers([int(g * GiB) for g in worker_gib]))


def test_workers_are_not_accelerators():
    hw = machine("rtx4090-24gb", 32)
    assert [d.name for d in hw.accelerators] == ["CUDA0 (RTX 4090)"]
    assert [d.endpoint for d in hw.workers] == ["hypothetical:1"]
    assert "RPC" in hw.backends and "1 RPC worker" in hw.source


def test_proportional_counts_follow_llama_cpp_rule():
    # llama.cpp: layer t of n goes to the first device whose cumulative share exceeds t / n
    assert planner.proportional_counts(4, [1, 1, 1]) == [2, 1, 1]
    assert planner.proportional_counts(80, [1, 1]) == [40, 40]
    assert planner.proportional_counts(32, [0, 1, 3]) == [0, 8, 24]
    assert planner.proportional_counts(5, [1, 0, 0]) == [5, 0, 0]


def test_70b_q4_0_over_a_16gb_machine_and_two_workers():
    # 36.5 GiB of weights: neither the 16 GB machine nor either worker holds it alone
    model = reference_model("70B", "q4_0")
    p = planner.plan(model, machine("x86-16gb", 32, 16))
    assert p.fits == "rpc" and not p.errors and p.split is not None
    cpu, w1, w2 = p.devices
    assert cpu.kind == "cpu" and [w1.endpoint, w2.endpoint] == ["hypothetical:1", "hypothetical:2"]
    assert all(d.fits for d in p.devices)
    assert cpu.n_layers + w1.n_layers + w2.n_layers == model.n_layers
    # the output layer (and the logits) stay here; the CPU's layers come first, as llama.cpp puts them
    assert cpu.has_output and not w1.has_output and not w2.has_output
    assert (cpu.first_layer, w1.first_layer, w2.first_layer) == (0, cpu.n_layers, cpu.n_layers + w1.n_layers)
    # by budget: every device equally full (within a layer of the same fraction of what it can hold)
    caps = [int(d.why.split("holds up to ")[1].split()[0]) for d in p.devices]
    fractions = [d.n_layers / c for d, c in zip(p.devices, caps, strict=True)]
    assert max(fractions) - min(fractions) < 1.5 / min(caps)
    assert w1.n_layers > w2.n_layers  # twice the memory, about twice the layers
    # what llama.cpp is told: workers in --rpc order, then the CPU as the last split device holding
    # only the output layer; its first layers stay below n_gpu_layers' cut, on the CPU backend proper
    s = p.split
    assert s.devices == ["rpc:hypothetical:1", "rpc:hypothetical:2", "CPU"]
    assert s.tensor_split == [w1.n_layers, w2.n_layers, 1]
    assert s.n_gpu_layers == p.n_gpu_layers == model.n_layers + 1 - cpu.n_layers
    assert w1.budget_bytes == 32 * GiB - planner.WORKER_MARGIN_BYTES


def test_tensor_split_over_the_plan_order_and_rechecked():
    model = reference_model("7B", "q4_0")
    p = planner.plan(model, machine("x86-16gb", 32, 16), tensor_split=[1, 1, 1])
    assert [d.n_layers for d in p.devices] == planner.proportional_counts(32, [1, 1, 1]) == [11, 11, 10]
    assert p.split.by == "--tensor-split 1,1,1" and "as asked" in p.reason
    # a worker too small for what --tensor-split gives it: refused with the numbers, not found out later
    p = planner.plan(reference_model("70B", "q4_0"), machine("x86-16gb", 32, 4), tensor_split=[0, 1, 3])
    assert p.errors and "worker hypothetical:2 cannot hold its 60 layers" in p.errors[0]
    with pytest.raises(PlanError, match="hypothetical:2 cannot hold"):
        planner.check(p)


def test_contradictions_are_refused():
    model = reference_model("7B", "q4_0")
    with pytest.raises(PlanError, match="has 2 values but the plan has 3 devices"):
        planner.plan(model, machine("x86-16gb", 8, 8), tensor_split=[1, 1])
    with pytest.raises(PlanError, match="cannot be combined with RPC workers"):
        planner.plan(model, machine("x86-16gb", 8), n_gpu_layers=10)


def test_too_big_for_everything_fills_workers_and_pages_the_rest():
    p = planner.plan(reference_model("70B", "q4_0"), machine("x86-8gb", 8))
    cpu, w = p.devices
    assert w.fits and p.fits == "no" and "page from disk" in p.reason
    assert w.n_layers + cpu.n_layers == 80


def test_a_local_gpu_keeps_the_output_layer():
    p = planner.plan(reference_model("70B", "q4_0"), machine("rtx4090-24gb", 32))
    cpu, worker, gpu = p.devices
    assert (cpu.kind, worker.kind, gpu.kind) == ("cpu", "rpc", "gpu")
    assert gpu.has_output and not cpu.has_output and all(d.fits for d in p.devices)
    assert p.split.devices == ["rpc:hypothetical:1", "CUDA0 (RTX 4090)"]
    assert p.split.tensor_split == [worker.n_layers, gpu.n_layers + 1]


def test_plan_json_and_text_for_workers(tmp_path):
    from test_model_desc import write_gguf

    path = write_gguf(tmp_path / "tiny.gguf", n_layers=4, n_ctx=512)
    r = CliRunner().invoke(main_cli(), ["plan", str(path), "--worker-mem", "2GiB", "--worker-mem", "1GiB",
                                        "--tensor-split", "2,1,1", "--json"])
    assert r.exit_code == 0, r.output
    j = json.loads(r.stdout)
    assert j["fits"] == "rpc" and [d["kind"] for d in j["devices"]] == ["cpu", "rpc", "rpc"]
    assert [d["n_layers"] for d in j["devices"]] == [2, 1, 1]
    assert [d.get("endpoint") for d in j["devices"]] == [None, "hypothetical:1", "hypothetical:2"]
    assert j["devices"][1]["budget_bytes"] == 2 * GiB - 256 * MiB
    assert j["split"]["devices"] == ["rpc:hypothetical:1", "rpc:hypothetical:2", "CPU"]
    r = CliRunner().invoke(main_cli(), ["plan", str(path), "--worker-mem", "2GiB"])
    assert r.exit_code == 0 and "worker hypothetical:1: layer" in r.stdout and "tensor_split" in r.stdout
    r = CliRunner().invoke(main_cli(), ["plan", str(path), "--worker-mem", "2GiB", "--tensor-split", "1,1,1"])
    assert r.exit_code == 2 and "has 3 values but the plan has 2 devices" in r.output
    r = CliRunner().invoke(main_cli(), ["plan", str(path), "--tensor-split", "1,x"])
    assert r.exit_code == 2 and "not a list of numbers" in r.output


def test_plans_without_workers_are_unchanged():
    p = planner.plan(reference_model("13B", "q4_0"), hardware.profile("rtx4090-24gb"))
    assert p.split is None and p.to_json()["split"] is None and p.devices[-1].kind == "cpu"


def main_cli():
    from llamalocal.cli import main

    return main
