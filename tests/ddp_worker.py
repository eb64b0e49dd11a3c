"""One rank of the two-process DDP test (tests/test_ddp.py): trains one step, saves its gradients."""

import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import tritonlstm  # noqa: E402


def model_and_data():
    torch.manual_seed(0)
    model = tritonlstm.LSTM(3, 5, num_layers=2, bidirectional=True, backend="triton")
    x = torch.randn(4, 6, 3)  # T, B, I: ranks take 3 rows each
    return model, x


def loss_of(model, x):
    y, (h, c) = model(x)
    return (y * y).sum() / x.shape[1] + c.sum() / x.shape[1]


if __name__ == "__main__":
    rank, world, init_file, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model, x = model_and_data()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    rows = x.shape[1] // world
    loss_of(ddp, x[:, rank * rows:(rank + 1) * rows]).backward()
    torch.save({n: p.grad for n, p in model.named_parameters()}, out)
    dist.barrier()
    dist.destroy_process_group()
    # gloo's background threads can abort the process in C++ static destruction ("terminate called without an
    # active exception", seen intermittently under load); the results are saved, so leave without it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
