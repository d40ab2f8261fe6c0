"""fastbn.torch.SyncBatchNorm over torch.distributed (gloo on 127.0.0.1, CPU tensors),
3 processes spawned here (and a process group of 2 of them), against single-process torch, and fastbn.distributed's
mismatch and invalid-rank errors on gloo (tests/distributed/error_cases.py, the cases the
MPI test runs); the worker is tests/distributed/torch_worker.py.  A hang fails the test:
the ranks' collectives time out (gloo, 120 s) and the test kills them after TIMEOUT."""

import subprocess
import sys

import pytest

pytest.importorskip("torch")
import torch.distributed  # noqa: E402

from _distributed_launch import WORKERS, env, free_port, result_of  # noqa: E402

if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

TIMEOUT = 240


def test_sync_batchnorm_and_ddp_match_single_process(capsys):
    """One job of 3 processes: SyncBatchNorm and the errors on all 3 and on the process
    group of ranks 0 and 1 (2 processes), DDP training on all 3."""
    world = 3
    port = free_port()
    procs = [subprocess.Popen([sys.executable, str(WORKERS / "torch_worker.py"), str(r), str(world), str(port)],
                              env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(world)]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=TIMEOUT))
    finally:
        for p in procs:
            if p.poll() is None:  # a hang fails the test; never leave ranks behind
                p.kill()
                p.communicate()
    done = subprocess.CompletedProcess(procs[0].args, procs[0].returncode, *outputs[0])
    result = result_of(done)
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-4000:]
    assert result["failures"] == [], "\n".join(result["failures"])
    with capsys.disabled():
        print(f"\ngloo, {world} processes (and a group of 2): worst differences {result['worst']}")


# --------------------------------------------------------------------------- one process

import torch  # noqa: E402

import fastbn.torch as ftorch  # noqa: E402


def test_same_constructor_attributes_and_state_dict_as_torch():
    ours, theirs = ftorch.SyncBatchNorm(5, momentum=None), torch.nn.SyncBatchNorm(5, momentum=None)
    assert isinstance(ours, torch.nn.modules.batchnorm._BatchNorm)
    assert not isinstance(ours, torch.nn.SyncBatchNorm)  # DDP refuses those in CPU modules
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for name in ("num_features", "eps", "momentum", "affine", "track_running_stats", "process_group"):
        assert getattr(ours, name) == getattr(theirs, name)
    ours.load_state_dict(theirs.state_dict())
    assert ftorch.SyncBatchNorm.__module__ == "fastbn.torch"


@pytest.mark.parametrize("training", [True, False])
def test_without_process_group_behaves_like_batchnorm(training):
    """No initialized process group (or eval): a local BatchNorm, no communication."""
    assert not torch.distributed.is_initialized()
    torch.manual_seed(0)
    ours, ref = ftorch.SyncBatchNorm(3).double(), torch.nn.BatchNorm2d(3).double()
    ours.train(training)
    ref.train(training)
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64) + 1
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = ours(x1), ref(x2)
    (y1 * x).sum().backward()
    (y2 * x).sum().backward()
    torch.testing.assert_close(y1, y2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-12, atol=1e-12)
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked)
    with pytest.raises(ValueError, match="expected at least 2D input"):
        ours(torch.randn(3))


def test_convert_sync_batchnorm_shares_parameters_and_buffers():
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1), torch.nn.BatchNorm2d(3), ftorch.BatchNorm1d(4),
                                torch.nn.Sequential(torch.nn.BatchNorm3d(2, affine=False)))
    model.eval()
    old = [model[1], model[2], model[3][0]]
    converted = ftorch.convert_sync_batchnorm(model, process_group=None)
    assert converted is model
    for new, before in zip([model[1], model[2], model[3][0]], old):
        assert type(new) is ftorch.SyncBatchNorm and new.num_features == before.num_features
        assert new.weight is before.weight and new.running_mean is before.running_mean
        assert new.affine == before.affine and new.training is False
    assert isinstance(ftorch.convert_sync_batchnorm(torch.nn.BatchNorm1d(2)), ftorch.SyncBatchNorm)
