"""The custom ops behind the layer functions, as torch.library sees them (schema, fake tensors, autograd
registration, AOT tracing), and their eager path: the same results either way."""

from __future__ import annotations

import pytest
import torch

from tritonlstm import functional as F


def _r(g, *shape):
    return torch.randn(*shape, generator=g) * 0.3


@pytest.mark.parametrize("states", [True, False], ids=["states", "zero-states"])
@pytest.mark.parametrize("training", [False, True], ids=["infer", "train"])
def test_opcheck_recurrence(training, states):
    g = torch.Generator().manual_seed(0)
    T, B, H = 3, 2, 8
    h0, c0 = (_r(g, 2, B, H), _r(g, 2, B, H)) if states else (None, None)  # None: zeros
    args = (_r(g, T, B, 8 * H).requires_grad_(training), _r(g, 2, 4 * H, H).requires_grad_(training),
            _r(g, 2, 4 * H).requires_grad_(training), _r(g, 2, 4 * H).requires_grad_(training), h0, c0,
            torch.tensor([3, 2]), False, training)
    torch.library.opcheck(F._lstm_recurrence, args)


@pytest.mark.parametrize("training", [False, True], ids=["infer", "train"])
def test_opcheck_stack_with_dropout(training):
    g = torch.Generator().manual_seed(1)
    T, B, H, L = 3, 2, 8, 2
    drop = (torch.rand(L - 1, T, B, H, generator=g) > 0.5).float() * 2
    args = (_r(g, T, B, 4 * H).requires_grad_(training), _r(g, L - 1, 4 * H, H).requires_grad_(training),
            _r(g, L, 4 * H, H).requires_grad_(training), _r(g, L, 4 * H).requires_grad_(training),
            _r(g, L, 4 * H).requires_grad_(training), _r(g, L, B, H), _r(g, L, B, H), None, drop, training)
    torch.library.opcheck(F._lstm_stack, args)


def test_eager_path_and_custom_op_agree(monkeypatch):
    """The eager path (the ops' functions under a plain autograd.Function) against the custom ops themselves,
    forced by making every argument look non-plain: outputs and gradients equal."""
    g = torch.Generator().manual_seed(2)
    x, w_ih, w_hh = _r(g, 4, 3, 5), _r(g, 32, 5), _r(g, 32, 8)
    results = []
    for plain in (True, False):
        monkeypatch.setattr(F, "_plain", lambda *tensors, plain=plain: plain)
        leaves = [t.detach().clone().requires_grad_() for t in (x, w_ih, w_hh)]
        y, (h, c) = F.fused_lstm(*leaves, backend="triton")
        (y.square().sum() + c.sum()).backward()
        results.append([y, h, c, *(t.grad for t in leaves)])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("lengths", [None, [4, 1, 3]], ids=["padded", "lengths"])
def test_recurrent_weight_grad_pairs_each_step_with_the_h_it_saw(reverse, lengths):
    """dW_hh from y and h0 in place (no shifted copy) against the sum over (t, b) written out, with y zero past
    each row's end as the kernels leave it."""
    from tritonlstm.functional import _recurrent_weight_grad

    T, B, H = 4, 3, 5
    lens = torch.tensor(lengths) if lengths is not None else torch.full((B,), T)
    live = torch.arange(T)[:, None] < lens[None, :]
    dg = torch.randn(T, B, 4 * H, dtype=torch.float64) * live[..., None]
    y = torch.randn(T, B, H, dtype=torch.float64) * live[..., None]
    h0 = torch.randn(B, H, dtype=torch.float64)
    expected = torch.zeros(4 * H, H, dtype=torch.float64)
    for b in range(B):
        n = int(lens[b])
        for t in range(n):
            prev = (h0[b] if t == n - 1 else y[t + 1, b]) if reverse else (h0[b] if t == 0 else y[t - 1, b])
            expected += torch.outer(dg[t, b], prev)
    got = _recurrent_weight_grad(dg, y, h0, None if lengths is None else torch.tensor(lengths), reverse)
    torch.testing.assert_close(got, expected)
