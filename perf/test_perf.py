"""pytest-benchmark suite, tritonlstm against cuDNN per shape (GPU only; not part of the CI test run).

    pytest perf/ --benchmark-only --benchmark-group-by=param:shape

Each timed call synchronises CUDA inside the timed function. Every test skips cleanly without a GPU.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SHAPES = [pytest.param((d, h, b), id=f"{d}-H{h}-B{b}") for d in ("float16", "bfloat16", "float32")
          for h in (256, 512, 1024) for b in (1, 16, 64, 256)]


def _setup(shape, train):
    from tritonlstm import LSTM

    dtype_name, hidden, batch = shape
    dtype = getattr(torch, dtype_name)
    ref = torch.nn.LSTM(hidden, hidden).to("cuda", dtype)
    ours = LSTM(hidden, hidden, backend="triton").to("cuda", dtype)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(256, batch, hidden, device="cuda", dtype=dtype, requires_grad=train)
    return {"tritonlstm": ours, "cudnn": ref}, x


def _step(model, x, train):
    def run():
        if train:
            y, _ = model(x)
            y.backward(torch.ones_like(y))
        else:
            with torch.no_grad():
                model(x)
        torch.cuda.synchronize()
    return run


@pytest.mark.parametrize("impl", ["tritonlstm", "cudnn"])
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("shape", SHAPES)
def test_lstm(benchmark, shape, mode, impl):
    models, x = _setup(shape, mode == "fwdbwd")
    benchmark.group = f"{shape[0]}-H{shape[1]}-B{shape[2]}-{mode}"
    run = _step(models[impl], x, mode == "fwdbwd")
    run()  # compile and warm up outside the measurement
    benchmark.pedantic(run, rounds=20, warmup_rounds=3)


STACKS = [pytest.param((d, layers, dropout), id=f"{d}-L{layers}-dropout{dropout}") for d in ("float16", "bfloat16")
          for layers in (2, 4) for dropout in (0.0, 0.3)]


@pytest.mark.parametrize("impl", ["tritonlstm", "cudnn"])
@pytest.mark.parametrize("stack", STACKS)
def test_stack_training_with_and_without_dropout(benchmark, stack, impl):
    """A training step of a unidirectional stack at H = 512, B = 16, T = 256, with dropout between its layers
    or none: dropout runs inside tritonlstm's wavefronts, so both should cost about the same there (perf/NOTES.md
    v0.6). The bench cannot hold these rows: its cells are checked against cuDNN, whose dropout masks differ."""
    from tritonlstm import LSTM

    dtype_name, layers, dropout = stack
    dtype = getattr(torch, dtype_name)
    ref = torch.nn.LSTM(512, 512, num_layers=layers, dropout=dropout).to("cuda", dtype)
    ours = LSTM(512, 512, num_layers=layers, dropout=dropout, backend="triton").to("cuda", dtype)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(256, 16, 512, device="cuda", dtype=dtype, requires_grad=True)
    benchmark.group = f"stack-train-{dtype_name}-L{layers}-dropout{dropout}"
    run = _step({"tritonlstm": ours, "cudnn": ref}[impl], x, True)
    run()
    benchmark.pedantic(run, rounds=20, warmup_rounds=3)


PACKED = [pytest.param((d, mode, packed), id=f"{d}-{mode}-{'packed' if packed else 'padded'}")
          for d in ("float16", "bfloat16", "float32") for mode in ("fwd", "fwdbwd") for packed in (True, False)]


@pytest.mark.parametrize("impl", ["tritonlstm", "cudnn"])
@pytest.mark.parametrize("case", PACKED)
def test_packed_against_padded(benchmark, case, impl):
    """H = 512, B = 16, T = 256, one layer: the same batch as a PackedSequence (lengths T/4..T, unsorted) and
    padded. Packed input used to cost ~4T small copies a training call in tritonlstm (pad_packed_sequence and
    back); since v0.28 it is one scatter and one gather (perf/NOTES.md): packed should cost about what padded
    does. The packing of the input is inside the timed call, for both implementations alike."""
    from torch.nn.utils.rnn import pack_padded_sequence

    from tritonlstm import LSTM

    dtype_name, mode, packed = case
    dtype = getattr(torch, dtype_name)
    ref = torch.nn.LSTM(512, 512).to("cuda", dtype)
    ours = LSTM(512, 512, backend="triton").to("cuda", dtype)
    ours.load_state_dict(ref.state_dict())
    model = {"tritonlstm": ours, "cudnn": ref}[impl]
    train = mode == "fwdbwd"
    x = torch.randn(256, 16, 512, device="cuda", dtype=dtype, requires_grad=train)
    lengths = torch.randint(64, 257, (16,), generator=torch.Generator().manual_seed(0))
    lengths[3] = 256

    def run():
        with torch.set_grad_enabled(train):
            y, _ = model(pack_padded_sequence(x, lengths, enforce_sorted=False) if packed else x)
            if train:
                (y.data if packed else y).sum().backward()
        torch.cuda.synchronize()

    benchmark.group = f"packed-{dtype_name}-{mode}"
    run()
    benchmark.pedantic(run, rounds=20, warmup_rounds=3)


CELLS = [pytest.param((d, b), id=f"{d}-B{b}") for d in ("float16", "float32") for b in (16, 128)]


@pytest.mark.parametrize("impl", ["tritonlstm", "cudnn"])
@pytest.mark.parametrize("cell", CELLS)
def test_cell_loop(benchmark, cell, impl):
    """LSTMCell stepped from Python, as a decoder runs it: 64 steps at H = 512, no grad. On the CPU the host path
    of one tritonlstm step costs ~86 us (v0.32; ~110-150 before) against nn.LSTMCell's ~40-55 (perf/NOTES.md v0.7,
    v0.32); this says what a GPU host makes of it, against nn.LSTMCell (two GEMMs and a fused pointwise kernel)."""
    from tritonlstm import LSTMCell

    dtype_name, batch = cell
    dtype = getattr(torch, dtype_name)
    ref = torch.nn.LSTMCell(512, 512).to("cuda", dtype)
    ours = LSTMCell(512, 512, backend="triton").to("cuda", dtype)
    ours.load_state_dict(ref.state_dict())
    model = {"tritonlstm": ours, "cudnn": ref}[impl]
    xs = torch.randn(64, batch, 512, device="cuda", dtype=dtype)

    def run():
        with torch.no_grad():
            h = c = torch.zeros(batch, 512, device="cuda", dtype=dtype)
            for x in xs:
                h, c = model(x, (h, c))
        torch.cuda.synchronize()

    benchmark.group = f"cell-loop-{dtype_name}-B{batch}"
    run()
    benchmark.pedantic(run, rounds=20, warmup_rounds=3)
