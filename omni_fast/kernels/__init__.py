"""Triton kernels of omni-fast (installed as ``omni_fast.kernels``): one op family per module.

Kernels assume validated inputs; call them through :mod:`omni_fast.ops`, which checks arguments and picks the
backend. ``kernels/cuda/`` holds the CUDA C++ sources (CuPy at run time, CMake for C/C++ stacks).
"""

from .._layout import source_path as _source_path

__path__ = _source_path(__name__, __path__)
