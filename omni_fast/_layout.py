"""Where ``omni_fast.kernels``, ``omni_fast.reference`` and ``omni_fast.bench`` find their modules.

The repository keeps them in the top-level folders ``kernels/``, ``reference/`` and ``bench/`` (the project's
layout), but those folders are deliberately NOT Python packages (no ``__init__.py``): a top-level regular package
named ``kernels``, ``reference`` or ``bench`` would shadow the PyPI distributions of those names for anything run
from the repository root (transformers imports Hugging Face's ``kernels`` package, and setuptools loads its entry
points while installing). Their ``__init__.py`` lives under ``omni_fast/`` instead and, in a source checkout,
extends the package ``__path__`` to the top-level folder; a built wheel has the modules copied next to it
(``setup.py``'s ``build_py``), so nothing is added there.
"""

from __future__ import annotations

import os

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE_FOLDERS = {"omni_fast.kernels": "kernels", "omni_fast.reference": "reference", "omni_fast.bench": "bench"}


def source_path(package: str, package_path: list[str]) -> list[str]:
    """``package_path`` plus the top-level source folder of ``package`` when this is a source checkout and the
    package's own folder holds only its ``__init__.py``."""
    own = package_path[0]
    if any(name.endswith(".py") and name != "__init__.py" for name in os.listdir(own)):
        return list(package_path)  # an installed wheel: the modules sit beside __init__.py
    folder = os.path.join(REPO_ROOT, SOURCE_FOLDERS[package])
    return list(package_path) + ([folder] if os.path.isdir(folder) else [])
