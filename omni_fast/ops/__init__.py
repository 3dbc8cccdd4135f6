"""Public ops of omni-fast: one entry point per op, each picking triton | cuda | reference.

See :mod:`omni_fast.backend` for how the backend is chosen and :mod:`omni_fast.ops._dispatch` for the
``torch.library`` registration that makes every op traceable by ``torch.compile`` and capturable in CUDA graphs.
"""

from .rope import mrope, qk_norm_mrope
from .rvq import rvq_embed
from .sampling import sample

__all__ = ["mrope", "qk_norm_mrope", "rvq_embed", "sample"]
