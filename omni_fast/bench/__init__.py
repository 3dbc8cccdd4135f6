"""omni-fast microbenchmark suite: ``python -m omni_fast.bench [OPS...] [--preset NAME] [--providers ...]``."""

from .._layout import source_path as _source_path

__path__ = _source_path(__name__, __path__)
