"""Argument checks of the fused epilogues (activation, residual add, the backward's
ReLU mask), shared by the public functions, the public stages and the reference.

The epilogue of a forward pass is ``y = activation(bn(x) + residual)``; its backward
masks ``dy`` by the forward's output (``g = 0 where y <= 0 else dy``, as PyTorch's
``threshold_backward``) before the batch-norm backward, and ``g`` is the residual's
gradient.
"""

from . import _checks

#: The accepted ``activation`` values.
ACTIVATIONS = (None, "relu")


def check_activation(activation):
    """``activation`` is None or ``"relu"``."""
    if not (activation is None or (isinstance(activation, str) and activation in ACTIVATIONS)):
        raise ValueError(f"activation: expected None or 'relu', got {activation!r}")
    return activation


def check_like_x(a, name, x, float_dtypes):
    """``a`` (residual, forward output) is an array of x's shape and dtype, or None."""
    if a is None:
        return None
    _checks.check_input(a, name, float_dtypes)
    if tuple(a.shape) != tuple(x.shape):
        raise ValueError(f"{name}: expected the shape of x {tuple(x.shape)}, got {tuple(a.shape)}")
    if _checks.dtype_of(a) != _checks.dtype_of(x):
        raise TypeError(f"{name}: expected the dtype of x ({_checks.dtype_name(x)}), got {_checks.dtype_name(a)}")
    return a


def check_backward_epilogue(activation, y, residual, x, float_dtypes):
    """The backward's epilogue keywords: ``y`` (the forward's output) is required with
    ``activation="relu"`` and refused without; ``residual`` is a bool."""
    check_activation(activation)
    if not isinstance(residual, bool):
        raise TypeError(f"residual: expected a bool (whether the forward added a residual), "
                        f"got {type(residual).__name__}")
    if activation == "relu" and y is None:
        raise ValueError("y: expected the forward's output (the ReLU mask is y > 0) with activation='relu', "
                         "got None")
    if activation is None and y is not None:
        raise ValueError("y: expected None without an activation (nothing is masked), got an array")
    check_like_x(y, "y", x, float_dtypes)


def refuse_device(backend):
    """The fused epilogues run on the CPU kernels only, so far: a clear error elsewhere."""
    if backend.name != "cpu":
        raise NotImplementedError("activation, residual, y: the fused epilogues run on NumPy (CPU) arrays "
                                  f"only; got {backend.name} arrays")
