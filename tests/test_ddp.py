"""Training under DistributedDataParallel: two gloo processes on CPU give a single process's gradients."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def test_ddp_two_processes_match_single_process(tmp_path):
    sys.path.insert(0, str(HERE))
    from ddp_worker import loss_of, model_and_data

    world = 2
    # Loopback only: gloo otherwise picks the interface of the hostname's address.
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    procs = [subprocess.Popen([sys.executable, str(HERE / "ddp_worker.py"), str(r), str(world),
                               str(tmp_path / "init"), str(tmp_path / f"grads{r}.pt")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(world)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    grads = [torch.load(tmp_path / f"grads{r}.pt") for r in range(world)]
    for n in grads[0]:
        assert torch.equal(grads[0][n], grads[1][n]), f"ranks disagree on {n}"

    model, x = model_and_data()
    rows = x.shape[1] // world
    # DDP averages the ranks' gradients: the single-process loss is the mean of the per-rank losses.
    total = sum(loss_of(model, x[:, r * rows:(r + 1) * rows]) for r in range(world)) / world
    total.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[0][n], p.grad, rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
