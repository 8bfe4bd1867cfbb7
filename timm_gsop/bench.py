"""Side-by-side benchmarks (``timm-gsop bench``).

All models of one run live in ONE process and are timed interleaved (model A, model B, model A, ...
after a warm-up), so a ratio against ``--baseline`` compares runs made under the same machine state.
Reported per model and batch size: inference and train-step (forward + backward + SGD step) images/s
as median [min, max] over repeats, the median of the per-repeat ratios against the baseline, the peak tensor
memory of a train step, params and GFLOPs. ``--ops`` adds the op-level comparisons against the released code's
formulations (MxM centring covariance, per-sample iSQRT / triangle loops).
"""
import argparse
import statistics
import time
from contextlib import nullcontext
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import timm

from .zoo import count_gflops, count_params, format_table
from .layers import second_order

__all__ = ['AMP_DTYPES', 'parse_model_spec', 'bench_models', 'bench_ops', 'check_amp_training', 'format_results']


def parse_model_spec(spec: str) -> Tuple[str, Dict[str, Any]]:
    """``'name'`` or ``'name:key=value:key=value'`` (values parsed as timm train.py's ``--model-kwargs``:
    Python literals, else strings) -> (name, kwargs).

    e.g. ``gsop_resnet50:gsop_stages=(0,0,0,0)`` is GSoP-Net1's stride-1 backbone without GSoP blocks.
    """
    from timm.utils import ParseKwargs
    name, *items = spec.split(':')
    for item in items:
        if '=' not in item or not item.split('=', 1)[0]:
            raise ValueError(f'model spec {spec!r}: {item!r} is not key=value')
    namespace = argparse.Namespace()
    ParseKwargs(option_strings=[], dest='kwargs')(None, namespace, items)
    return name, namespace.kwargs


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _peak_tensor_bytes(fn: Callable[[], None], warmup: Callable[[], None]) -> int:
    """Peak bytes of CPU tensor memory held during ``fn()`` above what was held before it, ``warmup()`` run first:
    the running sum of the allocations and frees torch's profiler records (what ``torch.cuda.max_memory_allocated``
    gives on CUDA), independent of how the C library's allocator keeps freed memory. ``warmup`` runs under the
    profiler too: it records no size for the free of a block allocated before it started (last step's gradients)."""
    from torch.profiler import ProfilerActivity, profile, record_function
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        warmup()
        with record_function('measured'):
            fn()
    # the raw allocation (+) and free (-) records: prof.events() folds allocations into the ops that made them
    events = prof.profiler.kineto_results.events()
    start = next(e.start_ns() for e in events if e.name() == 'measured')
    records = [e for e in events if e.name() == '[memory]' and e.start_ns() >= start]
    live = peak = 0
    for e in sorted(records, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


class _Runner:
    def __init__(self, spec: str, batch: int, img_size: int, device: torch.device, channels_last: bool,
                 compile_model: bool, amp_dtype: Optional[torch.dtype]):
        self.spec = spec
        name, kwargs = parse_model_spec(spec)
        self.model = timm.create_model(name, **kwargs).to(device)
        self.params = count_params(self.model)
        in_chans = self.model.pretrained_cfg.get('input_size', (3,))[0]
        meta = timm.create_model(name, device='meta', **kwargs)
        self.gflops = count_gflops(meta, (in_chans, img_size, img_size))
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = self.model.to(memory_format=memory_format)
        self.x = torch.randn(batch, in_chans, img_size, img_size, device=device).to(memory_format=memory_format)
        self.target = torch.randint(0, self.model.num_classes, (batch,), device=device)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-4, momentum=0.9)
        self.fn = torch.compile(self.model) if compile_model else self.model
        self.device = device
        self.batch = batch
        self.autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else nullcontext

    def infer(self) -> None:
        self.fn.eval()
        with torch.inference_mode(), self.autocast():
            self.fn(self.x)

    def train_step(self) -> None:
        self.fn.train()
        with self.autocast():
            loss = nn.functional.cross_entropy(self.fn(self.x).float(), self.target)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def time(self, fn: Callable[[], None], steps: int) -> float:
        _sync(self.device)
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        _sync(self.device)
        return self.batch * steps / (time.perf_counter() - start)

    def peak_train_memory(self) -> int:
        """Peak memory of one train step above what was held before it (bytes); call it after a first step (the
        gradients, the optimizer state and any compiled code exist)."""
        if self.device.type == 'cuda':
            _sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
            self.train_step()
            _sync(self.device)
            return torch.cuda.max_memory_allocated(self.device) - before
        return _peak_tensor_bytes(self.train_step, warmup=self.train_step)


def _summary(values: Sequence[float]) -> Dict[str, float]:
    return {'median': statistics.median(values), 'min': min(values), 'max': max(values)}


