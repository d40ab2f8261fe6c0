"""CPU backend: Numba ``parallel=True`` kernels per kernel family (:mod:`~fastbn.cpu.planes`,
:mod:`~fastbn.cpu.rows`), the per-channel kernels (:mod:`~fastbn.cpu.channels`) and the
pipeline's stages that launch them (:mod:`~fastbn.cpu.stages`); small tensors' whole
passes in one call each (:mod:`~fastbn.cpu.fused`)."""

# First: registers the CPU's float16 conversions, which the kernels compiled below use.
from .native_half import NATIVE_FLOAT16
from .stages import (apply, as_dense, backward_apply, backward_coefficients, backward_scale, backward_sums,
                     forward_coefficients, geometry, mean_var, merge_moments, merge_sums, moments, moments_invstd,
                     moments_var, new_output, parameter_gradients)
from .fused import backward as fused_backward, backward_plan, forward as fused_forward, forward_plan

__all__ = ["NATIVE_FLOAT16", "apply", "as_dense", "backward_apply", "backward_coefficients", "backward_scale",
           "backward_plan", "backward_sums", "forward_coefficients", "forward_plan", "fused_backward",
           "fused_forward", "geometry", "mean_var", "merge_moments", "merge_sums", "moments", "moments_invstd",
           "moments_var", "new_output", "parameter_gradients"]
