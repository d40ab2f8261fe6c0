"""The public forward and backward passes in the fewest launches: the stages of
:mod:`fastbn.cuda.stages`, composed with the per-channel steps folded into the
reduction kernel's last block.

=================  ===============================================  ========
call               launches                                         count
=================  ===============================================  ========
training forward   moments + merge + coefficients (+ running) ;     2
                   apply
eval forward       coefficients (per block, in shared memory) +      1
                   apply
backward           sums + merge + dweight/dbias + coefficients ;    2
                   apply
=================  ===============================================  ========

Intermediates (merged statistics, coefficient vectors, partials) live in the
:mod:`fastbn.cuda.workspace`; only the results the caller gets are allocated, from the
caller's library.  The per-channel formulas are those of :mod:`fastbn.algebra`, called
from :func:`fastbn.cuda.channels.finish_moments` / ``finish_sums``, so results equal
the stage-by-stage composition's.
"""

from .. import dtypes
from . import channels, streams, views, workspace
from .arrays import as_numba
from .elementwise import MAX_DYNAMIC_SHARED, eval_shared_bytes, launch_apply_eval
from .plans import channel_grid
from .stages import (FLOAT64, _apply_kernel, _backward_apply_kernel, _launch, _new, _numba, _on_device_of,
                     _partials, epilogue_floor, launch_moments, launch_sums, plane_size, reduction)


def _vectors(caller, stream, name, number, num_channels, dtype):
    """``number`` (C,) scratch vectors of ``dtype`` for this call."""
    buffer = workspace.scratch(streams.device_of(caller), stream, name, number * num_channels, dtype)
    return tuple(buffer[i * num_channels:(i + 1) * num_channels] for i in range(number))


@_on_device_of(lambda x, *rest: x)
def forward(x, weight, bias, running_mean, running_var, training, momentum, eps, geom, out, dtype,
            residual=None, activation=None):
    """``(y, save_mean, save_invstd)`` of :func:`fastbn.batch_norm_forward`, with its
    optional epilogue ``activation(... + residual)`` in the apply launch; ``x`` dense in
    ``geom``'s order, arguments checked."""
    policy = dtypes.policy(dtype)
    caller, stream = x, streams.for_array(x)
    x, weight, bias, running_mean, running_var = _numba(x, weight, bias, running_mean, running_var)
    xf = views.kernel_input(x, geom, stream, caller)
    rf = None if residual is None else views.kernel_input(as_numba(residual), geom, stream, caller)
    inputs = (xf,) if rf is None else (xf, rf)
    floor = epilogue_floor(activation, x.dtype)
    num_channels = geom.kept
    saved = _new(caller, stream, 2, num_channels, policy.statistics)
    save_mean, save_invstd = _numba(*saved)
    big = dtypes.largest(policy.compute)
    shared_bytes = eval_shared_bytes(num_channels, x.dtype)
    if not training and shared_bytes <= MAX_DYNAMIC_SHARED:
        native, target = views.output_target(as_numba(out), inputs, geom, x.dtype, caller, stream)
        # Absent optional vectors are placeholders of their dtype, read only under their flag.
        launch_apply_eval(xf, rf, target, floor, plane_size(geom), num_channels,
                          (running_mean, running_var, running_mean if weight is None else weight,
                           running_mean if bias is None else bias, weight is not None, bias is not None, eps, big,
                           save_mean, save_invstd), stream)
        return views.finish_output(native, target, out, geom, stream), saved[0], saved[1]
    center, scale, shift = _vectors(caller, stream, "forward.coefficients", 3, num_channels, policy.compute)
    # Absent optional vectors are placeholders of their dtype, read only under their flag.
    weight_ = scale if weight is None else weight
    bias_ = shift if bias is None else bias
    if training:
        red = reduction(geom, xf)
        partials, counters = _partials(caller, stream, "moments", 3, num_channels, red.plan.num_partials)
        moments = _vectors(caller, stream, "forward.moments", 3, num_channels, FLOAT64)
        update = running_mean is not None
        finish = (True, weight_, bias_, weight is not None, bias is not None, eps, big, momentum,
                  center if running_mean is None else running_mean, center if running_var is None else running_var,
                  update, save_mean, save_invstd, center, scale, shift)
        launch_moments(red, stream, partials, counters, moments, finish)
    else:  # too many channels for the one-launch eval's shared memory
        _launch(channels.forward_coefficients, channel_grid(num_channels), stream,
                running_mean, running_mean, running_var, False, weight_, bias_,
                weight is not None, bias is not None, eps, big, 0.0, center, center, False,
                save_mean, save_invstd, center, scale, shift)
    native, target = views.output_target(as_numba(out), inputs, geom, x.dtype, caller, stream)
    _apply_kernel(xf, target, geom, x.dtype, stream, center, scale, shift, residual=rf, activation=activation)
    return views.finish_output(native, target, out, geom, stream), saved[0], saved[1]


@_on_device_of(lambda dy, x, *rest: x)
def backward(dy, x, save_mean, save_invstd, weight, training, geom, out, dtype):
    """``(dx, dweight, dbias)`` of :func:`fastbn.batch_norm_backward`; ``dy`` and ``x``
    dense in ``geom``'s order, arguments checked."""
    policy = dtypes.policy(dtype)
    caller, stream = x, streams.for_array(x)
    dy, x, mean, invstd, weight = _numba(dy, x, save_mean, save_invstd, weight)
    dyf, xf = views.kernel_input(dy, geom, stream, caller), views.kernel_input(x, geom, stream, caller)
    num_channels = geom.kept
    red = reduction(geom, dyf, xf)
    partials, counters = _partials(caller, stream, "sums", 2, num_channels, red.plan.num_partials)
    sums = _vectors(caller, stream, "backward.sums", 3, num_channels, FLOAT64)
    center, dy_scale, x_scale, shift = _vectors(caller, stream, "backward.coefficients", 4, num_channels,
                                                policy.compute)
    gradients = _new(caller, stream, 2, num_channels, policy.parameters)
    dweight, dbias = _numba(*gradients)
    finish = (True, invstd, dy_scale if weight is None else weight, weight is not None, bool(training),
              dtypes.largest(policy.compute), dweight, dbias, center, dy_scale, x_scale, shift)
    launch_sums(red, mean, stream, partials, counters, sums, finish)
    if training:
        native, target = views.output_target(as_numba(out), (dyf, xf), geom, x.dtype, caller, stream)
        _backward_apply_kernel(dyf, xf, target, geom, x.dtype, stream, center, dy_scale, x_scale, shift)
    else:
        native, target = views.output_target(as_numba(out), (dyf,), geom, x.dtype, caller, stream)
        _apply_kernel(dyf, target, geom, x.dtype, stream, center, dy_scale, shift)
    return views.finish_output(native, target, out, geom, stream), gradients[0], gradients[1]
