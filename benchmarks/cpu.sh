#!/usr/bin/env bash
# The CPU tables of benchmarks/README.md in one command (from the repository root, in the venv):
#   bash benchmarks/cpu.sh [OUT_DIR] [BENCH OPTION ...]
# Options after OUT_DIR are appended to every `timm-gsop bench` call and override the ones below; a check that it
# starts: bash benchmarks/cpu.sh /tmp/cpu --batch-size 1 --img-size 64 --repeats 1 --steps 1
# 1. inference and train-step (forward, backward, SGD step) img/s at batch 8, 224x224, 2 threads: GSoP-Net1 and
#    GSoP-Net2 each timed interleaved, in one process, with its own backbone (the same stride-1 network without
#    GSoP modules, the ratios' baseline), eager and with torch.compile;
# 2. peak tensor memory of one train step at batch 32, eager and with torch.compile.
# Each run writes OUT_DIR/NAME.txt (the table) and OUT_DIR/NAME.json (with the command and versions).
set -euo pipefail
out="${1:-benchmarks/cpu-results}"
extra=("${@:2}")
mkdir -p "$out"

# glibc serves a block above its mmap threshold (at most 32 MiB: a batch-32 ResNet-50 activation, and smaller
# ones until the threshold has adapted) with a fresh mmap and unmaps it on free, so a step page-faults such
# activations in again: tens of thousands of minor faults, varying from step to step and model to model, noise in
# the ratios. These keep freed memory in the process for reuse (no mmap, no trimming below 2 GiB), as jemalloc /
# tcmalloc do; tests/test_bench.py checks the faults stop. The memory figures do not depend on them: they are live
# tensor bytes from torch's profiler, not the process's RSS.
export MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647

net1=(gsop_resnet50 'gsop_resnet50:gsop_stages=(0,0,0,0)')
net2=(gsop2_resnet50 'gsop2_resnet50:gsop_stages=(0,0,0,0)')

bench() {  # NAME BENCH-OPTION ...
    local name=$1
    shift
    timm-gsop bench --threads 2 --img-size 224 "$@" "${extra[@]}" --json "$out/$name.json" | tee "$out/$name.txt"
}

for compile in '' --compile; do
    tag=${compile:+_compile}
    bench "cpu_net1_b8$tag" --model "${net1[@]}" --baseline "${net1[1]}" --batch-size 8 --repeats 11 --steps 3 \
        --no-memory $compile
    bench "cpu_net2_b8$tag" --model "${net2[@]}" --baseline "${net2[1]}" --batch-size 8 --repeats 11 --steps 3 \
        --no-memory $compile
    # run for its memory column: its img/s columns are one step each, not a timing
    bench "cpu_b32_memory$tag" --model "${net1[@]}" "${net2[@]}" --batch-size 32 --mode train --warmup 1 \
        --repeats 1 --steps 1 $compile
done
