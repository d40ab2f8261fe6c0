"""CPU backend: Numba ``parallel=True`` kernels per memory layout and their host driver."""

from .driver import batch_norm_backward, batch_norm_forward, batch_stats

__all__ = ["batch_stats", "batch_norm_forward", "batch_norm_backward"]
