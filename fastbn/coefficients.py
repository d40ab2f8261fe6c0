"""The per-channel coefficients the elementwise passes apply (values of the pipeline's
coefficient stages, :mod:`fastbn.stages`).

All vectors have shape (C,) and live where the data lives (NumPy or CUDA device arrays).
"""

from typing import NamedTuple

import numpy as np


class ForwardCoefficients(NamedTuple):
    """``y = (x - center) * scale + shift`` per channel, and the statistics behind it.

    center, scale, shift : (C,) in the compute dtype of x's dtype (:mod:`fastbn.dtypes`);
        ``center`` is the mean rounded to it, its remainder folded into ``shift``.
    mean, invstd : (C,) in the statistics dtype: the mean and ``1 / sqrt(var + eps)``
        normalized with, what :func:`fastbn.batch_norm_backward` takes as
        ``save_mean`` and ``save_invstd``.
    """

    center: np.ndarray
    scale: np.ndarray
    shift: np.ndarray
    mean: np.ndarray
    invstd: np.ndarray


class BackwardCoefficients(NamedTuple):
    """``dx = dy * dy_scale + (x - center) * x_scale + shift`` per channel.

    All four (C,) in the compute dtype of x's dtype.  In eval mode (statistics held
    constant) ``center``, ``x_scale`` and ``shift`` are 0.
    """

    center: np.ndarray
    dy_scale: np.ndarray
    x_scale: np.ndarray
    shift: np.ndarray
