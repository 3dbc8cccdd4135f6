"""omni-fast: GPU kernels for Qwen-Omni inference.

The repository keeps Triton kernels in ``kernels/`` and the pure-PyTorch ground truth in ``reference/``;
they install as ``omni_fast.kernels`` and ``omni_fast.reference`` (a top-level ``kernels`` package would
collide with the PyPI package of that name, which transformers imports).
"""

from setuptools import setup

PACKAGE_DIR = {
    "omni_fast": "omni_fast",
    "omni_fast.kernels": "kernels",
    "omni_fast.reference": "reference",
}


def _packages():
    import os

    found = []
    for pkg, root in PACKAGE_DIR.items():
        for dirpath, _dirs, files in os.walk(root):
            if "__init__.py" in files and "__pycache__" not in dirpath:
                rel = os.path.relpath(dirpath, root)
                found.append(pkg if rel == "." else pkg + "." + rel.replace(os.sep, "."))
    return sorted(found)


setup(
    name="omni-fast",
    version="0.1.0",
    description="Triton and CUDA kernels for fast Qwen-Omni inference",
    python_requires=">=3.10",
    packages=_packages(),
    package_dir=PACKAGE_DIR,
    package_data={"omni_fast.kernels": ["cuda/*.cu", "cuda/*.cuh", "cuda/*.h"], "omni_fast": ["configs/**/*.json"]},
    include_package_data=True,
    install_requires=["torch>=2.4", "triton>=3.4", "numpy"],
    extras_require={
        "hf": ["transformers>=5.0"],
        "cuda": ["cupy-cuda12x"],
        "bench": ["pytest-benchmark", "nvtx", "matplotlib"],
        "test": ["pytest", "hypothesis", "pytest-benchmark", "transformers>=5.0"],
    },
    entry_points={"console_scripts": ["omni-fast=omni_fast.__main__:main"]},
)
