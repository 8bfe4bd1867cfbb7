"""Side-by-side speed and train-step memory of timm models against a baseline (a script, not part of the package;
benchmarks/README.md says what each number means). From the repository root, in the venv:
    python benchmarks/compare.py gsop_resnet50 --baseline 'gsop_resnet50:gsop_stages=(0,0,0,0)' -b 8 --threads 2
A spec is NAME or NAME:key=value:... (values as timm train.py's --model-kwargs). torch.utils.benchmark's Timer
times each spec's inference (no grad) and train step (forward, cross-entropy, backward, SGD step), the specs
interleaved in one process (A, B, A, B, ... per repeat); a ratio is a time over the baseline's in the same repeat.
--repeats rounds of Timer.timeit(--number) per spec and task, after --warmup calls; --memory: a train step's peak
memory, a fresh process per spec; --ops: this package's second-order ops against the released formulations
(tests/official_reference.py, the test oracle).
"""
import argparse, ctypes, gc, json, os, resource, statistics, subprocess, sys, time  # noqa: E401

import torch
import torch.nn.functional as F
from torch.utils.benchmark import Compare, Timer

import timm
from timm.utils import ParseKwargs
from timm_gsop.layers import covariance_pool, isqrt, triu_vectorize  # also registers the models
from timm_gsop.zoo import count_gflops, format_table

sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, 'tests'))
from official_reference import released_channel_covariance, released_sqrtm, released_triu_vector  # noqa: E402

AMP = {'bf16': torch.bfloat16, 'fp16': torch.float16}


def parse_spec(spec):
    name, *pairs = spec.split(':')
    ParseKwargs(option_strings=[], dest='kwargs')(None, namespace := argparse.Namespace(), pairs)
    return name, namespace.kwargs


