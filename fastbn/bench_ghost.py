"""``python -m fastbn.bench_ghost``: virtual (ghost) batches against plain batch norm on
the same array, side by side in one run (float32, training, outputs preallocated).

Forward is ``batch_norm_forward`` with running statistics; backward is
``batch_norm_backward`` from the forward's saved statistics.  Shapes are NCHW-ordered;
``NHWC`` is channel-last memory.  The ratio is ghost time / plain time (issue target:
<= 1.2 on (4096, 256) with k = 128).
"""

import argparse

import numpy as np

import fastbn
from fastbn._timing import best_per_call

#: (shape, virtual batch size) pairs of the issue.
GHOST_CASES = (((4096, 256), 128), ((32, 64, 56, 56), 8))
SMOKE_CASES = (((64, 16), 8), ((4, 3, 5, 5), 3))


def _inputs(shape, layout):
    rng = np.random.default_rng(0)
    x = (3.0 + 2.0 * rng.standard_normal(shape, dtype=np.float32))
    dy = rng.standard_normal(shape, dtype=np.float32)
    if layout == "NHWC" and len(shape) > 2:
        x, dy = (np.ascontiguousarray(np.moveaxis(a, 1, -1)) for a in (x, dy))
    return x, dy


def prepare(shape, layout, k, direction):
    """A zero-argument callable running one pass (``k`` None: plain batch norm)."""
    x, dy = _inputs(shape, layout)
    num_channels = shape[1]
    weight = np.linspace(0.5, 1.5, num_channels, dtype=np.float32)
    bias = np.linspace(-0.5, 0.5, num_channels, dtype=np.float32)
    running_mean, running_var = np.zeros(num_channels, np.float32), np.ones(num_channels, np.float32)
    out = np.empty_like(x)
    kwargs = dict(layout=layout, virtual_batch_size=k)
    _, mean, invstd = fastbn.batch_norm_forward(x, weight, bias, **kwargs)
    if direction == "forward":
        return lambda: fastbn.batch_norm_forward(x, weight, bias, running_mean=running_mean,
                                                 running_var=running_var, out=out, **kwargs)
    return lambda: fastbn.batch_norm_backward(dy, x, mean, invstd, weight, out=out, **kwargs)


def run(cases=GHOST_CASES, min_time=0.1, rounds=5):
    """Rows ``(shape, layout, k, direction, plain_s, ghost_s)``, printed as they come.

    Plain and ghost are timed alternately ``rounds`` times and each keeps its best, so a
    burst of load on a shared machine does not land on one side only."""
    print(f"{'shape':>18} {'layout':>6} {'k':>4} {'pass':>8} {'plain ms':>9} {'ghost ms':>9} {'ratio':>6}")
    rows = []
    for shape, k in cases:
        for layout in ("NCHW", "NHWC"):
            for direction in ("forward", "backward"):
                calls = prepare(shape, layout, None, direction), prepare(shape, layout, k, direction)
                plain, ghost = (min(times) for times in zip(*(
                    [best_per_call(call, min_time=min_time) for call in calls] for _ in range(rounds))))
                rows.append((shape, layout, k, direction, plain, ghost))
                print(f"{str(shape):>18} {layout:>6} {k:>4} {direction:>8} {plain * 1e3:9.3f} {ghost * 1e3:9.3f} "
                      f"{ghost / plain:6.2f}", flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fastbn.bench_ghost", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, a quick check that it runs")
    args = parser.parse_args(argv)
    run(SMOKE_CASES, min_time=0.01, rounds=1) if args.smoke else run()


if __name__ == "__main__":
    main()
