"""GSoP-Nets under torch.distributed, as timm's train.py runs them with torchrun: two CPU processes (gloo),
DistributedDataParallel through timm's ClassificationTask, each rank on its own shard of the data."""
import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import timm_gsop  # noqa: F401 (registers the models in this process; the workers import it themselves)

WORLD = 2
STEPS = 4
TINY = dict(channels=(8, 16, 32, 64), stem_width=8, gsop_dim=8, num_classes=3)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _worker(rank, world, port, configs, out_dir):
    try:
        os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
        torch.set_num_threads(1)
        dist.init_process_group('gloo', rank=rank, world_size=world)
        import timm_gsop  # noqa: F401

        for name, model_kwargs in configs:
            _train(rank, world, name, model_kwargs, out_dir)
        dist.destroy_process_group()
    except Exception:
        with open(os.path.join(out_dir, f'error{rank}.txt'), 'w') as f:
            f.write(traceback.format_exc())
        raise


def _train(rank, world, name, model_kwargs, out_dir):
    import timm
    from timm.optim import create_optimizer_v2
    from timm.task import ClassificationTask
    from timm.utils import distribute_bn, reduce_tensor

    # different seeds per rank (train.py: random_seed(seed, rank)): DDP must broadcast rank 0's weights
    torch.manual_seed(100 + rank)
    model = timm.create_model(name, **model_kwargs)
    task = ClassificationTask(model, nn.CrossEntropyLoss(), verbose=False)
    optimizer = create_optimizer_v2(model, opt='momentum', lr=0.05, weight_decay=1e-4)
    # train.py: task.prepare_distributed(device_ids=[device], ...); on CPU DDP takes no device_ids
    task.prepare_distributed(device_ids=None, broadcast_buffers=True, find_unused_parameters=False)
    ddp = task.get_trainable_module()
    assert isinstance(ddp, nn.parallel.DistributedDataParallel)

    g = torch.Generator().manual_seed(0)  # the same data set everywhere, each rank takes its shard
    x_all = torch.randn(WORLD * STEPS * 4, 3, 32, 32, generator=g)
    y_all = torch.randint(0, model_kwargs['num_classes'], (len(x_all),), generator=g)
    sampler = torch.utils.data.DistributedSampler(
        torch.utils.data.TensorDataset(x_all, y_all), num_replicas=world, rank=rank, shuffle=True, seed=0)
    indices = list(sampler)
    losses, unused = [], set()
    for step in range(STEPS):
        idx = indices[step * 4:(step + 1) * 4]
        loss = task(x_all[idx], y_all[idx])['loss']
        optimizer.zero_grad()
        loss.backward()
        unused |= {n for n, p in model.named_parameters() if p.grad is None}
        optimizer.step()
        losses.append(reduce_tensor(loss.detach(), world).item())
    # train.py after each epoch (--dist-bn reduce): average the BN running statistics
    distribute_bn(ddp, world, reduce=True)

    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    buffers = torch.cat([b.detach().float().flatten() for b in model.buffers()])
    gathered = [torch.zeros_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    gathered_buffers = [torch.zeros_like(buffers) for _ in range(world)]
    dist.all_gather(gathered_buffers, buffers)
    shard = torch.tensor(indices[:STEPS * 4])
    shards = [torch.zeros_like(shard) for _ in range(world)]
    dist.all_gather(shards, shard)
    if rank == 0:
        torch.save(dict(params=gathered, buffers=gathered_buffers, shards=shards, losses=losses,
                        unused=sorted(unused)), os.path.join(out_dir, f'{name}.pt'))
    dist.barrier()


CONFIGS = [
    ('gsop_resnet50', dict(TINY, gsop_manner='fusion_avg')),  # channel and position branches
    ('gsop2_resnet50', dict(TINY, isqrt_dim=8)),  # iSQRT-COV head
]


def test_ddp_two_processes_gloo(tmp_path):
    """Several steps on different shards; the parameters stay identical on both ranks, no parameter is
    unused (DDP with find_unused_parameters=False), BN statistics agree after train.py's distribute_bn."""
    try:
        mp.spawn(_worker, args=(WORLD, _free_port(), CONFIGS, str(tmp_path)), nprocs=WORLD, join=True)
    except Exception:
        errors = [p.read_text() for p in tmp_path.glob('error*.txt')]
        pytest.fail('\n'.join(errors) or 'a worker failed')
    for name, _ in CONFIGS:
        result = torch.load(tmp_path / f'{name}.pt')
        # each rank trained on its own shard
        assert not set(result['shards'][0].tolist()) & set(result['shards'][1].tolist())
        # every parameter took part in every step (find_unused_parameters=False would have raised otherwise)
        assert result['unused'] == []
        # parameters (and, after distribute_bn, BN statistics) identical on both ranks
        torch.testing.assert_close(result['params'][0], result['params'][1], rtol=0, atol=0)
        torch.testing.assert_close(result['buffers'][0], result['buffers'][1], rtol=1e-6, atol=1e-6)
        assert all(torch.isfinite(torch.tensor(result['losses'])))


def test_sync_batchnorm_conversion_keeps_the_weights():
    import copy
    import timm
    from timm.layers import convert_sync_batchnorm
    torch.manual_seed(0)
    kwargs = dict(TINY, gsop_manner='fusion_concat', gsop_dim=16, channels=(16, 16, 32, 64))
    model = timm.create_model('gsop_resnet50', **kwargs).eval()
    synced = convert_sync_batchnorm(copy.deepcopy(model)).eval()
    names = {n for n, m in synced.named_modules() if isinstance(m, nn.SyncBatchNorm)}
    assert {'layer4.2.se.concat_bn', 'layer4.2.se.channel.gate.bn_row', 'layer4.2.se.position.gate.bn_row'} <= names
    assert not any(type(m) is nn.BatchNorm2d for m in synced.modules())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # eval mode: SyncBatchNorm normalises with its running statistics, no process group
        torch.testing.assert_close(synced(x), model(x))
