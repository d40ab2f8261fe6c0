"""fastbn.torch.SyncBatchNorm over torch.distributed (gloo on 127.0.0.1, CPU tensors),
2 and 3 processes spawned here, against single-process torch; the worker is
tests/distributed/torch_worker.py."""

import subprocess
import sys

import pytest

pytest.importorskip("torch")
import torch.distributed  # noqa: E402

from _distributed_launch import WORKERS, env, free_port, result_of  # noqa: E402

if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

TIMEOUT = 240


@pytest.mark.parametrize("world", [2, 3])
def test_sync_batchnorm_and_ddp_match_single_process(world, capsys):
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
        print(f"\ngloo, {world} processes: worst differences {result['worst']}")
