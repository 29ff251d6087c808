"""Adapter between megatron_unicron and megatron-core: the only package that imports megatron internals."""
