#!/usr/bin/env bash
# The tables of benchmarks/README.md, from the repository root, in the venv:  bash benchmarks/cpu.sh [OUT_DIR]
# Each line is one process of benchmarks/compare.py (the specs timed interleaved); OUT_DIR/NAME.txt is its output.
# 'wall': wall-clock time on 2 threads; 'cputime': the process's CPU time on 1 thread, which other processes
# sharing the cores do not inflate. A quick check that it runs: QUICK="-b 1 --repeats 1" bash benchmarks/cpu.sh /tmp/c
set -euo pipefail
out="${1:-benchmarks/cpu-results}"
mkdir -p "$out"
run() {  # NAME COMPARE-ARGUMENT ...
    local name=$1
    shift
    python -u benchmarks/compare.py --threads 2 "$@" ${QUICK:-} | tee "$out/$name.txt"
}
cputime=(--threads 1 --timer process)
net1=(gsop_resnet50 --baseline 'gsop_resnet50:gsop_stages=(0,0,0,0)')    # GSoP-Net1 against its own backbone
net2=(gsop2_resnet50 --baseline 'gsop2_resnet50:gsop_stages=(0,0,0,0)')  # GSoP-Net2 likewise

# 1. time per step, batch 8, 224 px, eager and torch.compile (inductor, default mode)
run net1_b8 "${net1[@]}" -b 8 --repeats 7
run net2_b8 "${net2[@]}" -b 8 --repeats 7
run net1_b8_cputime "${net1[@]}" -b 8 --repeats 7 "${cputime[@]}"
run net2_b8_cputime "${net2[@]}" -b 8 --repeats 7 "${cputime[@]}"
run net1_b8_compile "${net1[@]}" -b 8 --repeats 7 --compile --warmup 2
run net2_b8_compile "${net2[@]}" -b 8 --repeats 7 --compile --warmup 2
run net1_b8_compile_cputime "${net1[@]}" -b 8 --repeats 7 --compile --warmup 2 "${cputime[@]}"
run net2_b8_compile_cputime "${net2[@]}" -b 8 --repeats 7 --compile --warmup 2 "${cputime[@]}"

# 2. peak memory of a train step at batch 32 (a fresh process per spec, 3 steps each), eager and compiled
for c in '' --compile; do
    run "net1_b32_memory${c:+_compile}" "${net1[@]}" -b 32 --tasks --memory --repeats 3 $c
    run "net2_b32_memory${c:+_compile}" "${net2[@]}" -b 32 --tasks --memory --repeats 3 $c
done

# 3. the covariance head (global_pool='isqrt', the default) against the same covpool model with global_pool='avg',
# 448 px, batch 4, eager: CPU time, then memory (3 steps); ResNet-50 also with plain covariance pooling ('cov')
head() {  # NAME MODEL-SPEC ... (the baseline is the first spec with :global_pool=avg)
    run "covpool448_$1" "${@:2}" --baseline "$2:global_pool=avg" --img-size 448 -b 4 --repeats 5 "${cputime[@]}"
    run "covpool448_$1_memory" "${@:2}" --baseline "$2:global_pool=avg" --img-size 448 -b 4 --tasks --memory --repeats 3
}
head resnet50 covpool_resnet50 covpool_resnet50:global_pool=cov
head convnext_tiny covpool_convnext_tiny
# DeiT-S built for 448 px (a 28x28 token grid); its 'avg' is the mean of the patch tokens
head deit_small covpool_deit_small_patch16_224:img_size=448

# 4. the second-order ops against the released formulations, forward + backward
run ops --ops --repeats 9 --number 3 "${cputime[@]}"
