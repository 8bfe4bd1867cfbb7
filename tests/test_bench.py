"""`timm-gsop bench` runs and reports what it promises (a tiny configuration; not a benchmark)."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from timm_gsop.bench import _peak_tensor_bytes, covariance_mxm, isqrt_triu_per_sample, parse_model_spec
from timm_gsop_cli import main
from timm_gsop.layers import covariance_pool, isqrt, triu_vectorize

BACKBONE = 'gsop_resnet50:gsop_stages=(0,0,0,0)'


def test_parse_model_spec():
    assert parse_model_spec('gsop_resnet50') == ('gsop_resnet50', {})
    assert parse_model_spec(BACKBONE) == ('gsop_resnet50', {'gsop_stages': (0, 0, 0, 0)})
    assert parse_model_spec('gsop2_resnet50:gsop_manner=position:isqrt_iters=5') == (
        'gsop2_resnet50', {'gsop_manner': 'position', 'isqrt_iters': 5})
    with pytest.raises(ValueError, match='key=value'):
        parse_model_spec('gsop_resnet50:oops')


def test_reference_formulations_compute_the_same_maths():
    x = torch.rand(2, 8, 5, 6)
    torch.testing.assert_close(covariance_mxm(x), covariance_pool(x), rtol=1e-5, atol=1e-6)
    a = torch.randn(2, 6, 30)
    spd = a @ a.transpose(1, 2) / 30
    torch.testing.assert_close(isqrt_triu_per_sample(spd, 3), triu_vectorize(isqrt(spd, 3)), rtol=1e-5, atol=1e-6)


def test_bench_cli_tiny_json(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv('MALLOC_TRIM_THRESHOLD_', '2147483647')  # read, not applied: glibc reads it at start-up
    out = tmp_path / 'bench.json'
    rc = main(['bench', '--model', 'gsop_resnet50', BACKBONE, '--baseline', BACKBONE, '--batch-size', '2',
               '--img-size', '32', '--repeats', '2', '--steps', '1', '--warmup', '1', '--json', str(out)])
    assert rc == 0
    captured = capsys.readouterr()
    assert 'gsop_resnet50' in captured.out and 'train ratio' in captured.out
    assert '[bench] batch 2: repeat 2/2' in captured.err  # progress is visible
    payload = json.loads(out.read_text())
    assert set(payload) == {'meta', 'models', 'ops'}
    assert {'torch', 'timm', 'threads', 'command', 'malloc_env'} <= set(payload['meta'])
    # the allocator settings the timings were taken under
    assert payload['meta']['malloc_env'] == {'MALLOC_TRIM_THRESHOLD_': '2147483647'}
    assert 'MALLOC_TRIM_THRESHOLD_=2147483647' in captured.out
    rows = {r['model']: r for r in payload['models']}
    assert set(rows) == {'gsop_resnet50', BACKBONE}
    for row in rows.values():
        assert {'batch_size', 'img_size', 'device', 'params', 'gflops', 'infer_img_s', 'train_img_s',
                'infer_ratio', 'train_ratio', 'peak_train_mem_mb', 'channels_last', 'compile', 'amp'} <= set(row)
        for key in ('infer_img_s', 'train_img_s', 'infer_ratio', 'train_ratio'):
            assert set(row[key]) == {'median', 'min', 'max'}
            assert 0 < row[key]['min'] <= row[key]['median'] <= row[key]['max']
    assert rows[BACKBONE]['train_ratio']['median'] == 1.0
    assert rows['gsop_resnet50']['params'] == 28_285_224 and rows[BACKBONE]['params'] == 25_557_032
    # the GSoP modules' activations on top of the same backbone's
    assert 0 < rows[BACKBONE]['peak_train_mem_mb'] < rows['gsop_resnet50']['peak_train_mem_mb']


def test_bench_rejects_unknown_model(capsys):
    assert main(['bench', '--model', 'no_such_model', '--batch-size', '1', '--img-size', '32', '--repeats', '1']) == 2
    assert "unknown model 'no_such_model'" in capsys.readouterr().err


def test_peak_memory_is_live_tensor_bytes_above_the_start():
    """A steady-state step that frees last step's 16 MiB buffer, makes three 32 MiB temporaries one after the
    other and keeps a new 16 MiB buffer holds at most 16 MiB more than before it, whatever the C library does with
    freed memory (missing the free of last step's buffer would give 32 MiB, summing allocations 112 MiB)."""
    mib = 1 << 20
    held = [torch.ones(16 * mib, dtype=torch.uint8)]

    def step():
        held[0] = None
        for _ in range(3):
            torch.ones(32 * mib, dtype=torch.uint8)
        held[0] = torch.ones(16 * mib, dtype=torch.uint8)
    assert _peak_tensor_bytes(step, warmup=step) == 16 * mib


def _page_faults_of_steps(env: dict) -> int:
    code = (
        'import resource, torch\n'
        'def step():  # a train step: activations made one after the other, all freed at its end\n'
        '    blocks = [torch.empty(48 << 20, dtype=torch.uint8).fill_(1) for _ in range(4)]\n'
        'for _ in range(6): step()\n'
        'before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n'
        'for _ in range(3): step()\n'
        'print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n')
    # glibc reads its MALLOC_* settings at start-up: a fresh process
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300,
                          env=dict({k: v for k, v in os.environ.items() if not k.startswith('MALLOC_')}, **env))
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc malloc')
def test_cpu_script_keeps_freed_memory_so_steps_do_not_page_fault():
    """benchmarks/cpu.sh's glibc settings do what its comment says they are for."""
    script = open(os.path.join(os.path.dirname(__file__), '..', 'benchmarks', 'cpu.sh')).read()
    settings = dict(re.findall(r'\b(MALLOC_\w+_)=(\d+)', re.search(r'^export (MALLOC_.*)$', script, re.M)[1]))
    assert settings == {'MALLOC_MMAP_MAX_': '0', 'MALLOC_TRIM_THRESHOLD_': '2147483647'}
    system, retained = _page_faults_of_steps({}), _page_faults_of_steps(settings)
    # glibc's defaults map each 48 MiB block afresh: 3 steps x 4 blocks x 12,288 faults of 4 KiB; retained memory
    # is reused once the heap has grown to a step's size
    assert system > 100_000 and retained < system / 2, (system, retained)
