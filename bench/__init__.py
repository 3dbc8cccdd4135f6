"""omni-fast microbenchmark suite: ``python -m bench [OPS...] [--preset NAME] [--providers ...]``."""
