"""pytest plugin (``-p timm_suite_plugin``) that runs timm's own ``tests/test_models.py`` on this package's models,
merged into a copy of timm (``test_timm_suite.py``).

It narrows timm's ``list_models`` / ``list_pretrained`` to this package's models before timm's test module is
collected, so every per-model test of timm's suite is parametrised with exactly these. A ``module=`` filter
(timm's list of model files whose tests include ``forward_intermediates``) is treated as naming this package's
files too: those tests run on these models as well. Tests of timm's own named models (``resnet18``,
``test_resnet`` ...) are deselected.

``test_model_load_pretrained`` / ``test_model_features_pretrained`` need the weights of every tag that has some:
the iSQRT-COV tags' files (fast-MPN-COV layout, random values) are written into a temporary ``TORCH_HOME``
before collection, so timm's url loader finds them in its cache and no download happens.
"""
import os
import shutil
import tempfile
from pathlib import Path

import timm
import timm.models

# this package's model files (timm registers a model under its file's name), merged into timm
MODEL_FILES = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / 'timm_gsop' / 'models').glob('[!_]*.py'))
_list_models = timm.list_models
OURS = set(_list_models(module=MODEL_FILES))
assert OURS, f'timm at {timm.__file__} has no model of {MODEL_FILES} merged in' 


def _ours_only(filter='', module='', pretrained=False, exclude_filters='', name_matches_cfg=False,
               include_tags=None):
    names = _list_models(filter=filter, pretrained=pretrained, exclude_filters=exclude_filters,
                         name_matches_cfg=name_matches_cfg, include_tags=include_tags)
    return [n for n in names if n.split('.')[0] in OURS]


def _pretrained_only(filter='', exclude_filters=''):
    return _ours_only(filter=filter, pretrained=True, exclude_filters=exclude_filters, include_tags=True)


def _write_url_weights(torch_home: str) -> None:
    """The files behind the url cfgs (the authors' first iSQRT-COV files), in fast-MPN-COV's layout, random values."""
    import torch
    folder = os.path.join(torch_home, 'hub', 'checkpoints')
    os.makedirs(folder, exist_ok=True)
    for full in _pretrained_only():
        url = timm.models.get_pretrained_cfg(full).url
        if url:
            rename = {'global_pool.conv_reduce': 'layer_reduce', 'global_pool.bn_reduce': 'layer_reduce_bn'}
            state_dict = timm.create_model(full.split('.')[0]).state_dict()  # with its (1000-class) classifier
            torch.save({rename.get(k.rsplit('.', 1)[0], k.rsplit('.', 1)[0]) + '.' + k.rsplit('.', 1)[1]: v
                        for k, v in state_dict.items()}, os.path.join(folder, os.path.basename(url)))


_TORCH_HOME = []


def pytest_configure(config):
    timm.list_models = timm.models.list_models = _ours_only
    timm.list_pretrained = timm.models.list_pretrained = _pretrained_only
    if config.option.collectonly:
        return
    home = tempfile.mkdtemp(prefix='timm-suite-torch-home-')
    _TORCH_HOME.append(home)
    os.environ['TORCH_HOME'] = home
    _write_url_weights(home)


def pytest_unconfigure(config):
    for home in _TORCH_HOME:
        shutil.rmtree(home, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    keep, drop = [], []
    for item in items:
        params = getattr(getattr(item, 'callspec', None), 'params', {})
        name = str(params.get('model_name', '')).split('.')[0]
        (keep if name in OURS else drop).append(item)
    items[:] = keep
    config.hook.pytest_deselected(items=drop)
