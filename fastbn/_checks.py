"""Argument checking shared by every backend and by the NumPy reference.

Every public entry point validates its arguments here, before any kernel runs and
before any running statistic is touched, so a call that raises leaves the caller's
state as it was.  The checks look only at ``shape``, ``dtype``, ``ndim`` and
``strides``, which NumPy arrays and CUDA device arrays share.
"""

import math

import numpy as np

from . import dtypes

LAYOUTS = ("NCHW", "NHWC")
MIN_RANK, MAX_RANK = 2, 5


def dtype_of(array):
    """The NumPy dtype of ``array``: its ``dtype`` attribute, or for device arrays whose
    ``dtype`` is not a NumPy one (PyTorch CUDA tensors) the ``typestr`` of their
    ``__cuda_array_interface__`` (``torch.bfloat16``: ``ml_dtypes.bfloat16``)."""
    if type(array) is np.ndarray:
        return array.dtype
    try:
        return np.dtype(array.dtype)
    except TypeError:
        if str(array.dtype) == "torch.bfloat16":  # exported as opaque 2-byte items ("<V2")
            return dtypes.numpy_dtype("bfloat16") or np.dtype("V2")
        interface = getattr(array, "__cuda_array_interface__", None)
        if interface is None:
            raise TypeError(f"expected an array with a NumPy dtype, got dtype {array.dtype!r}") from None
        return np.dtype(interface["typestr"])


def dtype_name(array):
    """The dtype of ``array`` as a short string (works for any array-like)."""
    return str(getattr(array, "dtype", type(array).__name__))


def check_layout(layout):
    """Return ``layout`` if it is one of :data:`LAYOUTS`, else raise ValueError."""
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(f"layout: expected 'NCHW' or 'NHWC', got {layout!r}")
    return layout


def channel_axis(ndim, layout):
    """Index of the channel axis for an input of rank ``ndim`` in ``layout``."""
    return 1 if layout == "NCHW" else ndim - 1


def reject_masked(a, name):
    """Masked arrays are refused: their mask would be silently ignored."""
    if type(a) is not np.ndarray and isinstance(a, np.ma.MaskedArray):
        raise TypeError(f"{name}: expected a plain array (the mask would be ignored), got a numpy masked array")


def is_empty(shape):
    """True when an array of ``shape`` has no elements (an empty batch)."""
    return 0 in tuple(shape)


def check_input(x, name, float_dtypes, allow_empty=False):
    """Check the data tensor ``x`` (input or gradient) and return it unchanged.

    Expected: an array object (NumPy or device array) of rank 2 to 5, non-empty
    unless ``allow_empty``, with a dtype in ``float_dtypes``.
    """
    if not hasattr(x, "shape") or not hasattr(x, "dtype") or isinstance(x, np.generic):
        raise TypeError(
            f"{name}: expected an array (numpy.ndarray or a CUDA device array), "
            f"got {type(x).__name__}"
        )
    if not MIN_RANK <= len(x.shape) <= MAX_RANK:
        raise ValueError(
            f"{name}: expected an array of rank {MIN_RANK} to {MAX_RANK} "
            f"((N, C), (N, C, L), (N, C, H, W) or (N, C, D, H, W)), "
            f"got rank {len(x.shape)} with shape {tuple(x.shape)}"
        )
    if dtype_of(x) not in float_dtypes:
        allowed = " or ".join(str(d) for d in float_dtypes)
        raise TypeError(f"{name}: expected dtype {allowed}, got {dtype_name(x)}")
    if not allow_empty and is_empty(x.shape):
        raise ValueError(f"{name}: expected a non-empty array, got shape {tuple(x.shape)}")
    reject_masked(x, name)
    return x


def check_not_16_bit(dtype, name, what):
    """Raise TypeError when ``dtype`` is 16-bit storage (float16, bfloat16), which ``what``
    (an operation on this backend that has no 16-bit kernels) does not take."""
    if np.dtype(dtype).itemsize == 2:
        raise TypeError(f"{name}: expected dtype float32 or float64 ({what} has no float16/bfloat16 kernels "
                        f"on the CPU), got {np.dtype(dtype).name}")


