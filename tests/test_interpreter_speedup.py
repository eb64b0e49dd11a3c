"""The test suite's speed-ups of Triton's CPU interpreter (conftest._speed_up_the_interpreter) change no result and
leave triton.language as the interpreter leaves it."""

import pytest
import torch
import triton.language as tl

from helpers import NAMES, leaf, make_problem
from tritonlstm import LSTMConfig, fused_lstm, use_config

# Several programs and helpers, one launch a step; bf16 goes through the interpreter's uint16 storage.
STEPWISE = LSTMConfig(block_h=8, block_b=4, block_k=64, w_resident=True, batch_groups=2, persistent=False)


def _run(problem, dtype):
    p = leaf(problem, dtype)
    with use_config(STEPWISE):
        y, (hn, cn) = fused_lstm(*(p[n] for n in NAMES), backend="triton")
        (y.float().sin().sum() + hn.float().sum() + cn.float().square().sum()).backward()
    return [y, hn, cn, *(p[n].grad for n in NAMES)]


def _language():
    return {(owner, name): getattr(owner, name) for owner in (tl, tl.math, tl.tensor) for name in dir(owner)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_speed_ups_change_no_result_and_restore_the_language(dtype, monkeypatch):
    from triton.runtime import interpreter as interp

    if not getattr(interp._patch_lang, "once_a_launch", False):
        pytest.skip("TRITONLSTM_TEST_REPATCH=1: the interpreter as it is")
    problem = make_problem(3, 5, 6, 20, torch.float32)
    before = _language()
    fast = _run(problem, dtype)
    assert _language() == before
    monkeypatch.setattr(interp, "_patch_lang", interp._patch_lang.original)
    monkeypatch.setattr(interp, "_get_np_dtype", interp._get_np_dtype.original)
    as_is = _run(problem, dtype)
    for a, b in zip(fast, as_is):
        assert a.dtype == b.dtype and torch.equal(a, b)
