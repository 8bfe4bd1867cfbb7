"""`timm-gsop run SCRIPT [ARGS]`: timm's scripts (train.py, validate.py, ...) run with the models registered.

The scripts themselves live in the timm repository (not in the wheel, no network in CI): these tests use
small scripts written into tmp_path that call timm the way those scripts do.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import timm
from timm.models import save_for_hf

from timm_gsop_cli import main
from timm_gsop.recipes import recipe_path
from timm_gsop.run import run_script
from conftest import write_image_folder

TINY = dict(channels=(8, 16, 32, 64), stem_width=8, gsop_dim=8, num_classes=3)

ECHO = textwrap.dedent('''
    import json, sys
    with open(sys.argv[1], 'w') as f:
        json.dump(dict(argv=sys.argv, name=__name__, path0=sys.path[0]), f)
    code = sys.argv[2] if len(sys.argv) > 2 else 'none'
    if code == 'str':
        sys.exit('fatal: message')
    if code == 'raise':
        raise ValueError('boom')
    if code != 'none':
        sys.exit(int(code))
''')


@pytest.fixture()
def echo_script(tmp_path):
    script = tmp_path / 'scripts' / 'echo.py'
    script.parent.mkdir()
    script.write_text(ECHO)
    return script


def _read(path):
    with open(path) as f:
        return json.load(f)


@pytest.mark.parametrize('extra', [
    [],
    ['--model', 'gsop_resnet50', '--model-kwargs', 'gsop_manner=fusion_avg', 'gsop_dim=64'],
    ['-h'],  # reaches the script, not timm-gsop
    ['--', '--help', '--import', 'x'],  # '--' and our own option names pass through too
])
def test_arguments_reach_the_script_untouched(echo_script, tmp_path, extra):
    out = tmp_path / 'out.json'
    argv_before, path_before = sys.argv[:], sys.path[:]
    assert main(['run', str(echo_script), str(out), 'none', *extra]) == 0
    seen = _read(out)
    assert seen['argv'] == [str(echo_script), str(out), 'none', *extra]
    assert seen['name'] == '__main__'
    assert seen['path0'] == str(echo_script.parent)  # as `python script.py`: the script's folder first
    assert sys.argv == argv_before and sys.path == path_before


@pytest.mark.parametrize('code, expected', [('0', 0), ('3', 3), ('none', 0), ('str', 1)])
def test_exit_code_is_the_scripts(echo_script, tmp_path, code, expected, capsys):
    assert main(['run', str(echo_script), str(tmp_path / 'o.json'), code]) == expected
    if code == 'str':
        assert 'fatal: message' in capsys.readouterr().err


def test_exceptions_propagate_like_python_does(echo_script, tmp_path):
    with pytest.raises(ValueError, match='boom'):
        run_script(str(echo_script), [str(tmp_path / 'o.json'), 'raise'])


def test_separator_before_script_and_extra_imports(echo_script, tmp_path):
    out = tmp_path / 'o.json'
    assert main(['run', '--import', 'json', '--', str(echo_script), str(out)]) == 0
    assert _read(out)['argv'] == [str(echo_script), str(out)]
    with pytest.raises(ModuleNotFoundError):
        main(['run', '--import', 'no_such_module_xyz', str(echo_script), str(out)])


def test_missing_script(capsys, tmp_path):
    assert main(['run', str(tmp_path / 'nope.py')]) == 2
    assert 'no such script' in capsys.readouterr().err
    assert main(['run']) == 2
    assert 'missing SCRIPT' in capsys.readouterr().err


def _fake_hub_cache(cache_dir, repo_id, folder):
    """The Hugging Face cache layout of a downloaded repo: what an offline `hf-hub:` load reads."""
    commit = 'a' * 40
    repo = cache_dir / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / 'snapshots' / commit
    snapshot.mkdir(parents=True)
    for name in os.listdir(folder):
        (snapshot / name).write_bytes((folder / name).read_bytes())
    (repo / 'refs').mkdir()
    (repo / 'refs' / 'main').write_text(commit)


SCRIPT = textwrap.dedent('''
    # stands for timm's validate.py / inference.py: it imports timm only, never timm_gsop
    import sys
    import torch, timm
    assert 'timm_gsop' not in sys.modules or sys.argv[1] == 'registered'
    x = torch.load(sys.argv[2])
    out = {}
    for name in sys.argv[3:]:
        kwargs = dict(pretrained=True) if ':' in name else dict(channels=(8, 16, 32, 64), stem_width=8, gsop_dim=8,
                                                                num_classes=3)
        model = timm.create_model(name, **kwargs).eval()
        with torch.no_grad():
            out[name] = model(x)
    torch.save(out, sys.argv[2] + '.out')
''')


def test_plugin_import_makes_gsop_names_resolve_in_a_timm_script(tmp_path):
    """In a fresh interpreter, a script that only imports timm creates GSoP models (registry name,
    `local-dir:` and offline `hf-hub:` sources) when launched with `python -m timm_gsop run`, and fails
    without it."""
    torch.manual_seed(0)
    model = timm.create_model('gsop_resnet50', **TINY).eval()
    export = tmp_path / 'export'
    save_for_hf(model, export, safe_serialization=True)
    cache = tmp_path / 'hf_cache'
    _fake_hub_cache(cache, 'someone/gsop_resnet50.tiny', export)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    torch.save(x, tmp_path / 'x.pt')
    script = tmp_path / 'fake_validate.py'
    script.write_text(SCRIPT)
    names = ['gsop_resnet50', f'local-dir:{export}', 'hf-hub:someone/gsop_resnet50.tiny']
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE='1', OMP_NUM_THREADS='1')

    run = subprocess.run(
        [sys.executable, '-m', 'timm_gsop', 'run', str(script), 'registered', str(tmp_path / 'x.pt'), *names],
        capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = torch.load(tmp_path / 'x.pt.out')
    assert out['gsop_resnet50'].shape == (2, 3)
    for name in names[1:]:  # the exported weights, through timm's own pretrained loading
        torch.testing.assert_close(out[name], expected)

    plain = subprocess.run(
        [sys.executable, str(script), 'plain', str(tmp_path / 'x.pt'), 'gsop_resnet50'],
        capture_output=True, text=True, env=env, timeout=300)
    assert plain.returncode != 0 and 'Unknown model (gsop_resnet50)' in plain.stderr


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get('TIMM_SCRIPTS'), reason='set TIMM_SCRIPTS to a folder with timm\'s train.py '
                                                              'and validate.py (a pytorch-image-models checkout)')
def test_real_train_resume_validate(tmp_path):
    """timm's own scripts, end to end: train.py with a shipped recipe (--device-modules), resume, validate.py
    through `timm-gsop run`. Opt-in: TIMM_SCRIPTS=/path/to/pytorch-image-models python -m pytest -m slow."""
    scripts = os.environ['TIMM_SCRIPTS']
    write_image_folder(tmp_path / 'data', counts=(('train', 8), ('validation', 8)), size=(40, 40))
    common = ['--model-kwargs', 'channels=(8,16,32,64)', 'stem_width=8', 'gsop_dim=8', 'gsop_manner=fusion_avg',
              '--num-classes', '2', '--img-size', '32', '-b', '4', '--device', 'cpu', '--workers', '0']
    env = dict(os.environ, OMP_NUM_THREADS='1')
    train = [sys.executable, os.path.join(scripts, 'train.py'), str(tmp_path / 'data'), '--device-modules',
             'timm_gsop', '--config', recipe_path('gsop_resnet50_in1k'), *common, '--output', str(tmp_path / 'out'),
             '--experiment', 'e']
    run = subprocess.run(train + ['--epochs', '2'], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert 'Created SGD (momentum) optimizer: lr: 0.0015625' in run.stderr + run.stdout  # 0.1 x 4 / 256
    last = tmp_path / 'out' / 'e' / 'last.pth.tar'
    run = subprocess.run(train + ['--epochs', '3', '--resume', str(last)], capture_output=True, text=True, env=env,
                         timeout=600)
    assert run.returncode == 0 and "Loaded checkpoint" in run.stderr + run.stdout, run.stderr[-3000:]
    run = subprocess.run(
        [sys.executable, '-m', 'timm_gsop', 'run', os.path.join(scripts, 'validate.py'), str(tmp_path / 'data'),
         '--split', 'validation', '--model', 'gsop_resnet50', *common,
         '--checkpoint', str(tmp_path / 'out' / 'e' / 'model_best.pth.tar')],
        capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0 and '"top1"' in run.stdout, run.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get('TIMM_SCRIPTS'), reason='set TIMM_SCRIPTS to a folder with timm\'s train.py, '
                                                              'benchmark.py and onnx_export.py')
def test_real_benchmark_onnx_export_and_warm_start(tmp_path):
    """timm's benchmark.py and onnx_export.py (TorchScript exporter, its default) through `timm-gsop run`, and
    train.py warm-starting GSoP-Net1 from a plain ResNet-50 file (--pretrained-path, nothing else)."""
    import safetensors.torch
    scripts = os.environ['TIMM_SCRIPTS']
    env = dict(os.environ, OMP_NUM_THREADS='1')
    tiny = ['channels=(8,16,32,64)', 'gsop_dim=8']
    # benchmark.py logs every num_bench_iter // 5 steps: fewer than 5 divides by zero there
    run = subprocess.run(
        [sys.executable, '-m', 'timm_gsop', 'run', os.path.join(scripts, 'benchmark.py'), '--model', 'gsop2_resnet50',
         '--model-kwargs', *tiny, '--bench', 'both', '--img-size', '64', '-b', '2', '--device', 'cpu',
         '--num-warm-iter', '1', '--num-bench-iter', '5', '--results-file', str(tmp_path / 'bench.json')],
        capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert 'infer_samples_per_sec' in (tmp_path / 'bench.json').read_text()
    # onnx_export.py asks for pretrained weights unless given --checkpoint (none are published)
    safetensors.torch.save_file(timm.create_model('gsop2_resnet50').state_dict(), str(tmp_path / 'g.safetensors'))
    run = subprocess.run(
        [sys.executable, '-m', 'timm_gsop', 'run', os.path.join(scripts, 'onnx_export.py'), str(tmp_path / 'g.onnx'),
         '--model', 'gsop2_resnet50', '--img-size', '64', '--check-forward', '--checkpoint', str(tmp_path / 'g.safetensors')],
        capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0 and (tmp_path / 'g.onnx').is_file(), run.stdout[-2000:] + run.stderr[-3000:]

    write_image_folder(tmp_path / 'data', counts=(('train', 4), ('validation', 4)), size=(40, 40))
    safetensors.torch.save_file(timm.create_model('resnet50', channels=(8, 16, 32, 64)).state_dict(),
                                str(tmp_path / 'resnet50.safetensors'))
    run = subprocess.run(
        [sys.executable, os.path.join(scripts, 'train.py'), str(tmp_path / 'data'), '--device-modules', 'timm_gsop',
         '--model', 'gsop_resnet50', '--pretrained', '--pretrained-path', str(tmp_path / 'resnet50.safetensors'),
         '--model-kwargs', *tiny, '--num-classes', '2', '--img-size', '32', '-b', '4',
         '--epochs', '1', '--device', 'cpu', '--workers', '0', '--output', str(tmp_path / 'out'), '--experiment', 'w'],
        capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert 'Warm start of gsop_resnet50' in run.stdout + run.stderr and '4 GSoP module(s)' in run.stdout + run.stderr


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get('TIMM_SCRIPTS'), reason='set TIMM_SCRIPTS to a folder with timm\'s train.py '
                                                              'and validate.py')
def test_real_finegrained_recipe_warm_start_export_validate(tmp_path):
    """The fine-grained recipe in timm's own train.py (a small ResNet backbone, 64 px instead of 448): the covariance
    head warm-started from a backbone file, then its export validated through `local-dir:`."""
    import safetensors.torch
    scripts = os.environ['TIMM_SCRIPTS']
    env = dict(os.environ, OMP_NUM_THREADS='1')
    write_image_folder(tmp_path / 'data', counts=(('train', 8), ('validation', 4)), size=(72, 80))
    backbone = ['layers=(1,1,1,1)', 'channels=(8,16,32,64)']
    safetensors.torch.save_file(timm.create_model('resnet50', layers=(1, 1, 1, 1), channels=(8, 16, 32, 64)).state_dict(),
                                str(tmp_path / 'resnet50.safetensors'))
    small = ['--num-classes', '2', '--img-size', '64', '-b', '4', '--device', 'cpu', '--workers', '0']
    run = subprocess.run(
        [sys.executable, os.path.join(scripts, 'train.py'), str(tmp_path / 'data'), '--device-modules', 'timm_gsop',
         '--config', recipe_path('covpool_resnet50_cub200'), '--pretrained-path', str(tmp_path / 'resnet50.safetensors'),
         '--model-kwargs', *backbone, 'isqrt_dim=16', *small, '--epochs', '1', '--output', str(tmp_path / 'out'),
         '--experiment', 'cub'], capture_output=True, text=True, env=env, timeout=600)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-3000:]
    assert 'Warm start of covpool_resnet50' in log and 'global_pool.conv_reduce' in log
    checkpoint = tmp_path / 'out' / 'cub' / 'last.pth.tar'
    assert main(['export', str(checkpoint), '--out', str(tmp_path / 'export')]) == 0
    for model in (['--model', 'covpool_resnet50', '--model-kwargs', *backbone, 'isqrt_dim=16', '--checkpoint',
                   str(checkpoint)], ['--model', f'local-dir:{tmp_path / "export"}', '--pretrained']):
        run = subprocess.run(
            [sys.executable, '-m', 'timm_gsop', 'run', os.path.join(scripts, 'validate.py'), str(tmp_path / 'data'),
             '--split', 'validation', *model, *small, '--crop-pct', '1.0'],
            capture_output=True, text=True, env=env, timeout=600)
        assert run.returncode == 0 and '"top1"' in run.stdout, run.stderr[-3000:]
