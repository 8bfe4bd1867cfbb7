"""``timm-gsop run SCRIPT [ARGS ...]``: run a timm script with the GSoP-Net models registered.

timm's ``train.py``, ``validate.py``, ``benchmark.py``, ``inference.py`` and ``onnx_export.py`` live in the
timm repository, not in the timm wheel, and only know the models registered when they call
``timm.create_model``. ``train.py`` can import plugins itself (``--device-modules timm_gsop``); the others
cannot. This command imports ``timm_gsop`` (and any ``--import`` modules), then runs the script as
``__main__`` exactly as ``python SCRIPT ARGS ...`` would: same ``sys.argv`` (arguments untouched), the
script's folder first on ``sys.path``, and its exit status returned. After the import, ``hf-hub:`` and
``local-dir:`` model names whose ``config.json`` names a GSoP-Net architecture resolve too.

Under torchrun, launch this module in place of the script::

    torchrun --nproc_per_node=8 -m timm_gsop run train.py /data/imagenet --model gsop_resnet50 ...
"""
import importlib
import os
import runpy
import sys
from typing import Iterable, Sequence

__all__ = ['run_script']


def _exit_code(code: object) -> int:
    """``sys.exit(code)`` semantics: None -> 0, int -> itself, anything else is printed and gives 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def run_script(script: str, args: Sequence[str] = (), modules: Iterable[str] = ()) -> int:
    """Run ``script`` as ``__main__`` with ``sys.argv = [script, *args]`` after importing the plugin.

    Returns the script's exit status (0 when it returns normally, the ``SystemExit`` code otherwise).
    Other exceptions propagate, as they would from ``python script.py``. ``sys.argv`` and ``sys.path``
    are restored afterwards.
    """
    import timm_gsop  # noqa: F401 (registers the models with timm)
    for module in modules:
        importlib.import_module(module)

    if not os.path.isfile(script):
        print(f'timm-gsop run: no such script: {script}', file=sys.stderr)
        return 2
    saved_argv, saved_path = sys.argv[:], sys.path[:]
    sys.argv = [script, *args]
    # what `python script.py` does: the script's own folder comes first on the import path
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    try:
        runpy.run_path(script, run_name='__main__')
    except SystemExit as e:
        return _exit_code(e.code)
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
    return 0
