"""GSoP-Nets in timm's training setups (``python -m pytest -m slow``): DistributedDataParallel over two processes,
and timm's own train.py / validate.py through ``timm-gsop run`` (opt-in: they live in the timm repository, not in
the wheel: ``TIMM_SCRIPTS=/path/to/pytorch-image-models``)."""
import copy
import csv
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
import timm
from timm.layers import convert_sync_batchnorm

import timm_gsop  # noqa: F401 (registers the models; each spawned worker imports it again)
from conftest import randomise_bn_, tiny_kwargs
from timm_gsop_cli import main

pytestmark = pytest.mark.slow

WORLD, STEPS = 2, 3
KWARGS = dict(tiny_kwargs('gsop2_resnet50'), gsop_manner='fusion_avg')  # both GSoP branches and the iSQRT-COV head


def _worker(rank, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{out_dir}/rendezvous', rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(rank)  # different initial weights on each rank: DDP starts from rank 0's
        model = timm.create_model('gsop2_resnet50', **KWARGS)
        ddp = nn.parallel.DistributedDataParallel(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        g = torch.Generator().manual_seed(100 + rank)  # each rank its own data
        losses = []
        for _ in range(STEPS):  # no find_unused_parameters: a parameter without a gradient fails the next step
            loss = F.cross_entropy(ddp(torch.randn(4, 3, 64, 64, generator=g)), torch.randint(0, 7, (4,), generator=g))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        torch.save(dict(params=[p.detach() for p in model.parameters()], losses=losses), f'{out_dir}/rank{rank}.pt')
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_keep_replicas_equal(tmp_path):
    """DistributedDataParallel, two CPU processes (gloo): plain BatchNorm, as train.py without --sync-bn (torch's
    SyncBatchNorm trains on GPUs only: 'expected input tensor to be on GPU')."""
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f'rank{r}.pt') for r in range(WORLD)]
    assert all(torch.isfinite(torch.tensor(r['losses'])).all() for r in ranks)
    assert ranks[0]['losses'] != ranks[1]['losses']  # their own data
    assert all(torch.equal(p0, p1) for p0, p1 in zip(ranks[0]['params'], ranks[1]['params']))


def test_convert_sync_batchnorm_reaches_every_norm():
    """timm's convert_sync_batchnorm (train.py --sync-bn) converts the BatchNorms in the GSoP modules and the
    covariance head; in eval mode (no process group needed) the converted model computes the same."""
    model = randomise_bn_(timm.create_model('gsop2_resnet50', **KWARGS)).eval()
    synced = convert_sync_batchnorm(copy.deepcopy(model)).eval()
    norms = {n for n, m in synced.named_modules() if isinstance(m, nn.SyncBatchNorm)}
    assert {n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)} == norms
    assert any('.se.position.' in n for n in norms) and any(n.startswith('global_pool.') for n in norms)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(synced(x), model(x))


# ---- timm's train.py and validate.py ----------------------------------------------------------------------

