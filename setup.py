"""Build glue for omni-fast; the metadata is in pyproject.toml.

The repository keeps the Triton kernels in ``kernels/``, the references in ``reference/`` and the benchmark suite in
``bench/`` (top-level folders, not Python packages: see ``omni_fast/_layout.py``). The wheel ships them as
``omni_fast.kernels``, ``omni_fast.reference`` and ``omni_fast.bench``: their ``__init__.py`` comes from
``omni_fast/<name>/`` and ``build_py`` below adds the folder's modules (and sub-packages, and the CUDA C++ sources
of ``kernels/cuda/``) next to it. An editable install needs none of this: the ``__init__.py`` extends ``__path__``.
"""

import os
import shutil
from glob import glob

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

SOURCE_FOLDERS = {"omni_fast.kernels": "kernels", "omni_fast.reference": "reference", "omni_fast.bench": "bench"}
DATA_GLOBS = {"kernels": ["cuda/*.cu", "cuda/*.cuh", "cuda/*.h"]}  # shipped beside the modules


def _packages():
    """omni_fast's own packages, plus the sub-packages of the source folders (e.g. ``omni_fast.bench.cases``)."""
    found = ["omni_fast"] + ["omni_fast." + p for p in find_packages("omni_fast")]
    package_dir = {}
    for pkg, folder in SOURCE_FOLDERS.items():
        for sub in find_packages(folder):
            found.append(f"{pkg}.{sub}")
            package_dir[f"{pkg}.{sub}"] = os.path.join(folder, *sub.split("."))
    return sorted(found), package_dir


class BuildPyWithSourceFolders(build_py):
    """``build_py`` that also takes ``kernels/*.py``, ``reference/*.py`` and ``bench/*.py`` into their packages."""

    def find_package_modules(self, package, package_dir):
        modules = super().find_package_modules(package, package_dir)
        folder = SOURCE_FOLDERS.get(package)
        if folder:
            modules += [(package, os.path.splitext(os.path.basename(f))[0], f)
                        for f in sorted(glob(os.path.join(folder, "*.py")))]
        return modules

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        for pkg, folder in SOURCE_FOLDERS.items():
            for pattern in DATA_GLOBS.get(folder, []):
                for src in sorted(glob(os.path.join(folder, pattern))):
                    dst = os.path.join(self.build_lib, *pkg.split("."), os.path.relpath(src, folder))
                    os.makedirs(os.path.dirname(dst), exist_ok=True)
                    shutil.copyfile(src, dst)


PACKAGES, PACKAGE_DIR = _packages()
# setuptools' scratch folder: not build/ (CMake's, `make cuda-lib`); scripts/test_wheel.sh builds from a fresh copy
# of the tree (and the suite's wheel test empties it first), so a module deleted from the tree never lingers in a wheel.
setup(packages=PACKAGES, package_dir=PACKAGE_DIR, cmdclass={"build_py": BuildPyWithSourceFolders},
      options={"build": {"build_base": ".pybuild"}})
