"""transformers ``ExpertsInterface`` entry for omni-fast's fused MoE (filled in by the MoE work)."""


def register(name: str) -> None:
    """Register the omni-fast experts forward under ``name``."""
