"""The package version: the single source (pyproject.toml reads it, ``omni_fast.__version__`` re-exports it)."""

__version__ = "0.2.0"