def bench_models(
        specs: Sequence[str],
        baseline: Optional[str] = None,
        batch_sizes: Sequence[int] = (8,),
        img_size: int = 224,
        modes: Sequence[str] = ('infer', 'train'),
        warmup: int = 2,
        steps: int = 3,
        repeats: int = 5,
        device: str = 'cpu',
        channels_last: bool = False,
        compile_model: bool = False,
        amp_dtype: Optional[torch.dtype] = None,
        memory: bool = True,
        progress: Optional[Callable[[str], None]] = None,
) -> List[Dict[str, Any]]:
    """Time ``specs`` interleaved; one result dict per (model, batch size)."""
    specs = list(dict.fromkeys(list(specs) + ([baseline] if baseline else [])))
    for mode in modes:
        if mode not in ('infer', 'train'):
            raise ValueError(f"Unknown bench mode {mode!r}; valid choices: 'infer', 'train'")
    dev = torch.device(device)
    progress = progress or (lambda msg: None)
    results = []
    for batch in batch_sizes:
        runners = [_Runner(s, batch, img_size, dev, channels_last, compile_model, amp_dtype) for s in specs]
        ips: Dict[Tuple[str, str], List[float]] = {(r.spec, m): [] for r in runners for m in modes}
        for mode in modes:
            for r in runners:
                progress(f'batch {batch}: warm-up {mode} {r.spec}')
                for _ in range(warmup):
                    getattr(r, 'infer' if mode == 'infer' else 'train_step')()
        for rep in range(repeats):
            for mode in modes:
                for r in runners:  # interleaved: every model once per repeat, same conditions
                    progress(f'batch {batch}: repeat {rep + 1}/{repeats} {mode} {r.spec}')
                    fn = r.infer if mode == 'infer' else r.train_step
                    ips[(r.spec, mode)].append(r.time(fn, steps))
        for r in runners:
            row: Dict[str, Any] = {
                'model': r.spec, 'batch_size': batch, 'img_size': img_size, 'device': device,
                'channels_last': channels_last, 'compile': compile_model,
                'amp': str(amp_dtype).replace('torch.', '') if amp_dtype else None,
                'params': r.params, 'gflops': r.gflops,
            }
            for mode in modes:
                row[f'{mode}_img_s'] = _summary(ips[(r.spec, mode)])
                if baseline:
                    ratios = [a / b for a, b in zip(ips[(r.spec, mode)], ips[(baseline, mode)])]
                    row[f'{mode}_ratio'] = _summary(ratios)
            results.append(row)
        del runners
    if memory and 'train' in modes:
        rows = iter(results)
        for batch in batch_sizes:
            for s in specs:
                progress(f'batch {batch}: peak memory {s}')
                r = _Runner(s, batch, img_size, dev, channels_last, compile_model, amp_dtype)
                r.train_step()  # optimizer state and compiled code exist before the measured step
                next(rows)['peak_train_mem_mb'] = _mb(r.peak_train_memory())
    return results


def _mb(value: Optional[int]) -> Optional[float]:
    return None if value is None else value / 2 ** 20


# ---- mixed-precision training check ------------------------------------------------------------------------

