"""kvbench's Triton kernels, installed as ``kvbench.kernels`` (pyproject.toml maps this folder there).

This folder is never ``kernels``: that name belongs to the PyPI package transformers imports since 5.25 (its hub
kernels). From the repository root, where ``python -m pytest`` or ``python -c`` put the root first on
``sys.path``, ``import kernels`` would find this folder instead and transformers would fail to import
("cannot import name 'CUDAProperties' from 'kernels'"; CI, 2026-12-03). Imported under that name, this file
hands the import over to the installed package; without one it stays this empty module, as it always was
(transformers <= 5.24 imports it to look for a version, finds none and takes the package as absent).
"""
if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _elsewhere = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is not None and _spec.loader is not None:
        _module = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _module  # the import system returns what sys.modules holds once this file has run
        _spec.loader.exec_module(_module)