def setup(spec, args):
    """Inference and train-step closures of the spec's model on one fixed random batch."""
    name, kwargs = parse_spec(spec)
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs).to(args.device)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=args.device)
    y = torch.randint(0, model.num_classes, (args.batch_size,), device=args.device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    scaler = torch.amp.GradScaler(args.device, enabled=args.amp == 'fp16')
    amp = dict(device_type=args.device, dtype=AMP.get(args.amp, torch.bfloat16), enabled=bool(args.amp))
    net = torch.compile(model) if args.compile else model

    def infer():
        with torch.no_grad(), torch.autocast(**amp):
            net.eval()(x)

    def train():
        with torch.autocast(**amp):
            loss = F.cross_entropy(net.train()(x), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    return {'infer': infer, 'train': train}


def span(values, fmt='{:.3f}'):
    return f'{fmt.format(statistics.median(values))} [{fmt.format(min(values))}, {fmt.format(max(values))}]'


def interleaved(fns, rows, tasks, base, args, label):
    """Time fns[row][task] for each repeat, task and row in turn; print torch's Compare and the ratios to base."""
    found, times, clock = [], {}, {'timer': time.process_time} if args.timer == 'process' else {}
    for _ in range(args.repeats):
        for task in tasks:
            for row in rows:
                found.append(Timer('fn()', globals={'fn': fns[row][task]}, label=label, sub_label=row, description=task,
                                   num_threads=args.threads, **clock).timeit(args.number))
                times.setdefault((task, row), []).append(found[-1].mean * 1e3)
    Compare(found).print()
    print(f'{args.timer} time per call in ms and its ratio to {base} in the same repeat, median [min, max] over '
          f'{args.repeats} interleaved repeats of {args.number} call(s)\n' + format_table(['', '', 'ms', 'ratio'], [
              [task, row, span(times[task, row], '{:.1f}'), span([a / b for a, b in zip(times[task, row],
                                                                                      times[task, base])])]
              for task in tasks for row in rows]))


def step_memory(spec, args):
    """Per repeat: (a train step's peak memory above the memory held before it, that memory) in MiB."""
    train, found = setup(spec, args)['train'], []
    for _ in range(max(args.warmup, 1)):
        train()
    for _ in range(args.repeats):
        gc.collect()
        if args.device == 'cuda':
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            train()
            peak = torch.cuda.max_memory_allocated()
        else:  # Linux: the process's resident set (RSS), its peak during the step above what it was right before
            ctypes.CDLL(None).malloc_trim(0)  # glibc: return freed pages, so that the step's re-use of them counts
            before = int(open('/proc/self/statm').read().split()[1]) * resource.getpagesize()
            with open('/proc/self/clear_refs', 'w') as f:
                f.write('5')  # reset the peak RSS (VmHWM) to the current RSS
            train()
            # not ru_maxrss: a child's is at least its parent's RSS when it forked
            peak = int(next(line for line in open('/proc/self/status') if line.startswith('VmHWM')).split()[1]) * 1024
        found.append(((peak - before) / 2**20, before / 2**20))
    return found


def ops(args):
    """This package's ops against the released formulations, forward + backward, float32, interleaved."""
    g, b = torch.Generator().manual_seed(0), args.ops_batch
    feats = lambda *shape: torch.randn(*shape, generator=g).relu().to(args.device)
    cases = {f'covariance ({b}, 128, {s}, {s})': (covariance_pool, released_channel_covariance, feats(b, 128, s, s))
             for s in (28, 14)}
    cases[f'isqrt 5 + triangle ({b}, 256, 256)'] = (lambda a: triu_vectorize(isqrt(a, 5)),
                                                    lambda a: released_triu_vector(released_sqrtm(a, 5)),
                                                    covariance_pool(feats(b, 256, 14, 14)))
    fns = {'package': {}, 'released': {}}
    for case, (ours, released, x) in cases.items():
        torch.testing.assert_close(ours(x), released(x), rtol=1e-4, atol=1e-5)  # the same maths
        for row, fn in (('package', ours), ('released', released)):
            fns[row][case] = lambda fn=fn, x=x.detach().requires_grad_(): fn(x).sum().backward()
    interleaved(fns, list(fns), list(cases), 'released', args, f'ops, forward + backward, {args.device}')


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('specs', nargs='*', help='models, NAME or NAME:key=value:...')
    p.add_argument('--baseline', help='the spec the ratios divide by (default: the last spec)')
    for flags, default in ((('-b', '--batch-size'), 8), (('--img-size',), 224), (('--repeats',), 5),
                           (('--threads',), torch.get_num_threads()), (('--number',), 1), (('--warmup',), 1),
                           (('--ops-batch',), 8)):
        p.add_argument(*flags, type=int, default=default, help=f'default {default}')
    p.add_argument('--tasks', nargs='*', choices=('infer', 'train'), default=['infer', 'train'])
    p.add_argument('--timer', choices=('wall', 'process'), default='wall', help="process: the process's CPU time")
    p.add_argument('--device', default='cpu', choices=('cpu', 'cuda'))
    p.add_argument('--amp', choices=tuple(AMP), help='autocast to this dtype (fp16 with a GradScaler)')
    for flag in ('--compile', '--memory', '--ops'):
        p.add_argument(flag, action='store_true')
    p.add_argument('--memory-child', help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_child:
        return print(json.dumps(step_memory(args.memory_child, args)))
    cpu = [line.split(':', 1)[1].strip() for line in open('/proc/cpuinfo') if line.startswith('model name')][:1]
    where = torch.cuda.get_device_name() if args.device == 'cuda' else (cpu or ['cpu'])[0]
    print(f'torch {torch.__version__}, timm {timm.__version__}, {where}, {os.cpu_count()} cores, {args.threads} '
          f"threads, load average {os.getloadavg()[0]:.1f}\n$ compare.py {' '.join(argv or sys.argv[1:])}\n")
    if args.ops:
        ops(args)
    specs = list(dict.fromkeys(args.specs + [args.baseline] * bool(args.baseline)))
    base, counts = args.baseline or (specs or [None])[-1], {}
    mode = f"{args.device}, {'compiled' if args.compile else 'eager'}{', ' + args.amp if args.amp else ''}, batch " \
           f'{args.batch_size}, {args.img_size} px'
    for s in specs:  # parameters and GFLOPs of one image's forward, counted on the meta device
        model = timm.create_model(parse_spec(s)[0], device='meta', **parse_spec(s)[1])
        counts[s] = sum(p.numel() for p in model.parameters()), count_gflops(model, (3, args.img_size, args.img_size))
    if specs:
        print(format_table(['', 'params', 'GFLOPs per image', 'ratio'], [
            [s, f'{n:,}', f'{f:.2f}', f'{f / counts[base][1]:.3f}'] for s, (n, f) in counts.items()]) + '\n' * 2)
    if specs and args.tasks:
        fns = {s: setup(s, args) for s in specs}
        for task, _, s in ((t, i, s) for t in args.tasks for i in range(args.warmup) for s in specs):
            fns[s][task]()
        interleaved(fns, specs, args.tasks, base, args, mode)
    if specs and args.memory:
        child = [sys.executable, os.path.abspath(__file__), *(argv or sys.argv[1:]), '--memory-child']
        mem = {s: json.loads(subprocess.run(child + [s], capture_output=True, text=True, check=True).stdout.strip(
            ).splitlines()[-1]) for s in specs}
        steps = {s: [step for step, _ in found] for s, found in mem.items()}
        print(f'\npeak MiB of a train step ({mode}) above the MiB held before it, a fresh process per spec, median '
              f'[min, max] over {args.repeats} steps after {max(args.warmup, 1)} warm-up step(s)\n' + format_table(
                  ['', 'held', 'step', 'step / baseline median'], [[s, f'{mem[s][0][1]:.0f}', span(v, '{:.0f}'), span(
                      [m / statistics.median(steps[base]) for m in v])] for s, v in steps.items()]))
    print(f'\nload average at the end {os.getloadavg()[0]:.1f}')


if __name__ == '__main__':
    main()
