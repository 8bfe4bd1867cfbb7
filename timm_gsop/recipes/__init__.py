"""Training recipes for timm's ``train.py`` (``--config FILE``), shipped with the package.

* ``gsop_resnet50_in1k``: GSoP-Net1 on ImageNet-1k, the released code's schedule (95 epochs, x0.1 at 30/60/90).
* ``gsop2_resnet50_in1k``: GSoP-Net2 on ImageNet-1k, the released code's schedule (65 epochs, x0.1 at 30/45/60).
* ``gsop_preresnet164_cifar100``: ResNet-164 on CIFAR-100, our choice (He et al.'s schedule; the paper gives none).
* ``covpool_resnet50_cub200``: iSQRT-COV on timm's ResNet-50 fine-tuned on CUB-200 at 448 px, fast-MPN-COV's
  fine-grained protocol (100 epochs at lr 1.2e-3, the classifier's x5, batch 10, wd 1e-3); any ``covpool_*`` backbone.

``timm-gsop recipe NAME`` prints a recipe's path, for ``train.py --config "$(timm-gsop recipe NAME)"``.
Command-line options given to ``train.py`` override the recipe's keys.
"""
import os
from typing import Any, Dict, List

__all__ = ['RECIPE_DIR', 'list_recipes', 'recipe_path', 'load_recipe']

RECIPE_DIR = os.path.dirname(os.path.abspath(__file__))


def list_recipes() -> List[str]:
    """Names of the shipped recipes (file names without ``.yaml``)."""
    return sorted(f[:-len('.yaml')] for f in os.listdir(RECIPE_DIR) if f.endswith('.yaml'))


def recipe_path(name: str) -> str:
    """Path of recipe ``name`` (with or without ``.yaml``); raises ``KeyError`` naming the choices."""
    name = name[:-len('.yaml')] if name.endswith('.yaml') else name
    if name not in list_recipes():
        raise KeyError(f'Unknown recipe {name!r}; choices: {", ".join(list_recipes())}')
    return os.path.join(RECIPE_DIR, f'{name}.yaml')


def load_recipe(name: str) -> Dict[str, Any]:
    """The recipe as the dict ``train.py`` passes to ``parser.set_defaults``."""
    import yaml
    with open(recipe_path(name)) as f:
        return yaml.safe_load(f)
