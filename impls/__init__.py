"""Implementations of Longformer attention, one module each, registered with
``attnbench.register``. Modules whose name starts with ``_`` are helpers (kernels,
CUDA sources) and are not imported by the registry."""
