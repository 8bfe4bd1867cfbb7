#!/usr/bin/env bash
# One-command GPU check (needs a CUDA device; not run in CI). From the repository root, in the venv:
#   bash benchmarks/gpu.sh [OUT_DIR]
# 1. train img/s at batch 128 with bf16 autocast + channels_last + torch.compile, interleaved in one process:
#    GSoP-Net1 and GSoP-Net2 against their own backbones (the same networks without GSoP blocks);
# 2. fp16 (GradScaler) and bf16 autocast: 50 training steps each (every 10th batch all zeros), every loss,
#    output and gradient finite, the GSoP gates in float32 (`timm-gsop bench --amp-check`);
# 3. the covariance heads at 448 px (benchmarks/covpool448.sh on the GPU): per backbone, inference and train img/s
#    and peak train memory of the iSQRT-COV head (global_pool=isqrt, the default) against the same model with
#    average pooling (global_pool=avg, the baseline), interleaved in one process, at batch 32 (128 at 224 px in
#    pixels), with the same bf16 autocast + channels_last + torch.compile as 1.; ResNet-50 also with 'cov'.
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

covpool448() {  # NAME MODEL-SPEC ...  (the last spec is the baseline)
    local name=$1
    shift
    timm-gsop bench --device cuda --amp bf16 --channels-last --compile --img-size 448 --batch-size 32 \
        --mode infer train --warmup 3 --steps 10 --repeats 5 --model "$@" --baseline "${!#}" \
        --json "$out/gpu_covpool448_$name.json" | tee "$out/gpu_covpool448_$name.txt"
}
covpool448 resnet50 covpool_resnet50 covpool_resnet50:global_pool=cov covpool_resnet50:global_pool=avg
covpool448 convnext_tiny covpool_convnext_tiny covpool_convnext_tiny:global_pool=avg
covpool448 efficientnet_b0 covpool_efficientnet_b0 covpool_efficientnet_b0:global_pool=avg
covpool448 regnety_016 covpool_regnety_016 covpool_regnety_016:global_pool=avg
covpool448 deit_small covpool_deit_small_patch16_224:img_size=448 \
    covpool_deit_small_patch16_224:img_size=448:global_pool=avg
