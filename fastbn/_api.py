"""Public functions: argument checking, then dispatch to the backend where the data lives.

Contract shared by every public function (see also each docstring):

- Bad arguments raise ``TypeError`` (wrong kind or dtype) or ``ValueError`` (wrong
  shape, size or value) whose message starts with the argument's name and says what was
  expected and what came, e.g. ``"weight: expected shape (3,) (one value per channel),
  got (4,)"``.  Everything is checked before any kernel runs, so a call that raises
  leaves ``running_mean``/``running_var`` and ``out`` exactly as they were.
- Inputs are never written (read-only arrays are fine as inputs); only ``out`` and, in
  training, the running statistics are.  Masked arrays are refused (their mask would be
  ignored); non-native byte order is refused; any strides, negative ones included, work.
- NaN or ±Inf in a channel's data make that channel's batch statistics and its whole
  ``y`` NaN in training (as PyTorch) and never affect other channels; in eval they stay
  elementwise.  A channel of equal values has var 0 and ``y = bias`` for any ``eps > 0``.
- Where the data lives decides the backend: NumPy arrays run the CPU kernels; CUDA
  device arrays (numba device arrays, CuPy arrays, PyTorch CUDA tensors: anything with
  ``__cuda_array_interface__``) run the CUDA kernels with no host round trip, and
  results come back as the caller's kind of array.  Mixing host and device arrays in
  one call is a TypeError.
- Half precision (:mod:`fastbn.dtypes`): float16 ``x`` (NumPy or device arrays) and
  bfloat16 ``x`` (NumPy arrays of ``ml_dtypes.bfloat16``, CPU only) are stored in 16 bits
  and computed in float32: their weight, bias, running statistics, saved statistics,
  ``dweight`` and ``dbias`` are float32, ``y``/``dx`` (and ``out``, ``residual``) are
  of x's dtype, each value rounded once (to nearest even) from float32.
- Empty batches (NumPy arrays with a dimension of size 0, N = 0 or any other, as
  ``torch.nn.functional.batch_norm`` on the CPU; device arrays refuse them) are valid in
  training and eval: ``y``/``dx`` are empty, the running statistics are left untouched,
  ``dweight``/``dbias`` are 0, and the batch statistics of an empty batch
  (``batch_stats``, training ``save_mean``/``save_invstd``) are NaN, there being no
  values (torch leaves them uninitialized); eval returns the running ones as usual.
- Thread-safe: calls may run concurrently from several Python threads (the CPU kernels
  release the GIL; on Numba's non-thread-safe ``workqueue`` layer launches are
  serialized), and a process forked after using fastbn can use it (see
  :mod:`fastbn.cpu._jit`).
"""

import numpy as np

from . import _call_plans, _checks, _epilogue, dtypes
from ._dispatch import select_backend


def _param_dtype(x):
    """dtype of weight, bias and running statistics for input ``x`` (:mod:`fastbn.dtypes`);
    x's own for dtypes without a policy, which the input check then refuses."""
    dtype = _checks.dtype_of(x)
    try:
        return dtypes.policy(dtype).parameters
    except KeyError:
        return dtype


def _allows_empty(backend):
    """Empty batches are handled on the host (see the module docstring)."""
    return backend.name == "cpu"


def _empty_batch_forward(b, x, num_channels, weight, bias, running_mean, running_var, training, eps,
                         out, dtype):
    """batch_norm_forward's result for an empty host ``x``: nothing to normalize or update."""
    y = np.empty(x.shape, dtype) if out is None else out
    if training:
        return (y, *_no_statistics(num_channels, dtype))
    coefficients = b.forward_coefficients(
        None, running_mean, running_var, False, weight, bias, float(eps), None, None, 0.0, False, dtype)
    return y, coefficients.mean, coefficients.invstd


def _new_plan(b, kind, key, geometry, dtype, training):
    """The backend's plan (``kind``: "forward_plan" or "backward_plan") for a checked call
    of structure ``key``, stored for the next calls of that structure (see
    :mod:`fastbn._call_plans`); None when the call has no key or the backend no such plan."""
    make = getattr(b, kind, None)
    if key is None or make is None or not geometry.dense:
        return None
    plan = make(geometry, dtype, training)
    if plan is not None:
        _call_plans.store(key, plan)
    return plan


