"""What a training step keeps and allocates (perf/NOTES.md, peak memory): the backward writes dG over the gates
the forward saved unless the graph is kept, and no gradient of an unused output is materialised as zeros."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import NAMES, leaf, make_problem
from tritonlstm import fused_lstm
from tritonlstm.functional import lstm_stack
from tritonlstm.kernels import lstm as kernels


class CreatedShapes(TorchDispatchMode):
    """Records the shape of every new tensor an ATen op returns, views aside (the autograd engine's zero-filled
    gradients included)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)}
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() not in inputs:
                self.shapes.append(tuple(o.shape))
        return out


@pytest.fixture
def backward_launches(monkeypatch):
    """(into_gates, dG is the saved gates buffer) for each backward launch."""
    seen = []
    for name in ("lstm_backward", "lstm_stack_backward"):
        real = getattr(kernels, name)

        def spy(gates, *a, _real=real, **k):
            out = _real(gates, *a, **k)
            seen.append((k.get("into_gates", False), out[0].data_ptr() == gates.data_ptr()))
            return out

        monkeypatch.setattr(kernels, name, spy)
    return seen


def _layer(T=6, B=5, H=12, lengths=None, problem=None):
    problem = make_problem(T, B, 7, H, torch.float32) if problem is None else problem
    p = leaf(problem)
    y, (hn, cn) = fused_lstm(*(p[n] for n in NAMES), lengths=lengths, backend="triton")
    return p, y, hn, cn


@pytest.mark.parametrize("lengths", [None, torch.tensor([6, 2, 5, 1, 6])], ids=["full", "lengths"])
def test_backward_writes_dg_over_the_saved_gates_and_allocates_no_gate_sized_tensor(backward_launches, lengths):
    T, B, H = 6, 5, 12
    p, y, hn, cn = _layer(T, B, H, lengths)
    loss = y.sum() + hn.square().sum()  # c_n unused: its gradient stays None
    with CreatedShapes() as mode:
        loss.backward()
    assert backward_launches == [(True, True)]
    assert (T, B, 4 * H) not in mode.shapes, "a gate-sized tensor was allocated in the backward"
    assert all(p[n].grad is not None for n in NAMES)


def test_retained_graph_keeps_the_gates_and_a_second_backward_gives_the_same_gradients(backward_launches):
    problem = make_problem(6, 5, 7, 12, torch.float32)
    p, y, hn, cn = _layer(problem=problem)
    loss = y.square().sum() + cn.sum()
    loss.backward(retain_graph=True)
    first = {n: p[n].grad.clone() for n in NAMES}
    loss.backward()  # through the same saved gates: they must not hold the first backward's dG
    assert backward_launches == [(False, False), (True, True)]
    for n in NAMES:
        torch.testing.assert_close(p[n].grad, 2 * first[n], rtol=1e-6, atol=1e-6)

    q, y2, _, cn2 = _layer(problem=problem)  # a single backward, graph released
    (y2.square().sum() + cn2.sum()).backward()
    for n in NAMES:
        torch.testing.assert_close(q[n].grad, first[n], rtol=0, atol=0)


def test_create_graph_keeps_the_gates(backward_launches):
    p, y, _, _ = _layer()
    torch.autograd.grad(y.sum(), p["x"], create_graph=True)
    assert backward_launches == [(False, False)]


@pytest.mark.parametrize("lengths", [None, torch.tensor([6, 2, 5, 1, 6])], ids=["full", "lengths"])
def test_stack_backward_writes_over_its_gates_unless_the_graph_is_kept(backward_launches, lengths):
    T, B, H, L = 6, 5, 12, 3
    layers = [make_problem(T, B, 7 if l == 0 else H, H, torch.float32) for l in range(L)]
    keys = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
    ws = [tuple(p[k].detach().requires_grad_() for k in keys) for p in layers]
    x = layers[0]["x"].detach().requires_grad_()
    y, (hn, cn) = lstm_stack(x, ws, lengths=lengths, backend="triton")
    loss = y.square().sum() + cn.sum()
    loss.backward(retain_graph=True)
    first = [x.grad.clone()] + [t.grad.clone() for w in ws for t in w]
    with CreatedShapes() as mode:
        loss.backward()
    assert backward_launches == [(False, False), (True, True)]
    assert (L, T, B, 4 * H) not in mode.shapes
    for a, b in zip([x.grad] + [t.grad for w in ws for t in w], first):
        torch.testing.assert_close(a, 2 * b, rtol=1e-6, atol=1e-6)