def check_amp_training(
        spec: str,
        amp_dtype: torch.dtype,
        device: str = 'cuda',
        steps: int = 50,
        batch_size: int = 32,
        img_size: int = 224,
        channels_last: bool = True,
        blank_every: int = 10,
) -> Dict[str, Any]:
    """``steps`` SGD steps under autocast (a GradScaler for float16), random batches with an all-zero one every
    ``blank_every`` steps; returns the steps with a non-finite loss, output or gradient, the final loss, and the
    dtypes the GSoP gates saw (covariances and gates must stay float32)."""
    from .layers.gsop import CovarianceGate
    name, kwargs = parse_model_spec(spec)
    torch.manual_seed(0)
    dev = torch.device(device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = timm.create_model(name, **kwargs).to(dev).to(memory_format=memory_format).train()
    gate_dtypes = set()
    for m in model.modules():
        if isinstance(m, CovarianceGate):
            m.register_forward_hook(lambda mod, i, o: gate_dtypes.add(f'{i[0].dtype}->{o.dtype}'.replace('torch.', '')))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler(dev.type, enabled=amp_dtype == torch.float16)
    in_chans = model.pretrained_cfg.get('input_size', (3,))[0]
    bad, loss = [], torch.zeros(())
    for step in range(steps):
        x = torch.randn(batch_size, in_chans, img_size, img_size, device=dev).to(memory_format=memory_format)
        if blank_every and step % blank_every == blank_every - 1:
            x.zero_()
        y = torch.randint(0, model.num_classes, (batch_size,), device=dev)
        with torch.autocast(dev.type, dtype=amp_dtype):
            logits = model(x)
            loss = nn.functional.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        # with a GradScaler an overflowing step is skipped by design: count steps whose loss or output is
        # non-finite, and gradients only where the scaler did not skip
        grads_finite = all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        skipped = amp_dtype == torch.float16 and not grads_finite
        if not (torch.isfinite(loss) and torch.isfinite(logits).all()) or (not grads_finite and not skipped):
            bad.append(step)
        scaler.step(opt)
        scaler.update()
    return dict(model=spec, amp=str(amp_dtype).replace('torch.', ''), steps=steps, nonfinite_steps=bad,
                final_loss=loss.item(), gate_dtypes=sorted(gate_dtypes))


# ---- op-level comparisons with the released formulations ---------------------------------------------------

def covariance_mxm(x: torch.Tensor) -> torch.Tensor:
    """The released code's covariance: X I_hat X^T with an (M, M) centring matrix per sample."""
    b, c, h, w = x.shape
    m = h * w
    x = x.reshape(b, c, m)
    i_hat = (-1.0 / m / m) * torch.ones(m, m, device=x.device) + (1.0 / m) * torch.eye(m, device=x.device)
    i_hat = i_hat.view(1, m, m).repeat(b, 1, 1).type(x.dtype)
    return x.bmm(i_hat).bmm(x.transpose(1, 2))


def isqrt_triu_per_sample(x: torch.Tensor, num_iters: int) -> torch.Tensor:
    """The same maths as ``triu_vectorize(isqrt(x))``, one sample at a time (released code's loops)."""
    rows = []
    n = x.shape[-1]
    index = torch.ones(n, n).triu().t().reshape(-1).nonzero().squeeze(1)
    for a in x:
        eye3 = 3.0 * torch.eye(n, dtype=a.dtype)
        trace = a.trace()
        a_n = a / trace
        zy = 0.5 * (eye3 - a_n)
        y, z = a_n @ zy, zy
        for _ in range(num_iters - 2):
            zy = 0.5 * (eye3 - z @ y)
            y, z = y @ zy, zy @ z
        y = 0.5 * y @ (eye3 - z @ y)
        rows.append((y * trace.sqrt()).reshape(-1)[index])
    return torch.stack(rows)


def _time_fwd_bwd(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, steps: int) -> float:
    x = x.detach().requires_grad_()
    start = time.perf_counter()
    for _ in range(steps):
        fn(x).sum().backward()
        x.grad = None
    return (time.perf_counter() - start) / steps


def bench_ops(repeats: int = 5, steps: int = 3) -> List[Dict[str, Any]]:
    """Ours vs the released formulations, forward + backward, interleaved; milliseconds per call."""
    gen = torch.Generator().manual_seed(0)
    feats = torch.relu(torch.randn(8, 128, 28, 28, generator=gen))
    a = torch.randn(8, 256, 400, generator=gen)
    spd = a @ a.transpose(1, 2) / 400
    cases = [
        ('covariance (8,128,28,28)', second_order.covariance_pool, covariance_mxm, feats),
        ('isqrt+triu (8,256,256), 3 iters',
         lambda t: second_order.triu_vectorize(second_order.isqrt(t, 3)),
         lambda t: isqrt_triu_per_sample(t, 3), spd),
    ]
    rows = []
    for label, ours, reference, x in cases:
        torch.testing.assert_close(ours(x), reference(x).float(), rtol=1e-3, atol=1e-4)  # same maths
        for fn in (ours, reference):
            _time_fwd_bwd(fn, x, 1)
        t_ours, t_ref = [], []
        for _ in range(repeats):
            t_ours.append(_time_fwd_bwd(ours, x, steps))
            t_ref.append(_time_fwd_bwd(reference, x, steps))
        rows.append({
            'op': label, 'ours_ms': _summary([t * 1e3 for t in t_ours]),
            'reference_ms': _summary([t * 1e3 for t in t_ref]),
            'speedup': _summary([r / o for o, r in zip(t_ours, t_ref)]),
        })
    return rows


# ---- command line ----------------------------------------------------------------------------------------

def _fmt(s: Dict[str, float], digits: int = 1) -> str:
    return f'{s["median"]:.{digits}f} [{s["min"]:.{digits}f}, {s["max"]:.{digits}f}]'


def format_results(results: List[Dict[str, Any]], ops: Optional[List[Dict[str, Any]]] = None) -> str:
    modes = [m for m in ('infer', 'train') if results and f'{m}_img_s' in results[0]]
    ratio = results and any(f'{m}_ratio' in results[0] for m in modes)
    header = ['model', 'batch', 'params', 'GFLOPs']
    for m in modes:
        header += [f'{m} img/s', f'{m} ratio'] if ratio else [f'{m} img/s']
    header.append('train peak MB')
    rows = []
    for r in results:
        row = [r['model'], str(r['batch_size']), f'{r["params"]:,}', f'{r["gflops"]:.2f}']
        for m in modes:
            row.append(_fmt(r[f'{m}_img_s']))
            if ratio:
                row.append(_fmt(r[f'{m}_ratio'], 3))
        mem = r.get('peak_train_mem_mb')
        row.append('-' if mem is None else f'{mem:.0f}')
        rows.append(row)
    text = format_table(header, rows)
    if ops:
        op_rows = [[o['op'], _fmt(o['ours_ms'], 2), _fmt(o['reference_ms'], 2), _fmt(o['speedup'], 2)] for o in ops]
        text += '\n\n' + format_table(['op (fwd+bwd)', 'ours ms', 'released-style ms', 'speedup'], op_rows)
    return text


AMP_DTYPES = {'bf16': torch.bfloat16, 'bfloat16': torch.bfloat16, 'fp16': torch.float16, 'float16': torch.float16}
