"""`timm-gsop bench` runs and reports what it promises (a tiny configuration; not a benchmark)."""
import json
import subprocess
import sys

import pytest

from timm_gsop.bench import covariance_mxm, isqrt_triu_per_sample, parse_model_spec
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
    import torch
    x = torch.rand(2, 8, 5, 6)
    torch.testing.assert_close(covariance_mxm(x), covariance_pool(x), rtol=1e-5, atol=1e-6)
    a = torch.randn(2, 6, 30)
    spd = a @ a.transpose(1, 2) / 30
    torch.testing.assert_close(isqrt_triu_per_sample(spd, 3), triu_vectorize(isqrt(spd, 3)), rtol=1e-5, atol=1e-6)


def test_bench_cli_tiny_json(tmp_path, capsys):
    out = tmp_path / 'bench.json'
    rc = main(['bench', '--model', 'gsop_resnet50', BACKBONE, '--baseline', BACKBONE, '--batch-size', '2',
               '--img-size', '32', '--repeats', '2', '--steps', '1', '--warmup', '1', '--json', str(out),
               '--malloc', 'system'])  # 'retain' would change this test process's allocator for later tests
    assert rc == 0
    captured = capsys.readouterr()
    assert 'gsop_resnet50' in captured.out and 'train ratio' in captured.out
    assert '[bench] batch 2: repeat 2/2' in captured.err  # progress is visible
    payload = json.loads(out.read_text())
    assert set(payload) == {'meta', 'models', 'ops'}
    assert {'torch', 'timm', 'threads', 'command', 'malloc'} <= set(payload['meta'])
    assert payload['meta']['malloc'] == 'system' and 'malloc system' in captured.out
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


def test_bench_rejects_unknown_model(capsys):
    assert main(['bench', '--model', 'no_such_model', '--batch-size', '1', '--img-size', '32', '--repeats', '1']) == 2
    assert "unknown model 'no_such_model'" in capsys.readouterr().err


def _page_faults_of_big_allocations(retain: bool) -> int:
    code = (
        'import resource, torch\n'
        'from timm_gsop.bench import retain_freed_memory\n'
        f'assert retain_freed_memory() if {retain} else True\n'
        'for _ in range(2): torch.empty(64 << 20, dtype=torch.uint8).fill_(1)\n'
        'before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n'
        'for _ in range(5): torch.empty(64 << 20, dtype=torch.uint8).fill_(1)\n'
        'print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n')
    # in a fresh process: it changes the allocator for the rest of the process
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc mallopt')
def testretain_freed_memory_stops_page_faults_between_steps():
    system, retained = _page_faults_of_big_allocations(False), _page_faults_of_big_allocations(True)
    # glibc maps every 64 MiB block afresh (~16k faults of 4 KiB each); retained memory is reused
    assert system > 3 * 16384 and retained < system / 2, (system, retained)
