"""Real data (slow, needs scikit-learn): scikit-learn's digits (1,797 real 8x8 handwritten digits, shipped
inside the package, no download). Small GSoP-Nets against a first-order ResNet of the same size, trained
with the demo's timm recipe; prints the accuracies.

    pip install scikit-learn && python -m pytest -m slow tests/test_digits.py -s

scikit-learn (with scipy) is not a test dependency: this check is excluded from the default run, and a
40 MB install for a test CI does not run would not earn its place.
"""
import pytest
import torch
import torch.nn.functional as F
import timm

import timm_gsop  # noqa: F401
import dataclasses

from timm_gsop.demo import DEMO_MODELS, evaluate, train_classifier

pytestmark = pytest.mark.slow

# the demo's three networks; with 10 classes GSoP-Net2's classifier on the covariance vector grows, so its
# head is 24-d here (300 features) to keep the three within 1.5% of each other
MODELS = DEMO_MODELS[:2] + (dataclasses.replace(DEMO_MODELS[2], kwargs=dict(DEMO_MODELS[2].kwargs, isqrt_dim=24)),)
SEEDS = (0, 1, 2)
EPOCHS = 30
SIZE = 16


def _digits():
    datasets = pytest.importorskip('sklearn.datasets')
    model_selection = pytest.importorskip('sklearn.model_selection')
    digits = datasets.load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8) in [0, 1]
    y = torch.tensor(digits.target)
    train_idx, test_idx = model_selection.train_test_split(
        torch.arange(len(y)).numpy(), test_size=0.3, stratify=digits.target, random_state=0)
    x = F.interpolate(x, size=SIZE, mode='bilinear', align_corners=False)
    x = (x - x[train_idx].mean()) / x[train_idx].std()
    return x[train_idx], y[train_idx], x[test_idx], y[test_idx]


def test_digits_gsop_vs_same_size_first_order():
    x_train, y_train, x_test, y_test = _digits()
    table = []
    for spec in MODELS:
        accs, params = [], 0
        for seed in SEEDS:
            torch.manual_seed(seed)
            model = timm.create_model(spec.name, num_classes=10, in_chans=1, **spec.kwargs)
            params = sum(p.numel() for p in model.parameters())
            train_classifier(model, x_train, y_train, EPOCHS, batch_size=64, lr=0.1, seed=seed)
            accs.append(evaluate(model, x_test, y_test))
        table.append((spec.label, params, accs))
    print(f'\ndigits: {len(x_train)} train / {len(x_test)} test, 1x{SIZE}x{SIZE}, {EPOCHS} epochs, seeds {SEEDS}')
    for label, params, accs in table:
        mean = sum(accs) / len(accs)
        print(f'{label:32s} {params:>7,} params  test acc. {mean:.2f}%  ({", ".join(f"{a:.2f}" for a in accs)})')
    sizes = [p for _, p, _ in table]
    assert max(sizes) / min(sizes) < 1.02
    for label, _, accs in table:
        assert min(accs) > 95.0, (label, accs)
