#!/usr/bin/env bash
# The 448-px cost table of benchmarks/README.md ("Covariance pooling heads at 448 px") in one command (from the
# repository root, in the venv):
#   bash benchmarks/covpool448.sh [OUT_DIR] [BENCH OPTION ...]
# Options after OUT_DIR are appended to every `timm-gsop bench` call and override the ones below; a check that it
# starts: bash benchmarks/covpool448.sh /tmp/c448 --batch-size 1 --img-size 64 --repeats 1 --steps 1 --warmup 0
# (DeiT, built for 448 px, refuses 64-px inputs: the script stops there, after the four CNNs, by design)
# For each backbone, ONE process times the iSQRT-COV head (`global_pool=isqrt`, the default: 1x1 conv to 256, BN,
# ReLU, covariance, 5 Newton-Schulz iterations, 32,896-d vector, Linear) interleaved with the same model with
# average pooling (`global_pool=avg`: exactly the backbone + Linear, the ratios' baseline), eager, 448x448, 2
# threads, batch 4: inference and train step (forward, backward, SGD step) img/s, then the peak tensor memory of
# one train step at batch 4, and FLOPs (meta device). ResNet-50 also runs the plain covariance head ('cov').
# Fewer repeats than cpu.sh (3 of 1 step, 1 warm-up step): a batch-4 448-px train step of these models takes
# 1-4 s on the quiet 2-core development VM (10-40 s while other jobs shared it).
# Then CPU time (the process's, 1 thread: it does not count waiting for a core, which the wall-clock ratios above
# do on a busy machine), isqrt / cov / avg interleaved in one process, batch 4: 'full' times the whole isqrt and
# avg models (3 repeats of 1 step), 'heads' the heads alone, global_pool + fc on each
# model's 448-px feature map (7 repeats of 3 steps): what the head adds per image. BENCH OPTIONs do not apply here.
# Each run writes OUT_DIR/covpool448_NAME.txt (the table) and OUT_DIR/covpool448_NAME.json (command, versions).
set -euo pipefail
out="${1:-benchmarks/cpu-results}"
extra=("${@:2}")
mkdir -p "$out"

# as in cpu.sh: keep freed memory in the process (no mmap / trim page faults in the timings)
export MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647

bench() {  # NAME MODEL-SPEC ...  (the last spec is the baseline)
    local name=$1
    shift
    timm-gsop bench --threads 2 --img-size 448 --batch-size 4 --warmup 1 --repeats 3 --steps 1 \
        --model "$@" --baseline "${!#}" "${extra[@]}" --json "$out/covpool448_$name.json" \
        | tee "$out/covpool448_$name.txt"
}

bench resnet50 covpool_resnet50 covpool_resnet50:global_pool=cov covpool_resnet50:global_pool=avg
bench convnext_tiny covpool_convnext_tiny covpool_convnext_tiny:global_pool=avg
bench efficientnet_b0 covpool_efficientnet_b0 covpool_efficientnet_b0:global_pool=avg
bench regnety_016 covpool_regnety_016 covpool_regnety_016:global_pool=avg
# DeiT's position embeddings are for a 14x14 grid: img_size=448 builds it for 28x28 (interpolated when loading
# weights); its 'avg' baseline averages the patch tokens (CovPoolNet drops the class token), not DeiT's own head
bench deit_small covpool_deit_small_patch16_224:img_size=448 covpool_deit_small_patch16_224:img_size=448:global_pool=avg