def values_per_channel(shape, layout):
    """Number of values each channel's statistics reduce over."""
    axis = channel_axis(len(shape), layout)
    return math.prod(shape) // shape[axis]


def check_channel_vector(v, name, num_channels, dtype):
    """Check a per-channel vector (weight, bias, running stats, saved stats).

    ``None`` passes through.  Otherwise expected: rank 1, length ``num_channels``,
    dtype ``dtype`` (a single dtype or a tuple of accepted dtypes).
    """
    if v is None:
        return None
    if not hasattr(v, "shape") or not hasattr(v, "dtype"):
        raise TypeError(f"{name}: expected an array of shape ({num_channels},), got {type(v).__name__}")
    if tuple(v.shape) != (num_channels,):
        raise ValueError(
            f"{name}: expected shape ({num_channels},) (one value per channel), got {tuple(v.shape)}"
        )
    accepted = dtype if isinstance(dtype, tuple) else (dtype,)
    if dtype_of(v) not in accepted:
        expected = " or ".join(str(np.dtype(d)) for d in accepted)
        raise TypeError(f"{name}: expected dtype {expected}, got {dtype_name(v)}")
    reject_masked(v, name)
    return v


def _byte_span(a):
    """[first, last) byte addresses ``a``'s elements can touch, from its array interface
    (``__cuda_array_interface__`` for device arrays; the NumPy one otherwise, which is
    also what numba's CUDA simulator arrays expose)."""
    interface = getattr(a, "__cuda_array_interface__", None) or a.__array_interface__
    start = interface["data"][0]
    itemsize = np.dtype(interface["typestr"]).itemsize
    shape = interface["shape"]
    strides = interface.get("strides") or tuple(
        itemsize * math.prod(shape[i + 1:]) for i in range(len(shape)))
    low = start + sum(st * (n - 1) for st, n in zip(strides, shape) if st < 0)
    high = start + itemsize + sum(st * (n - 1) for st, n in zip(strides, shape) if st > 0)
    return low, high


def may_share_memory(a, b):
    """True when arrays ``a`` and ``b`` (host or device) may overlap in memory."""
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return np.may_share_memory(a, b)
    a_low, a_high = _byte_span(a)
    b_low, b_high = _byte_span(b)
    return a_low < b_high and b_low < a_high


def check_writable(v, name):
    """Raise ValueError if the NumPy array ``v`` cannot be written in place."""
    flags = getattr(v, "flags", None)
    if isinstance(v, np.ndarray) and not flags.writeable:
        raise ValueError(f"{name}: expected a writable array (it is updated in place), got a read-only one")