def _no_statistics(num_channels, dtype):
    """(mean, var) of an empty batch: NaN, in the statistics dtype of ``dtype``."""
    statistics = dtypes.policy(dtype).statistics
    return np.full(num_channels, np.nan, statistics), np.full(num_channels, np.nan, statistics)


def batch_stats(x, *, layout="NCHW"):
    """Per-channel mean and population (biased) variance, in one pass over ``x``.

    Parameters
    ----------
    x : float32, float64, float16 or bfloat16 (``ml_dtypes.bfloat16``; CPU only) array
        of rank 2-5, channels on axis 1 (``layout="NCHW"``:
        (N, C), (N, C, L), (N, C, H, W), (N, C, D, H, W)) or on the last axis
        (``layout="NHWC"``).  A numpy.ndarray (any strides) or a CUDA device array;
        lists, scalars, 0-d/1-d arrays, empty device arrays and integer,
        bool, complex or object dtypes raise TypeError/ValueError.
    layout : "NCHW" or "NHWC".

    Returns
    -------
    (mean, var) : float64 arrays of shape (C,) (float32 for float16 and bfloat16 input);
        NaN for an empty x (see the module docstring).
    """
    backend = select_backend({"x": x})
    _checks.check_layout(layout)
    _checks.check_input(x, "x", backend.storage_dtypes, _allows_empty(backend))
    if _checks.is_empty(x.shape):
        return _no_statistics(x.shape[_checks.channel_axis(x.ndim, layout)], _checks.dtype_of(x))
    b = backend.module
    return b.mean_var(b.moments(x, b.geometry(x, layout)), _checks.dtype_of(x))


