"""setup.cfg holds the metadata and the package data; this adds ``hub_cards/`` (the model-card template and
per-family facts, kept at the repository root) to the packages as ``timm_gsop.hub_cards``, so wheels ship it,
and the command line's module ``timm_gsop_cli`` (outside the package: its parser must not import torch)."""
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=['timm_gsop', 'timm_gsop.*']) + ['timm_gsop.hub_cards'],
    package_dir={'timm_gsop.hub_cards': 'hub_cards'},
    py_modules=['timm_gsop_cli'],
)
