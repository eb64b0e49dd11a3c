"""GPU tests: the persistent multi-program kernels against cuDNN (torch.nn.LSTM) with copied weights.

Run on a CUDA machine with `TRITONLSTM_TEST_GPU=1 pytest -m gpu tests/` (without it the suite runs the
kernels on the CPU interpreter and these are skipped)."""

from __future__ import annotations

import pytest
import torch
from helpers import RESOLUTION_GPU, rel_err

from tritonlstm import fused_lstm
from tritonlstm.configs import select_config

pytestmark = pytest.mark.gpu

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def cudnn_and_weights(I, H, dtype):
    m = torch.nn.LSTM(I, H).to("cuda", dtype)
    w = (m.weight_ih_l0, m.weight_hh_l0, m.bias_ih_l0, m.bias_hh_l0)
    return m, [p.detach().clone().requires_grad_() for p in w]


def run_both(T, B, H, dtype, *, backward=True):
    I = H
    m, w = cudnn_and_weights(I, H, dtype)
    x = torch.randn(T, B, I, device="cuda", dtype=dtype)
    h0 = torch.randn(B, H, device="cuda", dtype=dtype) * 0.5
    c0 = torch.randn(B, H, device="cuda", dtype=dtype) * 0.5
    xs = [x.clone().requires_grad_() for _ in range(2)]
    s0 = [(h0.clone().requires_grad_(), c0.clone().requires_grad_()) for _ in range(2)]
    y_ref, (hn_ref, cn_ref) = m(xs[0], (s0[0][0][None], s0[0][1][None]))
    y, (hn, cn) = fused_lstm(xs[1], *w, s0[1][0], s0[1][1], backend="triton")
    tol = RESOLUTION_GPU[dtype] * 2
    errs = {"y": rel_err(y, y_ref), "h_n": rel_err(hn, hn_ref[0]), "c_n": rel_err(cn, cn_ref[0])}
    if backward:
        gy = torch.randn_like(y)
        (y_ref * gy).sum().backward()
        (y * gy).sum().backward()
        refs = [xs[0], m.weight_ih_l0, m.weight_hh_l0, m.bias_ih_l0, m.bias_hh_l0, *s0[0]]
        ours = [xs[1], *w, *s0[1]]
        for name, a, b in zip(("dx", "dw_ih", "dw_hh", "db_ih", "db_hh", "dh0", "dc0"), ours, refs):
            errs[name] = rel_err(a.grad, b.grad)
    bad = {k: v for k, v in errs.items() if not v <= tol}
    assert not bad, f"over {tol}: {bad}; all {errs}"
    return errs


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("B", [1, 16, 64, 256])
@pytest.mark.parametrize("H", [256, 512, 1024])
def test_matches_cudnn(H, B, dtype):
    cfg = select_config(H, B, dtype, torch.device("cuda"), interpreter=False)
    assert cfg.persistent and cfg.programs(H) > 1, cfg
    run_both(64, B, H, dtype)


def test_large_batch_4096():
    run_both(8, 4096, 1024, torch.float16)


def test_long_sequence_100000():
    """cuDNN refuses T >= 65536, so the reference runs in two chunks, carrying the state."""
    T, B, H = 100_000, 2, 32
    m, w = cudnn_and_weights(H, H, torch.float32)
    x = torch.randn(T, B, H, device="cuda")
    with torch.no_grad():
        y, (hn, cn) = fused_lstm(x, *w, backend="triton")
        y1, st = m(x[:50_000])
        y2, (hn_ref, cn_ref) = m(x[50_000:], st)
    assert rel_err(y, torch.cat([y1, y2])) < 1e-2
    assert rel_err(cn, cn_ref[0]) < 1e-2


def test_gradients_bitwise_deterministic():
    T, B, H = 32, 16, 512
    _, w = cudnn_and_weights(H, H, torch.float16)
    x = torch.randn(T, B, H, device="cuda", dtype=torch.float16)
    gy = torch.randn(T, B, H, device="cuda", dtype=torch.float16)
    grads = []
    for _ in range(2):
        for p in w:
            p.grad = None
        xx = x.clone().requires_grad_()
        y, _ = fused_lstm(xx, *w, backend="triton")
        (y * gy).sum().backward()
        grads.append([xx.grad.clone()] + [p.grad.clone() for p in w])
    for a, b in zip(*grads):
        assert torch.equal(a, b)
