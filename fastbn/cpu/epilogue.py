"""The backward's ReLU mask, inlined into the plane, row and small kernels."""

from ._jit import inline_helper


@inline_helper
def masked(g, y, zero):
    """``g``, or ``zero`` (0 of g's dtype) where the forward's output ``y <= 0``, as
    PyTorch's ``threshold_backward`` (a NaN ``y`` keeps ``g``).

    Written as an ``if`` on a value of g's own dtype: LLVM turns it into a vector
    select; a conditional expression converting ``g`` in one arm stays a branch and
    ran the masked reductions ~4x slower than the unmasked ones.
    """
    out = g
    if y <= zero:
        out = zero
    return out
