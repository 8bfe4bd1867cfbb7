#!/usr/bin/env bash
# One-command GPU check (needs a CUDA device; not run in CI). From the repository root, in the venv:
#   bash benchmarks/gpu.sh [OUT_DIR]
# 1. train img/s at batch 128 with bf16 autocast + channels_last + torch.compile, interleaved in one process:
#    GSoP-Net1 and GSoP-Net2 against their own backbones (the same networks without GSoP blocks);
# 2. fp16 (GradScaler) and bf16 autocast: 50 training steps each (every 10th batch all zeros), every loss,
#    output and gradient finite, the GSoP gates in float32 (`timm-gsop bench --amp-check`).
set -euo pipefail
out="${1:-benchmarks/gpu-results}"
mkdir -p "$out"
python -c "import torch; assert torch.cuda.is_available(), 'benchmarks/gpu.sh needs a CUDA device'; print(torch.cuda.get_device_name())"

timm-gsop bench --device cuda --amp bf16 --channels-last --compile --batch-size 128 --mode train \
    --warmup 3 --steps 10 --repeats 5 \
    --model gsop_resnet50 'gsop_resnet50:gsop_stages=(0,0,0,0)' gsop2_resnet50 'gsop2_resnet50:gsop_stages=(0,0,0,0)' \
    --baseline 'gsop_resnet50:gsop_stages=(0,0,0,0)' --json "$out/gpu_bf16_cl_compile_b128.json" \
    | tee "$out/gpu_bf16_cl_compile_b128.txt"

timm-gsop bench --device cuda --amp-check fp16 bf16 --steps 50 --batch-size 32 --channels-last \
    --model gsop_resnet50 gsop2_resnet50 --json "$out/gpu_amp_check.json" | tee "$out/gpu_amp_check.txt"
