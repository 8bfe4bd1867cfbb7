#!/usr/bin/env bash
# The CPU comparisons of cpu.sh on a CUDA device (NOT RUN: no GPU was lent to this project's sessions). From the
# repository root, in the venv:  bash benchmarks/gpu.sh [OUT_DIR]
# bf16 autocast + torch.compile, batch 128 at 224 px (32 at 448 px), 5 interleaved repeats of 10 steps; memory:
# torch.cuda.max_memory_allocated during a train step above torch.cuda.memory_allocated before it.
set -euo pipefail
out="${1:-benchmarks/gpu-results}"
mkdir -p "$out"
python -c "import torch; assert torch.cuda.is_available(), 'benchmarks/gpu.sh needs a CUDA device'"
run() {  # NAME COMPARE-ARGUMENT ...
    local name=$1
    shift
    python -u benchmarks/compare.py --device cuda --amp bf16 --compile --warmup 3 --repeats 5 --number 10 --memory \
        "$@" | tee "$out/$name.txt"
}
run net1_b128 gsop_resnet50 --baseline 'gsop_resnet50:gsop_stages=(0,0,0,0)' -b 128
run net2_b128 gsop2_resnet50 --baseline 'gsop2_resnet50:gsop_stages=(0,0,0,0)' -b 128
head() {  # NAME MODEL-SPEC ... (the baseline is the first spec with :global_pool=avg)
    run "covpool448_$1" "${@:2}" --baseline "$2:global_pool=avg" --img-size 448 -b 32
}
head resnet50 covpool_resnet50 covpool_resnet50:global_pool=cov
head convnext_tiny covpool_convnext_tiny
head deit_small covpool_deit_small_patch16_224:img_size=448
run ops --ops --repeats 9 --number 10
