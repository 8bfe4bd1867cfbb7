"""``timm-gsop demo`` (timm_gsop/demo.py): its data carries only second-order information; on it GSoP-Net beats the
same-size first-order ResNet, the export reloads exactly and the warm start is exact before any step (a reduced
run); the full run keeps what docs/demo.md claims, which held over seeds 0-4 and three floating-point paths."""
import pytest
import torch

from timm_gsop.demo import DEMO_MODELS, DemoConfig, correlation_images, run_demo

pytestmark = [pytest.mark.usefixtures('one_thread'), pytest.mark.filterwarnings('ignore::timm_gsop.WarmStartWarning')]


@pytest.fixture(scope='module')
def one_thread():
    saved = torch.get_num_threads()
    yield torch.set_num_threads(1)
    torch.set_num_threads(saved)


def test_the_data_carries_nothing_first_order():
    x, y = correlation_images(800, size=16, corr=0.3, seed=0)
    assert torch.bincount(y).tolist() == [400, 400]
    torch.testing.assert_close(x.mean((2, 3)), torch.zeros(800, 3), atol=1e-5, rtol=0)  # per image and channel
    torch.testing.assert_close(x.std((2, 3)), torch.ones(800, 3), atol=1e-5, rtol=0)
    flat = x.flatten(2)
    corr = flat @ flat.transpose(1, 2) / (flat.shape[-1] - 1)
    c01, c12 = corr[:, 0, 1], corr[:, 1, 2]
    for label in (0, 1):  # within a class each correlation's sign is + or - equally often; their product tells it
        sel = y == label
        assert abs(c01[sel].mean()) < 0.05 and abs(c12[sel].mean()) < 0.05
        same_sign = ((c01 * c12)[sel] > 0).float().mean()
        assert same_sign > 0.9 if label == 0 else same_sign < 0.1
    assert torch.equal(correlation_images(8, seed=3)[0], correlation_images(8, seed=3)[0])
    with pytest.raises(ValueError):
        correlation_images(8, corr=0.8)


def test_a_reduced_demo(tmp_path, capsys):
    result = run_demo(DemoConfig(train_samples=1500, test_samples=500, corr=0.3, models=DEMO_MODELS[:2], heads=(),
                                 finetune_epochs=1, out=str(tmp_path / 'export'), progress=False))
    first, gsop = result['rows']
    assert abs(gsop['params'] - first['params']) <= 0.01 * first['params']
    assert gsop['accuracy'] >= first['accuracy'] + 8 and gsop['accuracy'] >= 75, capsys.readouterr().out
    assert result['export']['ok'] and result['export']['files'] == ['config.json', 'model.safetensors']
    assert result['warm_start']['accuracy_before'] == first['accuracy']  # exact before any step


@pytest.mark.slow
def test_the_full_demo_keeps_docs_demo_md(tmp_path):
    result = run_demo(DemoConfig(out=str(tmp_path / 'export'), progress=False))
    first, net1, net2 = (r['accuracy'] for r in result['rows'])
    assert net1 >= first + 12 and net2 >= first + 12
    assert result['warm_start']['accuracy_before'] == first
    avg, isqrt = (r['accuracy'] for r in result['heads'])
    assert isqrt >= 55 and abs(isqrt - avg) <= 10  # the head on the 8x8 map: no lead either way
