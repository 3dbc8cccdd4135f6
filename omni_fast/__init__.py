"""omni-fast: GPU kernels (Triton, CUDA C++) for fast Qwen-Omni inference.

- :mod:`omni_fast.ops`: the public ops (TM-RoPE, ...), each dispatching to triton | cuda | reference.
- :func:`use_backend`: pick the backend for a block of code (``with omni_fast.use_backend("reference"):``).
- :mod:`omni_fast.fast_paths`: the opt-in fast paths and their switches (``omni_fast.fast_paths.status()``).
- :func:`weights_changed`: after writing weights through ``.data`` (or in place into inference tensors), so the
  copies omni-fast built from them are rebuilt (docs/reliability.md, "Hot-swapped weights").
- :mod:`omni_fast.reference`: pure-PyTorch ground truth; :mod:`omni_fast.kernels`: the Triton kernels.
"""

from ._version import __version__
from .backend import BACKENDS, use_backend
from . import fast_paths
from . import ops
from .integrations.transformers import register_transformers
from .patch import PatchReport, patch, unpatch
from . import models
from .models.cuda_graphs import weights_changed


__all__ = ["BACKENDS", "PatchReport", "fast_paths", "models", "ops", "patch", "register_transformers", "unpatch", "use_backend",
           "weights_changed", "__version__"]
