"""Shared test helpers: random LSTM problems, the float64 reference, the per-dtype tolerance table."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import torch

from tritonlstm import fused_lstm, use_config
from tritonlstm.naive import lstm_layer_reference

# Relative error ||out - ref|| / ||ref|| allowed per dtype, against a float64 reference run on the same
# (dtype-rounded) inputs. fp32 on the interpreter is exact fp32; on a GPU the recurrent dot may use TF32.
RESOLUTION = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
RESOLUTION_GPU = {torch.float32: 2e-3, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def run_python(*args: str, timeout: float) -> subprocess.CompletedProcess:
    """`python *args` in a fresh process without TRITON_INTERPRET (the real compiler, or no kernels at all)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=timeout)

NAMES = ("x", "weight_ih", "weight_hh", "bias_ih", "bias_hh", "h0", "c0")


def call_kwargs(p):
    """Keyword arguments beyond the seven positional ones (weight_hr where the problem has one)."""
    return {"weight_hr": p["weight_hr"]} if p.get("weight_hr") is not None else {}


def make_problem(T, B, I, H, dtype, *, bias=True, init=True, device="cpu", scale=None, proj=0):
    """Inputs of one layer, nn.LSTM-like init (uniform +-1/sqrt(H)), in `dtype`; proj > 0 adds weight_hr."""
    k = scale if scale is not None else H ** -0.5
    P = proj or H
    g = {
        "x": torch.randn(T, B, I),
        "weight_ih": torch.empty(4 * H, I).uniform_(-k, k),
        "weight_hh": torch.empty(4 * H, P).uniform_(-k, k),
        "bias_ih": torch.empty(4 * H).uniform_(-k, k) if bias else None,
        "bias_hh": torch.empty(4 * H).uniform_(-k, k) if bias else None,
        "h0": torch.randn(B, P) * 0.5 if init else None,
        "c0": torch.randn(B, H) * 0.5 if init else None,
    }
    if proj:
        g["weight_hr"] = torch.empty(P, H).uniform_(-k, k)
    return {n: (None if t is None else t.to(device=device, dtype=dtype)) for n, t in g.items()}


def leaf(problem, dtype=None):
    return {n: (None if t is None else t.detach().to(dtype or t.dtype).clone().requires_grad_())
            for n, t in problem.items()}


def loss_of(y, hn, cn, weights):
    wy, wh, wc = weights
    return (y.double() * wy).sum() + (hn.double() * wh).sum() + (cn.double() * wc).sum()


def reference(problem, *, reverse=False, lengths=None):
    """float64 forward and gradients on the problem's (already rounded) values."""
    p = leaf(problem, torch.float64)
    T, B, _ = p["x"].shape
    H, P = p["weight_hh"].shape[0] // 4, p["weight_hh"].shape[1]
    h0 = p["h0"] if p["h0"] is not None else torch.zeros(B, P, dtype=torch.float64, device=p["x"].device)
    c0 = p["c0"] if p["c0"] is not None else torch.zeros(B, H, dtype=torch.float64, device=p["x"].device)
    y, (hn, cn) = lstm_layer_reference(p["x"], p["weight_ih"], p["weight_hh"], p["bias_ih"], p["bias_hh"], h0, c0,
                                       reverse, lengths, p.get("weight_hr"))
    return p, (y, hn, cn)


def rel_err(out: torch.Tensor, ref: torch.Tensor, floor: float = 1e-2) -> float:
    """||out - ref|| / ||ref||, with ||ref|| taken as at least an RMS of `floor`: an element that cancels to
    near zero (a one-element output, say) is judged by its absolute error instead."""
    out, ref = out.double(), ref.double()
    if out.shape != ref.shape:
        raise AssertionError(f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    if not torch.isfinite(out).all():
        return float("inf")
    denom = max(ref.norm().item(), floor * ref.numel() ** 0.5, 1e-30)
    return (out - ref).norm().item() / denom


def check_against_reference(problem, dtype, *, reverse=False, lengths=None, config=None, grad_factor=2.0, tol=None,
                            kernel=None):
    """fused_lstm on the kernels (backend="triton") against the float64 reference: outputs within tol (the dtype's
    RESOLUTION), every gradient within tol * grad_factor, padded outputs zero. Returns the errors."""
    p_ref, (y_r, hn_r, cn_r) = reference(problem, reverse=reverse, lengths=lengths)
    weights = tuple(torch.randn_like(t) for t in (y_r, hn_r, cn_r))
    loss_of(y_r, hn_r, cn_r, weights).backward()

    p = leaf(problem)
    # kernel None: every kernel; config None: the configs chosen around the call (the normal choice, or a caller's
    # use_config)
    with use_config(config, kernel) if config is not None else contextlib.nullcontext():
        y, (hn, cn) = fused_lstm(*(p[n] for n in NAMES), reverse=reverse, lengths=lengths, backend="triton",
                                 **call_kwargs(p))
        assert y.dtype == hn.dtype == cn.dtype == dtype
        loss_of(y, hn, cn, weights).backward()

    tol = tol or RESOLUTION[dtype]
    errors = {"y": rel_err(y, y_r), "h_n": rel_err(hn, hn_r), "c_n": rel_err(cn, cn_r)}
    bad = {k: v for k, v in errors.items() if not v <= tol}
    for n in (*NAMES, "weight_hr"):
        if p.get(n) is not None:
            assert p[n].grad is not None, f"no gradient for {n}"
            errors[f"d{n}"] = e = rel_err(p[n].grad, p_ref[n].grad)
            if not e <= tol * grad_factor:
                bad[f"d{n}"] = e
    if lengths is not None:
        for b, n in enumerate(lengths.tolist()):
            assert (y[n:, b] == 0).all(), "padded outputs must be zero"
    assert not bad, f"errors over tolerance {tol}: {bad} (all: {errors})"
    return errors


def launch_constexprs(monkeypatch, kernel_name: str, name: str) -> list:
    """The constexpr `name` of every launch of kernels.lstm's `kernel_name` through kernels._run, in order (proof of
    which path a launch took)."""
    from tritonlstm.kernels import lstm as kernels

    seen, real = [], kernels._run

    def spy(kernel, grid, n_steps, config, device, args, constexprs, *rest, **kw):
        if kernel is getattr(kernels, kernel_name):
            seen.append(constexprs.get(name))
        return real(kernel, grid, n_steps, config, device, args, constexprs, *rest, **kw)

    monkeypatch.setattr(kernels, "_run", spy)
    return seen
