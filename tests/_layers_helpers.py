"""Helpers of the tests of fastbn.BatchNorm, the NumPy layer (``test_layers*.py``): its
inputs, the comparison with the float64 reference under the core tests' per-element bound
(:func:`_helpers.elementwise_atol`), and the state an exception must leave untouched."""

import os

import numpy as np

import fastbn

from _helpers import elementwise_atol, to_layout

SHAPE_NCHW = (6, 3, 4, 5)
C = SHAPE_NCHW[1]
#: Child Pythons import this checkout's fastbn, wherever pytest was started.
CHILD_ENV = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(fastbn.__file__))}


def make_input(rng, layout="NCHW", dtype=np.float64, shape_nchw=SHAPE_NCHW):
    """Data of mean ~2 and spread ~3 in ``dtype``, NCHW-ordered ``shape_nchw`` written in ``layout``."""
    return (2.0 + 3.0 * rng.standard_normal(to_layout(shape_nchw, layout))).astype(dtype)


def random_affine(layer, rng):
    """``layer`` with random weights in [0.5, 2) and standard-normal biases."""
    layer.weight[...] = rng.uniform(0.5, 2.0, C)
    layer.bias[...] = rng.standard_normal(C)
    return layer


def assert_close(actual, expected, dtype):
    """``actual`` within :func:`_helpers.elementwise_atol` of the float64 ``expected``."""
    atol = elementwise_atol(dtype, max(1.0, np.max(np.abs(expected))))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=atol)


def layer_state(layer):
    """Everything an exception must leave untouched."""
    return ({k: v.copy() for k, v in layer.state_dict().items()}, layer._saved, layer.training)


def assert_same_state(before, layer):
    """``layer`` holds the :func:`layer_state` ``before`` exactly."""
    state, saved, training = before
    after_state, after_saved, after_training = layer_state(layer)
    assert state.keys() == after_state.keys()
    for key in state:
        np.testing.assert_array_equal(after_state[key], state[key])
    assert after_saved is saved and after_training == training
