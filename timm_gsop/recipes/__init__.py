"""Training recipes for timm's ``train.py`` (``--config FILE``), shipped with the package.

* ``gsop_resnet50_in1k``: GSoP-Net1 on ImageNet-1k, the released code's schedule (95 epochs, x0.1 at 30/60/90).
* ``gsop2_resnet50_in1k``: GSoP-Net2 on ImageNet-1k, the released code's schedule (65 epochs, x0.1 at 30/45/60).
* ``gsop_preresnet164_cifar100``: ResNet-164 on CIFAR-100, our choice (He et al.'s schedule; the paper gives none).

``timm-gsop recipe NAME`` prints a recipe's path, for ``train.py --config "$(timm-gsop recipe NAME)"``.
Command-line options given to ``train.py`` override the recipe's keys.
"""
import argparse
import os
import sys
from typing import Any, Dict, List

__all__ = ['RECIPE_DIR', 'list_recipes', 'recipe_path', 'load_recipe', 'add_parser']

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


def _cmd_recipe(args: argparse.Namespace) -> int:
    if not args.name:
        for name in list_recipes():
            print(f'{name}  {recipe_path(name)}')
        return 0
    try:
        path = recipe_path(args.name)
    except KeyError as e:
        print(e.args[0], file=sys.stderr)
        return 1
    if args.show:
        with open(path) as f:
            sys.stdout.write(f.read())
    else:
        print(path)
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        'recipe', help="print the path of a training recipe for timm's train.py --config (no NAME: list them)",
        description='Training recipes for timm\'s train.py: python train.py --device-modules timm_gsop '
                    '--config "$(timm-gsop recipe gsop_resnet50_in1k)" /data/imagenet')
    p.add_argument('name', nargs='?', default='', metavar='NAME', help='e.g. gsop_resnet50_in1k')
    p.add_argument('--show', action='store_true', help="print the recipe's content instead of its path")
    p.set_defaults(func=_cmd_recipe)
