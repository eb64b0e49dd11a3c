"""Bad input to fused_lstm: a clear ValueError/TypeError naming the argument, expected and actual."""

from __future__ import annotations

import pytest
import torch

from helpers import run_python
from tritonlstm import LSTMConfig, fused_lstm

T, B, I, H = 4, 3, 5, 6


def good():
    return dict(x=torch.randn(T, B, I), weight_ih=torch.randn(4 * H, I), weight_hh=torch.randn(4 * H, H),
                bias_ih=torch.randn(4 * H), bias_hh=torch.randn(4 * H), h0=torch.randn(B, H), c0=torch.randn(B, H))


def call(**changes):
    args = good()
    args.update(changes)
    x = args.pop("x")
    wi = args.pop("weight_ih")
    wh = args.pop("weight_hh")
    args.setdefault("backend", "triton")
    return fused_lstm(x, wi, wh, **args)


CASES = [
    pytest.param(dict(x=torch.randn(T, B)), ValueError, r"x must be 3-D .*\(4, 3\)", id="x-rank2"),
    pytest.param(dict(x=torch.randn(1, T, B, I)), ValueError, r"x must be 3-D", id="x-rank4"),
    pytest.param(dict(x=torch.randn(T, B, I + 1)), ValueError, r"input size.*expected 5, got 6", id="x-input-size"),
    pytest.param(dict(weight_hh=torch.randn(4 * H, H + 1)), ValueError, r"weight_hh must be \[4H, H\].*\(24, 7\)",
                 id="whh-not-4HxH"),
    pytest.param(dict(weight_ih=torch.randn(4 * H + 4, I)), ValueError, r"weight_ih must be \[4H, I\] = \[24, I\]",
                 id="wih-rows"),
    pytest.param(dict(bias_ih=torch.randn(4 * H - 1)), ValueError, r"bias_ih must have shape \(24,\), got \(23,\)",
                 id="bias_ih-len"),
    pytest.param(dict(bias_hh=torch.randn(2, 4 * H)), ValueError, r"bias_hh must have shape \(24,\)", id="bias_hh-2d"),
    pytest.param(dict(h0=torch.randn(B + 1, H)), ValueError, r"h0 must have shape \(B, H\) = \(3, 6\), got \(4, 6\)",
                 id="h0-shape"),
    pytest.param(dict(c0=torch.randn(1, B, H)), ValueError, r"c0 must have shape \(B, H\)", id="c0-3d"),
    pytest.param(dict(x=torch.randn(T, B, I).half()), TypeError, r"weight_ih must have x's dtype torch.float16, got "
                 r"torch.float32", id="dtype-mismatch"),
    pytest.param(dict(h0=torch.randn(B, H).double()), TypeError, r"h0 must have x's dtype", id="h0-dtype"),
    pytest.param(dict(x=torch.randint(0, 3, (T, B, I))), TypeError, r"x must have a floating dtype, got torch.int64",
                 id="x-int"),
    pytest.param(dict(x=torch.randn(0, B, I)), ValueError, r"T >= 1", id="T0"),
    pytest.param(dict(x=[[1.0]]), TypeError, r"x must be a Tensor, got list", id="x-list"),
    pytest.param(dict(weight_hh=None), TypeError, r"weight_hh must be a Tensor, got None", id="whh-none"),
    pytest.param(dict(lengths=torch.tensor([4, 0, 2])), ValueError, r"lengths must lie in \[1, T\]", id="lengths-0"),
    pytest.param(dict(lengths=torch.tensor([4, 5, 2])), ValueError, r"lengths must lie in \[1, T\]", id="lengths>T"),
    pytest.param(dict(lengths=torch.tensor([4, 2])), ValueError, r"lengths must be an integer tensor of shape \(3,\)",
                 id="lengths-size"),
    pytest.param(dict(lengths=torch.tensor([4.0, 2.0, 1.0])), ValueError,
                 r"lengths must be an integer tensor of shape \(3,\), got torch.float32", id="lengths-float"),
    pytest.param(dict(reverse="yes"), TypeError, r"reverse must be a bool, got 'yes'", id="reverse-str"),
    pytest.param(dict(reverse=2), TypeError, r"reverse must be a bool, got 2", id="reverse-2"),
    pytest.param(dict(backend="cuda"), ValueError, r"backend must be one of", id="backend-name"),
]


@pytest.mark.parametrize("changes,exc,match", CASES)
def test_bad_input_raises(changes, exc, match):
    with pytest.raises(exc, match=match):
        call(**changes)


def test_float64_with_triton_backend_is_refused():
    args = {k: v.double() for k, v in good().items()}
    with pytest.raises(TypeError, match="backend='triton' supports dtypes"):
        fused_lstm(*args.values(), backend="triton")


def test_device_mismatch_is_named():
    meta = torch.randn(B, H, device="meta")
    with pytest.raises(ValueError, match=r"h0 must be on x's device cpu, got meta"):
        call(h0=meta)


