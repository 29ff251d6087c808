"""The adapter to megatron-core: the only package that imports megatron-core internals."""
