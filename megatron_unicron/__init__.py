"""megatron_unicron: self-healing training for megatron-core (detection, planning, transitions)."""

__version__ = "0.1.0"
__all__ = ["__version__"]
