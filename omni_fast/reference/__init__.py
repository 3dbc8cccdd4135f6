"""Pure-PyTorch reference implementations (installed as ``omni_fast.reference``): the ground truth.

Each function has the signature of its kernel and computes what transformers' Qwen-Omni modules compute,
step by step in the same dtypes, so kernels are tested against it and it is tested against transformers.
"""

from .._layout import source_path as _source_path

__path__ = _source_path(__name__, __path__)