def test_custom_op_leaves_its_gates_output_as_returned(backward_launches):
    """Called as the custom op (torch.compile, opcheck, a user of torch.ops.tritonlstm), the saved gates are an
    output the caller holds: the backward must not write over them."""
    import tritonlstm.functional as F

    g = torch.Generator().manual_seed(0)
    T, B, H = 4, 3, 8
    gx = (torch.randn(T, B, 4 * H, generator=g) * 0.3).requires_grad_()
    w = (torch.randn(1, 4 * H, H, generator=g) * 0.3).requires_grad_()
    h0, c0 = torch.zeros(1, B, H), torch.zeros(1, B, H)
    y, hn, cn, gates, c_all = F._lstm_recurrence(gx, w, None, None, h0, c0, None, False, True)
    kept = gates.clone()
    y.sum().backward()
    assert backward_launches == [(False, False)]
    assert torch.equal(gates, kept)


@pytest.mark.parametrize("lengths", [None, torch.tensor([6, 2, 5, 1, 6])], ids=["full", "lengths"])
def test_training_forward_writes_the_gates_over_its_input_projection(monkeypatch, lengths):
    """The eager forward's activated gates go over gx (lstm_layer's own temporary): one gate-sized buffer in
    the forward, gx's. Not with lengths (the gates must be zero past each row's end)."""
    seen = []
    real = kernels.lstm_forward

    def spy(gx, *a, **k):
        out = real(gx, *a, **k)
        seen.append(out[3] is not None and out[3].data_ptr() == gx.data_ptr())
        return out

    monkeypatch.setattr(kernels, "lstm_forward", spy)
    T, B, H = 6, 5, 12
    problem = make_problem(T, B, 7, H, torch.float32)
    p = leaf(problem)
    with CreatedShapes() as mode:
        y, _ = fused_lstm(*(p[n] for n in NAMES), lengths=lengths, backend="triton")
    assert seen == [lengths is None]
    assert mode.shapes.count((T, B, 4 * H)) + mode.shapes.count((T * B, 4 * H)) == (1 if lengths is None else 2)


class LiveBytes(TorchDispatchMode):
    """The bytes of every storage an ATen op creates, held until it is freed, and their peak: the allocated memory
    of a step on the CPU, as the GPU's allocator would count it (without its rounding)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.held = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        import weakref

        out = func(*args, **(kwargs or {}))
        for o in torch.utils._pytree.tree_leaves(out):
            if isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() not in self.held:
                storage = o.untyped_storage()
                ptr, n = storage.data_ptr(), storage.nbytes()
                if ptr:
                    self.held.add(ptr)
                    self.live += n
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, ptr, n)
        return out

    def _free(self, ptr, n):
        self.live -= n
        self.held.discard(ptr)


def _float32_training_peak(monkeypatch, restage: bool, half: bool = False) -> int:
    import tritonlstm.functional as F
    from tritonlstm.kernels import matmul as mm

    monkeypatch.setattr(F, "_TF32_GEMMS_ON_CPU", True)
    monkeypatch.setattr(mm, "RESTAGE_MIN_FLOPS", 0 if restage else 2 ** 62)
    monkeypatch.setattr(mm, "HALF_MIN_FLOPS", 0 if half else 2 ** 62)
    monkeypatch.setattr(mm, "RESTAGE_WHOLE_BYTES", 0)
    monkeypatch.setattr(mm, "RESTAGE_MIN_BYTES", 0)
    p = leaf(make_problem(32, 16, 32, 32, torch.float32))
    with LiveBytes() as mode:
        y, _ = fused_lstm(*(p[n] for n in NAMES), backend="triton")
        y.backward(torch.ones_like(y))
    return mode.peak


def test_restaged_weight_gradients_add_at_most_their_staging_to_the_peak(monkeypatch):
    """v0.37: the float32 GEMMs restage gathered operands in chunks of K; a training step's peak grows by at most
    one chunk's staging of the largest product (dW: [4H, chunk] and [H, chunk], float32), not by a copy of dG.
    Sixteenths of T*B = 512 rows are 32 (the GEMM's BK)."""
    H, chunk = 32, 32
    gathered = _float32_training_peak(monkeypatch, restage=False)
    restaged = _float32_training_peak(monkeypatch, restage=True)
    assert gathered < restaged <= gathered + 4 * (4 * H + H) * chunk, (gathered, restaged)


def test_float16_gemms_add_at_most_the_input_gradients_staging_to_the_peak(monkeypatch):
    """v0.43: the input projection on row-scaled float16 operands (and, until run 7, the input gradient). x's rows
    are converted at once in the forward, below the backward's peak; the peak grows by at most an input gradient's
    staging: W_ih [4H, I] in float16 and one chunk of dG's rows ([32, 4H] float16, a sixteenth of T*B = 512), with
    their int32 exponents. Not by a float16 copy of dG (T*B*4H*2 = 128 KB here), nor of x (32 KB)."""
    H, I, chunk = 32, 32, 32
    gathered = _float32_training_peak(monkeypatch, restage=False)
    half = _float32_training_peak(monkeypatch, restage=False, half=True)
    assert half <= gathered + 2 * 4 * H * I + 4 * I + (2 * 4 * H + 4) * chunk, (gathered, half)