def test_triton_backend_without_gpu_or_interpreter_raises():
    """A fresh process without TRITON_INTERPRET: backend='triton' on CPU tensors must refuse, not fall back."""
    code = ("import torch, tritonlstm\n"
            "x = torch.randn(2, 1, 3); wi = torch.randn(8, 3); wh = torch.randn(8, 2)\n"
            "try:\n    tritonlstm.fused_lstm(x, wi, wh, backend='triton')\n"
            "except RuntimeError as e:\n    print('REFUSED', e)\n"
            "y, _ = tritonlstm.fused_lstm(x, wi, wh)\nprint('AUTO', tuple(y.shape))\n")
    out = run_python("-c", code, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "REFUSED backend='triton' cannot run on device 'cpu'" in out.stdout, out.stdout
    assert "TRITON_INTERPRET=1" in out.stdout
    assert "AUTO (2, 1, 2)" in out.stdout


@pytest.mark.parametrize("config,kernel,exc,match", [
    ("split4", None, TypeError, "config must be an LSTMConfig or None, got str 'split4'"),
    ({"block_h": 16}, "fwd", TypeError, "config must be an LSTMConfig or None, got dict"),
    (None, "forward", ValueError, r"kernel must be one of \('fwd', 'bwd', 'stack', 'stack_bwd'\) or None, got 'forw"),
])
def test_use_config_names_a_bad_argument(config, kernel, exc, match):
    from tritonlstm import use_config

    with pytest.raises(exc, match=match):
        with use_config(config, kernel):
            pass


_BASE = dict(block_h=16, block_b=16, block_k=32, w_resident=True)


@pytest.mark.parametrize("changes,exc,match", [
    (dict(block_h=16.0), TypeError, "LSTMConfig.block_h must be an int, got float 16.0"),
    (dict(block_b=True), TypeError, "LSTMConfig.block_b must be an int, got bool True"),
    (dict(w_resident="yes"), TypeError, "LSTMConfig.w_resident must be a bool, got str 'yes'"),
    (dict(half_w="no"), TypeError, "LSTMConfig.half_w must be a bool, got str 'no'"),
    (dict(persistent=1), TypeError, "LSTMConfig.persistent must be a bool, got int 1"),
    (dict(num_warps=3), ValueError, "LSTMConfig.num_warps must be a power of two up to 32, got 3"),
    (dict(num_stages=0), ValueError, "num_stages must be >= 1 and max_spin >= 0, got num_stages=0"),
    (dict(max_spin=-1), ValueError, "max_spin=-1"),
    (dict(block_b=24), ValueError, "LSTMConfig.block_b must be a power of two, got 24"),
    (dict(block_k=8), ValueError, r"LSTMConfig.block_k must be >= 16 \(tl.dot's K\), got 8"),
    (dict(split_k=4), ValueError, "block_k // split_k must be >= 16"),
    (dict(batch_groups=0), ValueError, "LSTMConfig.batch_groups must be >= 1, got 0"),
    (dict(exchange="flags"), ValueError, r"LSTMConfig.exchange must be one of \('barrier', 'cluster'\), got 'flags'"),
    (dict(exchange="cluster", persistent=False), ValueError, "is a persistent launch's barrier"),
    (dict(merged_gates=True, split_k=2), ValueError, "merged_gates needs split_k=1"),
])
def test_launch_config_names_a_bad_field(changes, exc, match):
    """LSTMConfig (use_config's argument, the tuner's cache entries) refuses a field of the wrong type or range at
    construction, naming it, rather than at a compile or as a truthy string taken for True."""
    with pytest.raises(exc, match=match):
        LSTMConfig(**{**_BASE, **changes})
    LSTMConfig(**_BASE)


@pytest.mark.parametrize("call_module,exc,match", [
    pytest.param(lambda m, c: m(torch.randn(T, B, I), (torch.randn(1, B, H).double(), torch.randn(1, B, H))),
                 RuntimeError, r"Expected hidden\[0\] dtype torch.float32 \(the input's\), got torch.float64",
                 id="lstm-h0-dtype"),
    pytest.param(lambda m, c: m(torch.randn(T, B, I), (torch.randn(1, B, H), torch.randn(1, B, H).half())),
                 RuntimeError, r"Expected hidden\[1\] dtype torch.float32 \(the input's\), got torch.float16",
                 id="lstm-c0-dtype"),
    pytest.param(lambda m, c: m([[1.0] * I]), TypeError, r"LSTM: input must be a Tensor or PackedSequence, got list",
                 id="lstm-list"),
    pytest.param(lambda m, c: c(torch.randn(B, I).numpy()), TypeError, r"LSTMCell: input must be a Tensor, got ndarray",
                 id="cell-ndarray"),
    pytest.param(lambda m, c: c(torch.randn(B, I), (torch.randn(B, H).double(), torch.randn(B, H))), RuntimeError,
                 r"LSTMCell: hx\[0\] dtype \(torch.float64\) does not match input dtype \(torch.float32\)",
                 id="cell-h0-dtype"),
])
def test_module_input_errors_name_the_argument(call_module, exc, match):
    """Where nn.LSTM / nn.LSTMCell fail deep inside (mkldnn's "unsupported data type", "'list' object has no
    attribute 'dim'", a matmul's dtypes), the modules name the argument, expected and actual."""
    from tritonlstm import LSTM, LSTMCell

    with pytest.raises(exc, match=match):
        call_module(LSTM(I, H, backend="triton"), LSTMCell(I, H, backend="triton"))