def batch_norm_forward(x, weight=None, bias=None, *, running_mean=None, running_var=None,
                       training=True, momentum=0.1, eps=1e-5, layout="NCHW", out=None,
                       activation=None, residual=None, virtual_batch_size=None):
    """Batch-norm forward pass: ``y = (x - mean) / sqrt(var + eps) * weight + bias``,
    optionally followed by a fused residual add and ReLU:
    ``y = relu((x - mean) / sqrt(var + eps) * weight + bias + residual)``.

    Argument order: ``x, weight, bias`` are positional, in the order of ATen's
    ``native_batch_norm``; ``running_mean``, ``running_var`` and everything after them
    are keyword-only.  This is not the order of ``torch.nn.functional.batch_norm``
    (``x, running_mean, running_var, weight, bias``; see :func:`batch_norm`): a call in
    that order that passes weight or bias has four or five positional arguments and
    raises TypeError instead of treating the running statistics as weight and bias
    (``batch_norm_forward(x, running_mean, running_var)`` alone cannot be told apart
    from ``x, weight, bias``).

    Parameters
    ----------
    x : float32, float64, float16 or bfloat16 array of rank 2-5 in ``layout`` (see
        :func:`batch_stats`).
    weight, bias : (C,) arrays of x's dtype (float32 for float16/bfloat16 x), or None
        (scale 1, shift 0).  Each is
        optional on its own, as in PyTorch: weight without bias and bias without weight
        are both valid.
    running_mean, running_var : (C,) arrays of weight's dtype, or None (both or neither;
        only one is a ValueError).  Training updates them in place (so they must be
        writable and must not share memory with each other):
        ``r = (1 - momentum) * r + momentum * batch``, with the unbiased (n / (n - 1))
        batch variance for ``running_var``.  Eval (``training=False``) normalizes with
        them, requires them, and only reads them (read-only arrays are fine).
    training : bool (or numpy.bool_); batch statistics when True, running statistics
        when False.  Training needs more than one value per channel (N * spatial > 1),
        else ValueError ``Expected more than 1 value per channel when training``.
    momentum : real number in [0, 1] (NaN is a ValueError).
    eps : real number > 0 (0, negative and NaN are ValueErrors), added to the variance.
        Any positive eps works, however small: on the CPU, per-channel coefficients beyond x's
        dtype saturate at its largest finite value instead of overflowing to Inf.
    layout : "NCHW" or "NHWC".
    out : optional writable array shaped and typed like ``x``, in any memory order, to
        write ``y`` into.  It may be ``x`` itself (in place); one that overlaps ``x``
        only partly is handled through a temporary.  Self-overlapping (stride-0) and
        read-only ``out`` are ValueErrors.
    activation : None or ``"relu"`` (keyword-only): applied to ``bn(x) + residual``
        inside the normalize pass (no extra pass over memory).  For the backward pass,
        keep ``y``: its ReLU mask is ``y > 0``.
    residual : None or an array of x's shape and dtype (keyword-only, any strides; it
        may be ``x`` itself or ``out``), added to ``bn(x)`` before the activation, in
        the same pass.
    virtual_batch_size : None or a positive int k (keyword-only): in training, "ghost"
        batches: every slice of k samples along N (the last one smaller when k does not
        divide N) is normalized with its own statistics, all slices in one pass; the
        running statistics get the average over the slices of their means and unbiased
        variances.  No effect in eval.  Not with ``activation``/``residual``; NumPy
        arrays only (TypeError for CUDA device arrays).  See :mod:`fastbn.ghost`.

    Returns
    -------
    (y, save_mean, save_invstd) : ``y`` shaped like ``x`` in its dtype (``out`` when
        given); ``save_mean`` and ``save_invstd = 1 / sqrt(var + eps)`` float64 (C,)
        (float32 for float16/bfloat16 input), the batch statistics (biased var) when
        training, the running ones in eval.  Statistics are float64 so the backward pass
        sees the mean unrounded.  With ``virtual_batch_size`` in training they are
        float64 (slices, C), one row per slice.
    """
    if virtual_batch_size is not None:
        from . import ghost  # imports this module
        k = ghost.check_virtual_batch_size(virtual_batch_size)
        if training is True or training is np.True_:
            return ghost.forward(x, weight, bias, running_mean, running_var, momentum, eps, layout, out,
                                 activation, residual, k)
    plan_key = None
    if activation is None and residual is None and virtual_batch_size is None:
        plan_key = _call_plans.forward_key(x, weight, bias, running_mean, running_var, training, momentum, eps,
                                           layout, out)
        plan = _call_plans.lookup(plan_key, *((running_mean, running_var) if training else ()))
        if plan is not None:
            return plan(x, weight, bias, running_mean, running_var, momentum, eps, out)
    backend = select_backend({"x": x, "weight": weight, "bias": bias, "running_mean": running_mean,
                              "running_var": running_var, "out": out, "residual": residual})
    num_channels = _checks.check_forward_args(x, weight, bias, running_mean, running_var, training, momentum,
                                              eps, layout, backend.storage_dtypes, _param_dtype(x),
                                              _allows_empty(backend))
    dtype = _checks.dtype_of(x)
    _checks.check_out(out, "out", x.shape, dtype)
    _epilogue.check_activation(activation)
    _epilogue.check_like_x(residual, "residual", x, backend.storage_dtypes)
    epilogue = activation is not None or residual is not None
    b = backend.module
    if _checks.is_empty(x.shape):
        return _empty_batch_forward(b, x, num_channels, weight, bias, running_mean, running_var, training, eps,
                                    out, dtype)
    geometry = b.geometry(x, layout)
    x = b.as_dense(x, geometry)  # one copy at most, shared by both passes
    plan = _new_plan(b, "forward_plan", plan_key, geometry, dtype, bool(training))
    if plan is not None:
        return plan(x, weight, bias, running_mean, running_var, float(momentum), float(eps), out)
    # The stages below in fewer launches (CUDA) or one call (small CPU tensors); None: not here.
    fused = getattr(b, "fused_forward", None)
    if fused is not None:
        epilogue_args = dict(residual=residual, activation=activation) if epilogue else {}
        result = fused(x, weight, bias, running_mean, running_var, bool(training), float(momentum), float(eps),
                       geometry, out, dtype, **epilogue_args)
        if result is not None:
            return result
    if training:
        m = b.moments(x, geometry)
        coefficients = b.forward_coefficients(
            m.count, m.mean, m.m2, True, weight, bias, float(eps), running_mean, running_var,
            float(momentum), running_mean is not None, dtype)
    else:
        coefficients = b.forward_coefficients(
            None, running_mean, running_var, False, weight, bias, float(eps), None, None, 0.0, False, dtype)
    if epilogue:
        y = b.apply(x, coefficients, geometry, out, residual=residual, activation=activation)
    else:
        y = b.apply(x, coefficients, geometry, out)
    return y, coefficients.mean, coefficients.invstd