@pytest.fixture()
def timm_scripts(tmp_path):
    """(run, data): timm's scripts copied out of the checkout (in place, `python train.py` imports the checkout's
    own timm/, older than the installed one), a two-class ImageFolder of random PNGs."""
    checkout = os.environ.get('TIMM_SCRIPTS')
    if not checkout:
        pytest.skip("set TIMM_SCRIPTS to a pytorch-image-models checkout (train.py, validate.py: not in timm's wheel)")
    from PIL import Image
    for script in ('train.py', 'validate.py'):
        shutil.copy(Path(checkout) / script, tmp_path / script)
    g = torch.Generator().manual_seed(0)
    for split in ('train', 'validation'):
        for cls in ('a', 'b'):
            (tmp_path / 'data' / split / cls).mkdir(parents=True)
            for i in range(4):
                pixels = (torch.rand(48, 56, 3, generator=g) * 255).byte().numpy()
                Image.fromarray(pixels).save(tmp_path / 'data' / split / cls / f'{i}.png')

    def run(script, *args):  # `timm-gsop run SCRIPT ARGS`
        result = subprocess.run([sys.executable, '-m', 'timm_gsop', 'run', str(tmp_path / script), *map(str, args)],
                                capture_output=True, text=True, timeout=600, cwd=tmp_path,
                                env=dict(os.environ, OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1'))
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        return result
    return run, tmp_path / 'data'


TINY = dict(layers=(1, 1, 1, 1), channels=(16, 32, 64, 128))
TRAIN = ['--num-classes', '2', '--img-size', '64', '-b', '4', '--epochs', '1', '--workers', '0', '--device', 'cpu']


def test_train_export_validate(timm_scripts, tmp_path):
    """train.py (from an initial checkpoint with random BatchNorms: outputs far from uniform, unlike a fresh
    model's), its checkpoint exported (model and kwargs from its args), validate.py on the export alone
    (`local-dir:`, its config's data settings): train.py's own evaluation of the weights."""
    run, data = timm_scripts
    kwargs = dict(TINY, gsop_dim=8, gsop_manner='fusion_avg')
    torch.manual_seed(0)
    model = randomise_bn_(timm.create_model('gsop_resnet50', num_classes=2, **kwargs))
    torch.save(model.state_dict(), tmp_path / 'i.pth')
    run('train.py', data, '--model', 'gsop_resnet50', '--model-kwargs', *[f'{k}={v}' for k, v in kwargs.items()],
        '--initial-checkpoint', tmp_path / 'i.pth', *TRAIN, '--output', tmp_path, '--experiment', 'g')
    assert main(['export', str(tmp_path / 'g' / 'last.pth.tar'), '--out', str(tmp_path / 'export')]) == 0
    result = run('validate.py', data, '--model', f'local-dir:{tmp_path / "export"}', '--pretrained', '-b', '4',
                 '--workers', '0', '--device', 'cpu', '--log-freq', '1', '--results-file', tmp_path / 'results.csv')
    with open(tmp_path / 'results.csv') as f, open(tmp_path / 'g' / 'summary.csv') as g:
        (validated,), trained = csv.DictReader(f), list(csv.DictReader(g))[-1]
    assert float(validated['top1']) == pytest.approx(float(trained['eval_top1']))
    loss = re.findall(r'Loss: +[\d.]+ \( *([\d.]+)\)', result.stdout + result.stderr)[-1]  # its log's running mean
    assert float(loss) == pytest.approx(float(trained['eval_loss']), abs=1e-4)


def test_covpool_warm_start_from_a_backbone_file(timm_scripts, tmp_path):
    """train.py --pretrained --pretrained-path FILE, FILE a plain ResNet's weights: the WarmStartWarning, and the
    backbone starts from them (two steps at the warm-up learning rate move them little)."""
    import safetensors.torch
    run, data = timm_scripts
    torch.manual_seed(0)
    weights = timm.create_model('resnet50', **TINY).state_dict()
    safetensors.torch.save_file(weights, str(tmp_path / 'resnet50.safetensors'))
    result = run('train.py', data, '--model', 'covpool_resnet50', '--pretrained', '--pretrained-path',
                 tmp_path / 'resnet50.safetensors', '--model-kwargs', *[f'{k}={v}' for k, v in TINY.items()],
                 'isqrt_dim=16', *TRAIN, '--output', tmp_path, '--experiment', 'c')
    assert 'WarmStartWarning' in result.stderr
    trained = torch.load(tmp_path / 'c' / 'last.pth.tar', map_location='cpu', weights_only=False)['state_dict']
    kept = [k for k in weights if k.endswith(('weight', 'bias')) and not k.startswith('fc.')]  # fc: not the backbone's
    moved = {k: (trained[f'backbone.{k}'] - weights[k]).abs().max().item() for k in kept}
    assert max(moved.values()) < 1e-3, moved  # measured 1e-5; from another initialisation: ~1
