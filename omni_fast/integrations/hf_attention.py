"""transformers ``AttentionInterface`` entry for omni-fast's flash attention (filled in by the attention work)."""


def register(name: str) -> None:
    """Register the omni-fast attention forward under ``name``."""