def batch_norm_backward(dy, x, save_mean, save_invstd, weight=None, *,
                        training=True, layout="NCHW", out=None, activation=None, y=None, residual=False,
                        virtual_batch_size=None):
    """Batch-norm backward pass: gradients with respect to x, weight and bias (and the
    residual, for a forward that added one).

    Parameters
    ----------
    dy : gradient of the loss with respect to ``y``; shape and dtype of ``x``.
    x : the forward input (float32, float64, float16 or bfloat16, rank 2-5, in ``layout``).
    save_mean, save_invstd : (C,) float32 or float64 (float32 for float16/bfloat16
        input), as returned by
        :func:`batch_norm_forward` with the same ``training``.
    weight : (C,) array of x's parameter dtype (x's, float32 for 16-bit x), or None
        (scale 1).  Bias does not enter the
        backward pass; ``dbias`` is returned either way.
    training : bool; True differentiates through the batch statistics, False treats
        mean and invstd as constants (frozen batch norm).  True needs more than one
        value per channel, as in the forward pass.
    layout : "NCHW" or "NHWC".
    out : optional writable array shaped and typed like ``x`` to write ``dx`` into; it
        may be ``dy`` or ``x`` itself, partial overlaps go through a temporary.
    activation : None or ``"relu"`` (keyword-only), as in the forward call.  With
        ``"relu"``, ``dy`` is the gradient of the activation's output and is masked,
        inside both backward passes, to ``g = 0 where y <= 0 else dy`` (PyTorch's
        ``threshold_backward``); every formula below then reads ``g`` for ``dy``.
    y : the forward's output (x's shape and dtype; keyword-only), required with
        ``activation="relu"`` (its mask), None otherwise.
    residual : bool (keyword-only): the forward added a residual; its gradient ``g`` is
        then returned too.
    virtual_batch_size : None or the forward's positive int k (keyword-only): with
        ``training=True``, ``save_mean``/``save_invstd`` are the forward's (slices, C)
        statistics and the gradient goes through each slice's own statistics.  No effect
        with ``training=False``.  See :mod:`fastbn.ghost`.

    Returns
    -------
    (dx, dweight, dbias) : ``dx`` like ``x``; ``dweight = sum(dy * x_hat)`` and
        ``dbias = sum(dy)``, (C,) in weight's dtype (returned even when ``weight`` is None).
    (dx, dweight, dbias, dresidual) when ``residual=True``: ``dresidual = g``, a new
        array like ``x`` with ``activation="relu"``; without an activation it is ``dy``
        itself (so ``out`` must not share memory with ``dy`` then: ValueError).
    """
    if virtual_batch_size is not None:
        from . import ghost  # imports this module
        k = ghost.check_virtual_batch_size(virtual_batch_size)
        if training is True or training is np.True_:
            return ghost.backward(dy, x, save_mean, save_invstd, weight, layout, out, activation, y, residual, k)
    plan_key = None
    if activation is None and y is None and residual is False and virtual_batch_size is None:
        plan_key = _call_plans.backward_key(dy, x, save_mean, save_invstd, weight, training, layout, out)
        plan = _call_plans.lookup(plan_key)
        if plan is not None:
            return plan(dy, x, save_mean, save_invstd, weight, out)
    backend = select_backend({"dy": dy, "x": x, "save_mean": save_mean, "save_invstd": save_invstd,
                              "weight": weight, "out": out, "y": y})
    num_channels = _checks.check_backward_args(dy, x, save_mean, save_invstd, weight, training, layout,
                                               backend.storage_dtypes, _param_dtype(x),
                                               backend.statistics_dtypes, _allows_empty(backend))
    dtype = _checks.dtype_of(x)
    _checks.check_out(out, "out", x.shape, dtype)
    _epilogue.check_backward_epilogue(activation, y, residual, x, backend.storage_dtypes)
    if residual and activation is None and out is not None and _checks.may_share_memory(out, dy):
        raise ValueError("out: expected an array not sharing memory with dy when residual=True without an "
                         "activation (dy itself is returned as the residual's gradient), got one that does")
    if _checks.is_empty(x.shape):  # sums over no values
        dx = np.empty(x.shape, dtype) if out is None else out
        parameters = dtypes.policy(dtype).parameters
        grads = (dx, np.zeros(num_channels, parameters), np.zeros(num_channels, parameters))
        return (*grads, np.empty(x.shape, dtype) if activation else dy) if residual else grads
    b = backend.module
    geometry = b.geometry(x, layout)
    same_order = dy.strides == x.strides  # then dy is dense exactly when x is
    x, dy = b.as_dense(x, geometry), b.as_dense(dy, geometry)
    plan = _new_plan(b, "backward_plan", plan_key if same_order else None, geometry, dtype, bool(training))
    if plan is not None:
        return plan(dy, x, save_mean, save_invstd, weight, out)
    if y is not None:
        return _masked_backward(b, dy, x, y, save_mean, save_invstd, weight, bool(training), geometry, out,
                                dtype, residual)
    fused = getattr(b, "fused_backward", None)  # as in batch_norm_forward
    dresidual = dy
    if fused is not None:
        grads = fused(dy, x, save_mean, save_invstd, weight, bool(training), geometry, out, dtype)
        if grads is not None:
            return (*grads, dresidual) if residual else grads
    sums = b.backward_sums(dy, x, save_mean, geometry)
    dweight, dbias = b.parameter_gradients(sums, save_invstd, dtype)
    coefficients = b.backward_coefficients(sums, save_mean, save_invstd, weight, bool(training), dtype)
    if training:
        dx = b.backward_apply(dy, x, coefficients, geometry, out)
    else:
        dx = b.backward_scale(dy, coefficients, geometry, out)
    return (dx, dweight, dbias, dresidual) if residual else (dx, dweight, dbias)


