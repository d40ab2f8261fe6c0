"""Benchmark of the CUDA backend against PyTorch on a real GPU (not the simulator).

    python -m fastbn.cuda.bench_gpu [--iters 20] [--repeats 5]

For float32 and float16, NCHW (contiguous) and NHWC (``channels_last``) memory, and the
shapes of ResNet-50 training batches, it times

- fastbn training forward, backward (training) and eval forward;
- ``torch.nn.functional.batch_norm`` for the same three (backward through autograd,
  as a training step runs it; cuDNN where PyTorch picks it);
- a device-to-device copy of x's bytes (``torch.Tensor.copy_``): the memory-bandwidth
  floor of one read and one write of x.  Eval forward moves exactly that; training
  forward reads x twice (statistics, then y); backward reads x and dy twice and writes dx.

fastbn runs on zero-copy numba views of the torch tensors, on the same (legacy
default) stream as torch, so CUDA events recorded by torch time both.  Each entry is
the median over ``repeats`` of the mean time of ``iters`` back-to-back calls, host
launch overhead included, in milliseconds.  Requires torch with CUDA and a GPU.
"""

import argparse
import statistics

SHAPES = [(32, 64, 56, 56), (256, 64, 56, 56), (256, 256, 14, 14), (256, 2048, 7, 7)]


def _time_ms(torch, fn, iters, repeats):
    """Median over ``repeats`` of the mean duration of ``iters`` calls of ``fn`` (ms)."""
    fn()  # warm-up: compilation, cuDNN plans, allocator
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / iters)
    return statistics.median(samples)


def bench_case(torch, shape, dtype, channels_last, iters, repeats):
    """Timings (ms) of one shape / dtype / memory format: a dict keyed by row label."""
    import torch.nn.functional as F
    from numba import cuda

    import fastbn

    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    channels = shape[1]
    x = torch.randn(shape, device="cuda", dtype=dtype).contiguous(memory_format=memory_format)
    dy = torch.randn(shape, device="cuda", dtype=dtype).contiguous(memory_format=memory_format)
    copy_target = torch.empty_like(x)
    # Parameters and running statistics in float32 for float16 data (both libraries).
    weight = torch.rand(channels, device="cuda") + 0.5
    bias = torch.randn(channels, device="cuda")
    running_mean = torch.zeros(channels, device="cuda")
    running_var = torch.ones(channels, device="cuda")

    fx, fdy = cuda.as_cuda_array(x), cuda.as_cuda_array(dy)
    fw, fb = cuda.as_cuda_array(weight), cuda.as_cuda_array(bias)
    frm, frv = cuda.as_cuda_array(running_mean), cuda.as_cuda_array(running_var)
    _, save_mean, save_invstd = fastbn.batch_norm_forward(fx, fw, fb, running_mean=frm, running_var=frv,
                                                          training=True)

    x_grad = x.detach().requires_grad_(True)
    w_grad = weight.detach().requires_grad_(True)
    b_grad = bias.detach().requires_grad_(True)
    y_torch = F.batch_norm(x_grad, running_mean, running_var, w_grad, b_grad, training=True)

    return {
        "copy": _time_ms(torch, lambda: copy_target.copy_(x), iters, repeats),
        "fastbn train fwd": _time_ms(
            torch, lambda: fastbn.batch_norm_forward(fx, fw, fb, running_mean=frm, running_var=frv, training=True),
            iters, repeats),
        "torch train fwd": _time_ms(
            torch, lambda: F.batch_norm(x, running_mean, running_var, weight, bias, training=True),
            iters, repeats),
        "fastbn backward": _time_ms(
            torch, lambda: fastbn.batch_norm_backward(fdy, fx, save_mean, save_invstd, fw, training=True),
            iters, repeats),
        "torch backward": _time_ms(
            torch, lambda: torch.autograd.grad(y_torch, (x_grad, w_grad, b_grad), dy, retain_graph=True),
            iters, repeats),
        "fastbn eval fwd": _time_ms(
            torch, lambda: fastbn.batch_norm_forward(fx, fw, fb, running_mean=frm, running_var=frv, training=False),
            iters, repeats),
        "torch eval fwd": _time_ms(
            torch, lambda: F.batch_norm(x, running_mean, running_var, weight, bias, training=False),
            iters, repeats),
    }


def main(argv=None):
    """Run every case and print one table row per (shape, dtype, memory order)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=20, help="calls per timed sample")
    parser.add_argument("--repeats", type=int, default=5, help="timed samples per entry (median)")
    args = parser.parse_args(argv)

    import torch

    import fastbn.cuda

    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu needs PyTorch with CUDA and a GPU")
    print(f"# {fastbn.cuda.describe()}; torch {torch.__version__}; times in ms "
          f"(median of {args.repeats} x mean of {args.iters} calls)")
    columns = ["copy", "fastbn train fwd", "torch train fwd", "fastbn backward", "torch backward",
               "fastbn eval fwd", "torch eval fwd"]
    header = f"{'shape':>20} {'dtype':>8} {'memory':>6} " + " ".join(f"{c:>16}" for c in columns)
    print(header)
    for dtype in (torch.float32, torch.float16):
        for channels_last in (False, True):
            for shape in SHAPES:
                times = bench_case(torch, shape, dtype, channels_last, args.iters, args.repeats)
                print(f"{str(shape):>20} {str(dtype).replace('torch.', ''):>8} "
                      f"{'NHWC' if channels_last else 'NCHW':>6} "
                      + " ".join(f"{times[c]:16.3f}" for c in columns), flush=True)


if __name__ == "__main__":
    main()