def check_scalar(value, name, low, high, low_open):
    """Check a real scalar lies in [low, high] (or (low, high] when ``low_open``)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__}")
    value = float(value)
    below = value <= low if low_open else value < low
    if math.isnan(value) or below or value > high:
        interval = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise ValueError(f"{name}: expected a number in {interval}, got {value!r}")
    return value


def check_running_stats(running_mean, running_var, num_channels, dtype, training):
    """Check the running statistics pair; both or neither must be given."""
    if (running_mean is None) != (running_var is None):
        given, missing = ("running_mean", "running_var") if running_var is None else ("running_var", "running_mean")
        raise ValueError(f"{missing}: expected an array when {given} is given (pass both or neither), got None")
    if running_mean is None:
        if not training:
            raise ValueError(
                "running_mean, running_var: expected running statistics when training=False "
                "(eval mode normalizes with them), got None"
            )
        return
    check_channel_vector(running_mean, "running_mean", num_channels, dtype)
    check_channel_vector(running_var, "running_var", num_channels, dtype)
    if training:
        check_writable(running_mean, "running_mean")
        check_writable(running_var, "running_var")
        if may_share_memory(running_mean, running_var):
            raise ValueError("running_var: expected an array separate from running_mean "
                             "(both are updated in place), got one sharing its memory")


def check_out(out, name, shape, dtype):
    """Check a caller-provided output buffer: same shape and dtype as expected, writable."""
    if out is None:
        return None
    if not hasattr(out, "shape") or not hasattr(out, "dtype"):
        raise TypeError(f"{name}: expected an array of shape {tuple(shape)}, got {type(out).__name__}")
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(out.shape)}")
    if dtype_of(out) != np.dtype(dtype):
        raise TypeError(f"{name}: expected dtype {np.dtype(dtype)}, got {dtype_name(out)}")
    reject_masked(out, name)
    check_writable(out, name)
    strides = getattr(out, "strides", None)
    # An empty array has no elements to overlap (NumPy gives some stride 0).
    if strides is not None and not is_empty(out.shape) and any(
            st == 0 and n > 1 for st, n in zip(strides, out.shape)):
        raise ValueError(f"{name}: expected an array whose elements do not overlap in memory, "
                         f"got strides {tuple(strides)} for shape {tuple(out.shape)}")
    return out


def check_training_size(shape, layout):
    """Training needs at least two values per channel (as PyTorch)."""
    if values_per_channel(shape, layout) < 2:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {tuple(shape)}"
        )


def check_forward_args(x, weight, bias, running_mean, running_var, training, momentum, eps,
                       layout, float_dtypes, param_dtype, allow_empty=False):
    """Validate every argument of a forward call (an empty ``x`` only with
    ``allow_empty``).  Returns the number of channels."""
    layout = check_layout(layout)
    check_input(x, "x", float_dtypes, allow_empty)
    if not isinstance(training, (bool, np.bool_)):
        raise TypeError(f"training: expected a bool, got {type(training).__name__}")
    check_scalar(eps, "eps", 0.0, math.inf, low_open=True)
    check_scalar(momentum, "momentum", 0.0, 1.0, low_open=False)
    num_channels = x.shape[channel_axis(len(x.shape), layout)]
    check_channel_vector(weight, "weight", num_channels, param_dtype)
    check_channel_vector(bias, "bias", num_channels, param_dtype)
    check_running_stats(running_mean, running_var, num_channels, param_dtype, training)
    if training and not is_empty(x.shape):  # an empty batch passes, as in torch
        check_training_size(x.shape, layout)
    return num_channels


def check_gradient_pair(dy, x, float_dtypes, allow_empty=False):
    """Check the data tensor ``x`` and its gradient ``dy``: each a valid input
    (:func:`check_input`), and ``dy`` with the shape and dtype of ``x``."""
    check_input(x, "x", float_dtypes, allow_empty)
    check_input(dy, "dy", float_dtypes, allow_empty)
    if tuple(dy.shape) != tuple(x.shape):
        raise ValueError(f"dy: expected the shape of x {tuple(x.shape)}, got {tuple(dy.shape)}")
    if dtype_of(dy) != dtype_of(x):
        raise TypeError(f"dy: expected the dtype of x ({dtype_name(x)}), got {dtype_name(dy)}")


def check_backward_args(dy, x, save_mean, save_invstd, weight, training, layout,
                        float_dtypes, param_dtype, stat_dtypes, allow_empty=False):
    """Validate every argument of a backward call (empty ``dy`` and ``x`` only with
    ``allow_empty``).  Returns the number of channels."""
    layout = check_layout(layout)
    check_gradient_pair(dy, x, float_dtypes, allow_empty)
    if not isinstance(training, (bool, np.bool_)):
        raise TypeError(f"training: expected a bool, got {type(training).__name__}")
    num_channels = x.shape[channel_axis(len(x.shape), layout)]
    for value, name in ((save_mean, "save_mean"), (save_invstd, "save_invstd")):
        if value is None:
            raise ValueError(f"{name}: expected an array of shape ({num_channels},), got None")
        check_channel_vector(value, name, num_channels, stat_dtypes)
    check_channel_vector(weight, "weight", num_channels, param_dtype)
    if training and not is_empty(x.shape):  # an empty batch passes, as in torch
        check_training_size(x.shape, layout)
    return num_channels