def _masked_backward(b, dy, x, y, save_mean, save_invstd, weight, training, geometry, out, dtype, residual):
    """The backward through ``relu(bn(x) (+ residual))``: on the CPU the mask ``y <= 0``
    applied in the sums pass and in the dx pass (which also writes the residual's
    gradient); on CUDA a mask pass writes ``g`` (the residual's gradient) and the plain
    backward runs on it, which moves as many bytes as reading dy and y in both passes."""
    relu_mask = getattr(b, "relu_mask", None)
    if relu_mask is not None:
        fused = b.fused_backward
        g = relu_mask(dy, y, geometry)
        grads = fused(g, x, save_mean, save_invstd, weight, training, geometry, out, dtype)
        return (*grads, g) if residual else grads
    y = b.as_dense(y, geometry)
    sums = b.backward_sums(dy, x, save_mean, geometry, y=y)
    dweight, dbias = b.parameter_gradients(sums, save_invstd, dtype)
    coefficients = b.backward_coefficients(sums, save_mean, save_invstd, weight, training, dtype)
    dresidual = b.new_output(geometry, dtype) if residual else None
    # Eval has x_scale = shift = 0: the same pass, reading x for nothing, keeps one kernel.
    dx = b.backward_apply(dy, x, coefficients, geometry, out, y=y, masked_dy=dresidual)
    return (dx, dweight, dbias, dresidual) if residual else (dx, dweight, dbias)


def batch_norm(x, running_mean=None, running_var=None, weight=None, bias=None,
               training=False, momentum=0.1, eps=1e-5, *, layout="NCHW"):
    """Batch normalization in ``torch.nn.functional.batch_norm``'s argument order; returns ``y``.

    Argument order: ``x, running_mean, running_var, weight, bias, training, momentum,
    eps``, all positional or keyword, exactly as ``torch.nn.functional.batch_norm``;
    ``layout`` is keyword-only.  The default is ``training=False``, as in PyTorch.
    :func:`batch_norm_forward` takes the same arguments with the semantics described
    there, but in a different order (``x, weight, bias`` positional, running statistics
    keyword-only) and returns the saved statistics too.
    """
    y, _, _ = batch_norm_forward(x, weight, bias, running_mean=running_mean, running_var=running_var,
                                 training=training, momentum=momentum, eps=eps, layout=layout)
    return y
