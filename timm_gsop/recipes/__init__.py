"""Recipes for timm's ``train.py --config FILE`` (``timm-gsop recipe NAME`` prints a path; options given to
``train.py`` override the recipe's keys). What each pins and why: docs/recipes.md."""
import os
from typing import List

__all__ = ['list_recipes', 'recipe_path']

RECIPE_DIR = os.path.dirname(os.path.abspath(__file__))


def list_recipes() -> List[str]:
    """Names of the shipped recipes (file names without ``.yaml``)."""
    return sorted(f[:-len('.yaml')] for f in os.listdir(RECIPE_DIR) if f.endswith('.yaml'))


def recipe_path(name: str) -> str:
    """Path of recipe ``name`` (with or without ``.yaml``); a KeyError names the choices."""
    if name.removesuffix('.yaml') not in list_recipes():
        raise KeyError(f'Unknown recipe {name!r}; choices: {", ".join(list_recipes())}')
    return os.path.join(RECIPE_DIR, f"{name.removesuffix('.yaml')}.yaml")
