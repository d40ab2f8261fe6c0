"""State a call must not lose: a call that raises leaves the running statistics, ``out``
and ``x`` exactly as they were (every check runs before any kernel), and inputs are
never written, so read-only inputs are accepted.

All comparisons are bit-exact (``assert_array_equal``): nothing may be written, so there
is no rounding to allow for.
"""

import numpy as np
import pytest

from _helpers import LAYOUTS, B, F, _ro, _x


def _stateful_args(x):
    c = x.shape[1]
    return dict(running_mean=np.arange(c, dtype=x.dtype), running_var=np.arange(1, c + 1, dtype=x.dtype),
                out=np.full(x.shape, 7.0, x.dtype))


@pytest.mark.parametrize("bad", ["weight", "bias", "eps", "momentum", "layout", "out_dtype", "x_one_value"])
def test_failed_call_leaves_running_stats_and_out_untouched(bad):
    x = _x((4, 3, 5)) if bad != "x_one_value" else _x((1, 3))
    args = _stateful_args(x)
    kwargs = dict(training=True)
    weight = bias = None
    if bad == "weight":
        weight = np.ones(4, np.float32)
    elif bad == "bias":
        bias = np.ones(3, np.float64)
    elif bad == "eps":
        kwargs["eps"] = -1.0
    elif bad == "momentum":
        kwargs["momentum"] = 2.0
    elif bad == "layout":
        kwargs["layout"] = "NCWH"
    elif bad == "out_dtype":
        args["out"] = np.full(x.shape, 7.0, np.float64)
    before = {k: v.copy() for k, v in args.items()}
    x_before = x.copy()
    with pytest.raises((ValueError, TypeError)):
        F(x, weight, bias, running_mean=args["running_mean"], running_var=args["running_var"],
          out=args["out"], **kwargs)
    for k, v in args.items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)
    np.testing.assert_array_equal(x, x_before)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("training", [True, False])
def test_inputs_are_never_written(layout, training):
    """Read-only inputs are accepted (no write is even attempted) and stay bit-identical."""
    x = _ro(_x((3, 4, 5, 6) if layout == "NCHW" else (3, 5, 6, 4), np.float32, seed=3))
    w, b = _ro(np.linspace(0.5, 1.5, 4).astype(np.float32)), _ro(np.linspace(-1, 1, 4).astype(np.float32))
    rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
    if not training:  # eval only reads the running stats: read-only is fine
        rm, rv = _ro(rm), _ro(rv)
    snapshot = [a.copy() for a in (x, w, b)]
    y, mean, invstd = F(x, w, b, running_mean=rm, running_var=rv, training=training, layout=layout)
    dy = _ro(_x(x.shape, np.float32, seed=4))
    mean, invstd = _ro(mean), _ro(invstd)
    dx, dw, db = B(dy, x, mean, invstd, w, training=training, layout=layout)
    for a, s in zip((x, w, b), snapshot):
        np.testing.assert_array_equal(a, s)
    assert not np.shares_memory(y, x) and not np.shares_memory(dx, dy) and not np.shares_memory(dx, x)
