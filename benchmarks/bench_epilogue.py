"""asv benchmarks: fused epilogues (ReLU, residual add + ReLU) against batch norm alone,
forward and backward, on fastbn's CPU kernels; see :mod:`fastbn.bench_epilogue` for the
side-by-side table with the unfused passes.  ``FASTBN_ASV_SMOKE=1`` uses a tiny shape."""

import numpy as np

import fastbn
from fastbn import bench as fbench

SHAPE = (2, 4, 8, 8) if fbench.smoke() else (32, 64, 56, 56)
EPILOGUES = ["none", "relu", "add_relu"]


class Epilogue:
    params = (["forward", "backward"], list(fbench.LAYOUTS), EPILOGUES)
    param_names = ["op", "layout", "epilogue"]
    timeout = 300

    def setup(self, op, layout, epilogue):
        rng = np.random.default_rng(0)
        shape = SHAPE if layout == "NCHW" else (SHAPE[0], *SHAPE[2:], SHAPE[1])
        x = rng.standard_normal(shape, dtype=np.float32)
        residual = rng.standard_normal(shape, dtype=np.float32) if epilogue == "add_relu" else None
        activation = None if epilogue == "none" else "relu"
        out = np.empty_like(x)
        y, mean, invstd = fastbn.batch_norm_forward(x, layout=layout, activation=activation, residual=residual)
        if op == "forward":
            def run():
                fastbn.batch_norm_forward(x, layout=layout, activation=activation, residual=residual, out=out)
        else:
            dy = rng.standard_normal(shape, dtype=np.float32)
            mask = y if activation else None

            def run():
                fastbn.batch_norm_backward(dy, x, mean, invstd, layout=layout, activation=activation, y=mask,
                                           residual=residual is not None, out=out)
        self.run = run
        run()  # compile (or load from the disk cache) outside the timing

    def time_epilogue(self, op, layout, epilogue):
        self.run()
