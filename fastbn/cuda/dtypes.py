"""The dtypes each input dtype computes with on the GPU (the one place they are chosen).

=========  ============  ==========================  ===========================
input      accumulator   statistics returned          elementwise arithmetic and
           (sums)        (save_mean, save_invstd,      weight / bias / running
                         batch_stats)                 statistics
=========  ============  ==========================  ===========================
float16    float32       float32                     float32
float32    float64       float64                     float32
float64    float64       float64                     float64
=========  ============  ==========================  ===========================

float32 inputs accumulate in float64 and return float64 statistics, as the CPU
backend does, so offset data (x = 1e4 + randn) keeps its variance and the backward pass
sees the mean unrounded.  float16 inputs accumulate in float32: that is exact enough
for 11-bit data and fast on every GPU.
"""

import numpy as np

FLOAT16, FLOAT32, FLOAT64 = np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)

#: Input dtypes the CUDA backend accepts.
FLOAT_DTYPES = (FLOAT16, FLOAT32, FLOAT64)
#: dtypes accepted for save_mean / save_invstd passed back to the backward pass.
STAT_DTYPES = (FLOAT32, FLOAT64)


def accumulator_dtype(dtype):
    """Sums and returned statistics: float32 for float16 input, float64 otherwise."""
    return FLOAT32 if np.dtype(dtype) == FLOAT16 else FLOAT64


def compute_dtype(dtype):
    """Elementwise arithmetic, weight, bias and running statistics: float32 for float16."""
    return FLOAT32 if np.dtype(dtype) == FLOAT16 else np.dtype(dtype)