# CPU time: python -c "$cputime" full|heads THREADS BATCH REPEATS STEPS OUT_PREFIX [MODEL ...]
cputime=$(cat <<'PY'
"""CPU-time comparison at 448 px, interleaved in one process: 'heads' times global_pool + fc on each model's
feature map, 'full' the whole model on images; isqrt / cov / avg heads; process CPU time and wall time."""
import json, statistics, sys, time
import torch, torch.nn as nn, timm, timm_gsop  # noqa: F401
what, threads, batch, repeats, steps, out = sys.argv[1], *map(int, sys.argv[2:6]), sys.argv[6]
torch.set_num_threads(threads)
MODELS = [('covpool_resnet50', {}), ('covpool_convnext_tiny', {}), ('covpool_efficientnet_b0', {}),
          ('covpool_regnety_016', {}), ('covpool_deit_small_patch16_224', {'img_size': 448})]
MODELS = [(n, kw) for n, kw in MODELS if n in sys.argv[7:]] if sys.argv[7:] else MODELS  # optional: model names
POOLS = ('isqrt', 'cov', 'avg') if what == 'heads' else ('isqrt', 'avg')
rows, lines = [], []
for name, kw in MODELS:
    meta = timm.create_model(name, device='meta', **kw)
    shape = meta.forward_features(torch.empty(1, 3, 448, 448, device='meta')).shape[1:]
    torch.manual_seed(0)
    x = torch.randn(batch, *shape).relu() if what == 'heads' else torch.randn(batch, 3, 448, 448)
    y = torch.randint(0, 1000, (batch,))
    nets = {}
    for pool in POOLS:
        m = timm.create_model(name, global_pool=pool, **kw)
        net = nn.Sequential(m.global_pool, m.fc) if what == 'heads' else m
        nets[pool] = (net, torch.optim.SGD(net.parameters(), lr=1e-4, momentum=0.9))

    def infer(pool):
        net = nets[pool][0].eval()
        with torch.inference_mode():
            net(x)

    def train(pool):
        net, opt = nets[pool]
        net.train()
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    times = {(p, f.__name__, c): [] for p in POOLS for f in (infer, train) for c in ('wall', 'cpu')}
    for f in (infer, train):
        for p in POOLS:
            f(p)
    for _ in range(repeats):
        for f in (infer, train):
            for p in POOLS:
                wall, cpu = time.perf_counter(), time.process_time()
                for _ in range(steps):
                    f(p)
                times[(p, f.__name__, 'wall')].append((time.perf_counter() - wall) / steps / batch * 1e3)
                times[(p, f.__name__, 'cpu')].append((time.process_time() - cpu) / steps / batch * 1e3)
    for p in POOLS:
        row = dict(model=name, kwargs=kw, pool=p, feature_map=list(shape), batch=batch, threads=threads,
                   params=sum(t.numel() for t in nets[p][0].parameters()))
        text = f"{name:31s} {p:5s} {'x'.join(map(str, shape)):10s} {row['params']:>10,}"
        for mode in ('infer', 'train'):
            for clock in ('cpu', 'wall'):
                v = times[(p, mode, clock)]
                s = row[f'{mode}_{clock}_ms_per_img'] = dict(median=statistics.median(v), min=min(v), max=max(v))
                text += f"  {s['median']:8.2f} [{s['min']:.2f}, {s['max']:.2f}]"
            if p != POOLS[-1]:  # against the last (avg), per repeat
                r = [a / b for a, b in zip(times[(p, mode, 'cpu')], times[(POOLS[-1], mode, 'cpu')])]
                row[f'{mode}_cpu_ratio'] = dict(median=statistics.median(r), min=min(r), max=max(r))
        rows.append(row)
        lines.append(text)
        print(text, flush=True)
    del nets
meta = dict(torch=torch.__version__, timm=timm.__version__, what=what, threads=threads, batch=batch,
            repeats=repeats, steps=steps, command=' '.join(sys.argv))
json.dump(dict(meta=meta, rows=rows), open(out + '.json', 'w'), indent=1)
subject = 'global_pool + fc on each model\'s 448-px feature map' if what == 'heads' else 'whole models, 448x448 images'
open(out + '.txt', 'w').write(
    f"{what}: {subject}, 1000 classes; torch {meta['torch']}, timm {meta['timm']}, {threads} threads, batch "
    f"{batch}, medians [min, max] over {repeats} interleaved repeats of {steps} steps; train = forward, backward, "
    f"SGD step; ms per image, process CPU time and wall time\n"
    f"{'model':31s} {'pool':5s} {'map':10s} {'params':>10s}  {'infer CPU ms':22s}  {'infer wall ms':22s}  "
    f"{'train CPU ms':22s}  {'train wall ms':22s}\n" + '\n'.join(lines) + '\n')
PY
)
python -c "$cputime" full 1 4 3 1 "$out/covpool448_full_cpu"
python -c "$cputime" heads 1 4 7 3 "$out/covpool448_heads_cpu"
