"""fused_lstm on the Triton kernels (CPU interpreter) against a float64 reference: outputs and every gradient."""

from __future__ import annotations

import contextlib
import dataclasses
import warnings

import pytest
import torch
import triton.language as tl

import tritonlstm
from concurrency import concurrent_programs
from helpers import (
    NAMES,
    RESOLUTION,
    RESOLUTION_GPU,
    check_against_reference,
    launch_constexprs,
    leaf,
    loss_of,
    make_problem,
    reference,
    rel_err,
)
from tritonlstm import LSTMConfig, fused_lstm, use_config
from tritonlstm.kernels import lstm as kernels


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts launches of the forward and backward recurrence, proving the Triton path ran."""
    calls = {"fwd": 0, "bwd": 0}
    fwd, bwd = kernels.lstm_forward, kernels.lstm_backward

    def spy_fwd(*a, **k):
        calls["fwd"] += 1
        return fwd(*a, **k)

    def spy_bwd(*a, **k):
        calls["bwd"] += 1
        return bwd(*a, **k)

    monkeypatch.setattr(kernels, "lstm_forward", spy_fwd)
    monkeypatch.setattr(kernels, "lstm_backward", spy_bwd)
    return calls


@pytest.fixture
def chunk_constants(monkeypatch):
    """monkeypatch, for tests that patch the chunk sizes the launch plans read (TRANSPOSED_CHUNK_BYTES, ...): the plans
    are memoised per config and shape (kernels._forward_plan, _backward_plan), so they are cleared around the test, or
    a patched size would miss the launches of a config an earlier test planned (and reach a later test's)."""
    def clear():
        kernels._forward_plan.cache_clear()
        kernels._backward_plan.cache_clear()

    clear()
    yield monkeypatch
    clear()


def _shape_cases():
    """Every T in {1, 5, 16}, B in {1, 3, 16, 17}, H in {1, 8, 24, 33, 64}, with I != H, and the flags
    (bias, initial state, reverse) cycled over them so each value meets each flag."""
    cases = []
    Ts = (1, 5, 16)
    i = 0
    for H in (1, 8, 24, 33, 64):
        for B in (1, 3, 16, 17):
            T = Ts[i % 3]
            bias, init, reverse = bool(i % 2), bool((i // 2) % 2), bool((i // 4) % 2)
            I = H + 3 if i % 3 else max(1, H // 2)
            ident = f"T{T}-B{B}-H{H}-I{I}" + ("-bias" if bias else "") + ("-h0c0" if init else "") + \
                ("-rev" if reverse else "")
            cases.append(pytest.param(T, B, H, I, bias, init, reverse, id=ident))
            i += 1
    return cases


@pytest.mark.parametrize("T,B,H,I,bias,init,reverse", _shape_cases())
def test_float32_matches_reference(T, B, H, I, bias, init, reverse, kernel_calls):
    problem = make_problem(T, B, I, H, torch.float32, bias=bias, init=init)
    check_against_reference(problem, torch.float32, reverse=reverse)
    assert kernel_calls == {"fwd": 1, "bwd": 1}


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("T,B,H,I", [(5, 3, 24, 10), (16, 17, 33, 8), (1, 1, 1, 2)],
                         ids=["T5-B3-H24-I10", "T16-B17-H33-I8", "T1-B1-H1-I2"])
def test_half_precision_matches_reference(T, B, H, I, dtype, reverse, kernel_calls):
    problem = make_problem(T, B, I, H, dtype)
    check_against_reference(problem, dtype, reverse=reverse)
    assert kernel_calls == {"fwd": 1, "bwd": 1}


# Configs that exercise the multi-program paths: several hidden blocks (P > 1), several batch groups (Q > 1),
# several batch tiles per program, W_hh streamed in K chunks, launched one step at a time.
MULTI_PROGRAM = [
    pytest.param(LSTMConfig(block_h=8, block_b=4, block_k=64, w_resident=True, batch_groups=2, persistent=False),
                 id="stepwise-P5-Q2-tiles3"),
    pytest.param(LSTMConfig(block_h=16, block_b=8, block_k=16, w_resident=False, batch_groups=1, persistent=False),
                 id="stepwise-streamedW-BK16"),
    pytest.param(LSTMConfig(block_h=64, block_b=4, block_k=16, w_resident=False, batch_groups=1, persistent=True),
                 id="persistent-1prog-streamedW-tiles5"),
    # Split-K (each K chunk's product as a batched dot over K slices, then summed): resident and streamed W.
    pytest.param(LSTMConfig(block_h=8, block_b=4, block_k=64, w_resident=True, batch_groups=2, persistent=False,
                            split_k=4, num_warps=4), id="stepwise-P5-Q2-tiles3-split4"),
    pytest.param(LSTMConfig(block_h=16, block_b=8, block_k=32, w_resident=False, batch_groups=1, persistent=False,
                            split_k=2), id="stepwise-streamedW-BK32-split2"),
    # configs.wide_tile_config's shape (64-row tiles, streamed W, 3 stages), stepwise: one partial tile.
    pytest.param(LSTMConfig(block_h=16, block_b=64, block_k=32, w_resident=False, batch_groups=1, persistent=False,
                            num_warps=8, num_stages=3), id="stepwise-wide-BB64"),
    # The cluster barrier (v0.34): under the interpreter the launch and the barrier are the plain ones; this is its
    # constexpr's way through every launcher (test_gpu runs it as a cluster).
    pytest.param(LSTMConfig(block_h=64, block_b=4, block_k=64, w_resident=True, batch_groups=1, persistent=True,
                            exchange="cluster"), id="persistent-1prog-cluster"),
]


@pytest.mark.parametrize("config", MULTI_PROGRAM)
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_multi_program_paths(config, reverse, dtype, kernel_calls):
    problem = make_problem(6, 17, 10, 33, dtype)
    check_against_reference(problem, dtype, reverse=reverse, config=config)
    assert kernel_calls == {"fwd": 1, "bwd": 1}


@pytest.mark.parametrize("dtype,reverse", [(torch.float32, False), (torch.bfloat16, True)], ids=["fp32", "bf16-rev"])
def test_transposed_streamed_bb128_forward(dtype, reverse, kernel_calls):
    """The named variant transposed-streamed-bb128 (perf/NOTES.md v0.36) as the tuner would take it at H = 1024,
    B = 256, run stepwise on the interpreter at H = 33 (3 programs, the last with 15 masked units), B = 130 (2 batch
    groups of one 128-row tile, the second with 2 live rows) and with lengths."""
    from tritonlstm.configs import named_variants

    cfg = named_variants("fwd", 1024, 256, dtype, 132, names=("transposed-streamed-bb128",))[
        "transposed-streamed-bb128"]
    assert (cfg.block_b, cfg.block_h, cfg.w_resident, cfg.transposed, cfg.batch_groups, cfg.num_warps) == \
        (128, 16, False, True, 2, 8)
    lengths = torch.randint(1, 5, (130,))
    lengths[0] = 4
    problem = make_problem(4, 130, 10, 33, dtype)
    check_against_reference(problem, dtype, reverse=reverse, lengths=lengths,
                            config=dataclasses.replace(cfg, persistent=False), kernel="fwd")
    assert kernel_calls == {"fwd": 1, "bwd": 1}


# The forward's four gate dots as one over interleaved columns (the backward ignores merged_gates): resident and
# streamed W, one direction and dtype each (the gate split is the same code for all).
@pytest.mark.parametrize("config,reverse,dtype", [
    pytest.param(LSTMConfig(block_h=8, block_b=4, block_k=64, w_resident=True, batch_groups=2, persistent=False,
                            merged_gates=True), True, torch.float16, id="stepwise-P5-Q2-tiles3-fp16-rev"),
    pytest.param(LSTMConfig(block_h=16, block_b=8, block_k=16, w_resident=False, batch_groups=1, persistent=False,
                            merged_gates=True), False, torch.float32, id="stepwise-streamedW-BK16-fp32")])
def test_merged_gate_dots(config, reverse, dtype, kernel_calls):
    problem = make_problem(6, 17, 10, 33, dtype)
    check_against_reference(problem, dtype, reverse=reverse, config=config)
    assert kernel_calls == {"fwd": 1, "bwd": 1}


# The forward's gate dots transposed (W^T @ h^T, perf/NOTES.md v0.18) and the backward's dh by reduce-scatter
# (v0.24): H = 33 gives 3 programs of 16 units, the last with 15 masked gate rows (each program sums 3 shares of
# 4 loaded, one a load, or with "four-chunks" two a load); BB = 4 with 17 rows, 5 tiles over 2 batch groups; the
# K = 64 tile in one chunk, and in four (64-byte chunks of h: KC = 16, the smallest; the backward's product in
# 16-unit chunks); and W^T streamed.
@pytest.mark.parametrize("chunk", [8192, 64, "streamed"], ids=["one-chunk", "four-chunks", "streamed-W"])
@pytest.mark.parametrize("reverse,dtype,lengths", [(False, torch.float32, False), (True, torch.float16, True)],
                         ids=["fp32", "fp16-rev-lengths"])
def test_transposed_gate_dots(chunk, reverse, dtype, lengths, chunk_constants, kernel_calls):
    monkeypatch = chunk_constants
    streamed = chunk == "streamed"
    if not streamed:
        monkeypatch.setattr(kernels, "TRANSPOSED_CHUNK_BYTES", chunk)
        monkeypatch.setattr(kernels, "TRANSPOSED_ONE_CHUNK_BYTES", chunk)
    if chunk == 64:
        monkeypatch.setattr(kernels, "REDUCE_SCATTER_CHUNK", 16)
        # Shares summed two producers a load (across threads), where the other cases take one a load.
        monkeypatch.setattr(kernels, "REDUCE_SCATTER_IN_REGISTERS", 2)
        monkeypatch.setattr(kernels, "REDUCE_SCATTER_LOAD", 2)
    config = LSTMConfig(block_h=16, block_b=4, block_k=16 if streamed else 64, w_resident=not streamed,
                        batch_groups=2, persistent=False, transposed=True)
    # Streamed: W^T loaded in 16-wide K chunks each step, three of them for H = 33.
    assert kernels.transposed_chunk(config, dtype.itemsize) == (64 if chunk == 8192 else 16)
    assert kernels.reduce_scatter_constexprs(config, 33) == dict(TRANSPOSED=True, KC=64 if chunk == 8192 else 16,
                                                                QP=4, QC=2 if chunk == 64 else 1,
                                                                WT_FROM_W=False)  # (H % 16: the copy)
    problem = make_problem(6, 17, 10, 33, dtype)
    lens = torch.tensor([6, 2, 5, 1, 6, 3, 4, 6, 1, 2, 6, 5, 3, 3, 6, 2, 4]) if lengths else None
    check_against_reference(problem, dtype, reverse=reverse, lengths=lens, config=config)
    assert kernel_calls == {"fwd": 1, "bwd": 1}


def test_reduce_scatter_backward_reads_w_transposed_from_w_itself(monkeypatch):
    """v0.72: with W resident, the reduce-scatter backward reads W^T's tiles across W_hh's rows, and the host makes
    no W^T copy; the same dG, dh0 and dc0 bit for bit as from the copy (TRITONLSTM_TRANSPOSE_IN_KERNEL=0). Two
    directions, so that each reads its own W; 48 units in K = 64 (masked past H). At an H not a multiple of 16 the
    copy stays (the strided reads would be scalar and spill)."""
    config = LSTMConfig(block_h=16, block_b=4, block_k=64, w_resident=True, batch_groups=2, persistent=False,
                        transposed=True)
    torch.manual_seed(0)
    T, B, H, D = 4, 6, 48, 2
    assert not kernels.reduce_scatter_constexprs(config, 40)["WT_FROM_W"]
    gates = torch.rand(T, B, D * 4 * H) * 0.9 + 0.05
    c_all = torch.randn(T, B, D * H)
    w = torch.randn(D, 4 * H, H) * 0.2
    dy, c0 = torch.randn(T, B, D * H), torch.randn(D, B, H)
    copies = []
    contiguous = torch.Tensor.contiguous
    monkeypatch.setattr(torch.Tensor, "contiguous", lambda t, *a, **k: copies.append(t.shape) or contiguous(t, *a, **k))
    out = {}
    for in_kernel in (True, False):
        monkeypatch.setattr(kernels, "TRANSPOSE_IN_KERNEL", in_kernel)
        copies.clear()
        out[in_kernel] = kernels.lstm_backward(gates, c_all, c0, w, dy, None, None, None, reverse=False,
                                               config=config)
        assert (torch.Size([D, H, 4 * H]) in copies) == (not in_kernel), copies
    for a, b in zip(out[True], out[False]):
        assert torch.equal(a, b)


# The forward's transposed dots with 32 units a program (128 gate rows; v0.34, so that H = 512 makes a 16-program
# cluster): H = 40 gives 2 programs, the second with 24 of its 32 units masked; 17 rows in 5 tiles over 2 batch
# groups; K = 64 in one chunk. The backward runs its own config: its reduce-scatter takes 16-unit programs only.
@pytest.mark.parametrize("reverse,dtype,lengths", [(False, torch.float32, False), (True, torch.float16, True)],
                         ids=["fp32", "fp16-rev-lengths"])
def test_transposed_forward_with_32_unit_programs(reverse, dtype, lengths, kernel_calls):
    config = LSTMConfig(block_h=32, block_b=4, block_k=64, w_resident=True, batch_groups=2, persistent=False,
                        transposed=True, num_warps=8)
    problem = make_problem(6, 17, 10, 40, dtype)
    lens = torch.tensor([6, 2, 5, 1, 6, 3, 4, 6, 1, 2, 6, 5, 3, 3, 6, 2, 4]) if lengths else None
    check_against_reference(problem, dtype, reverse=reverse, lengths=lens, config=config, kernel="fwd")
    assert kernel_calls == {"fwd": 1, "bwd": 1}
    with pytest.raises(ValueError, match="reduce-scatter.*block_h=16"):
        kernels.reduce_scatter_constexprs(config, 40)


# float32 forward dots on float16 operands, W^T scaled by a power of two (LSTMConfig.half_w, perf/NOTES.md v0.29):
# as precise as TF32's operands, so judged by the GPU's float32 tolerance (TF32), never by the interpreter's exact one.
HALF_TOL = RESOLUTION_GPU[torch.float32]
HALF_CONFIGS = {
    "resident": LSTMConfig(block_h=16, block_b=4, block_k=64, w_resident=True, batch_groups=2, persistent=False,
                           transposed=True, half_w=True),
    "streamed": LSTMConfig(block_h=16, block_b=4, block_k=16, w_resident=False, batch_groups=1, persistent=False,
                           transposed=True, half_w=True),
}


@pytest.fixture
def half_weights_calls(monkeypatch):
    """The float16 operands each launch got from _half_weights (proof that the half_w path ran)."""
    calls, real = [], kernels._half_weights

    def spy(*a, **k):
        out = real(*a, **k)
        calls.append(out)
        return out

    monkeypatch.setattr(kernels, "_half_weights", spy)
    return calls


@pytest.mark.parametrize("name", [*HALF_CONFIGS, "resident-four-chunks", "resident-w8-one-chunk"])
@pytest.mark.parametrize("reverse,lengths", [(False, None), (True, torch.tensor([6, 2, 5, 1, 6, 3, 4, 6, 1, 2, 6, 5,
                                                                                 3, 3, 6, 2, 4]))],
                         ids=["padded", "rev-lengths"])
def test_half_w_forward_matches_reference_at_tf32_precision(name, reverse, lengths, half_weights_calls,
                                                           chunk_constants):
    monkeypatch = chunk_constants
    if name == "resident-four-chunks":  # 16-column chunks of h, each loaded before the previous chunk's dot
        monkeypatch.setattr(kernels, "TRANSPOSED_CHUNK_BYTES", 64)
        monkeypatch.setattr(kernels, "TRANSPOSED_ONE_CHUNK_BYTES", 64)
        name = "resident"
        assert kernels.transposed_chunk(HALF_CONFIGS[name], 4) == 16
    config = HALF_CONFIGS.get(name)
    if name == "resident-w8-one-chunk":  # v0.64: 8 warps take twice 4 warps' tile in one chunk
        monkeypatch.setattr(kernels, "TRANSPOSED_CHUNK_BYTES", 64)
        monkeypatch.setattr(kernels, "TRANSPOSED_ONE_CHUNK_BYTES", 256)
        config = dataclasses.replace(HALF_CONFIGS["resident"], num_warps=8)
        assert kernels.transposed_chunk(config, 4, half_h=True) == 64  # [4, 64] float16: 512 bytes
        assert kernels.transposed_chunk(dataclasses.replace(config, num_warps=4), 4, half_h=True) == 16
    problem = make_problem(6, 17, 10, 33, torch.float32)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=True):
        check_against_reference(problem, torch.float32, reverse=reverse, lengths=lengths, config=config,
                                tol=HALF_TOL)
    assert [w.dtype for w, _, _ in half_weights_calls] == [torch.float16]


@pytest.mark.parametrize("name,case", [("streamed", "padded"), ("streamed", "rev-lengths"),
                                       ("streamed", "bidirectional"), ("resident", "rev-lengths"),
                                       ("resident-persistent", "bidirectional")])
def test_half_h_exchange_is_the_float32_reads_rounding_bit_for_bit(name, case, monkeypatch):
    """HALF_H (perf/NOTES.md v0.63): h_{t-1} written once in float16 by its producer (h0 by _half_weights) is the
    operand the dot rounded from y's float32 before, so outputs and every gradient equal those without it, bit for
    bit: padded, reversed with lengths, and both directions of a bidirectional layer in one launch (each its own
    slots); with h0 scaled far from 1 (a lost h0 multiplier shows in y_0), and in a persistent launch of several
    programs running at once (tests/concurrency.py: one of them slow), where the two slots alternate inside one
    kernel and a slot written too early would be read stale. The spy proves which path each launch took."""
    config = HALF_CONFIGS["resident" if name == "resident-persistent" else name]
    if name == "resident-persistent":
        config = dataclasses.replace(config, persistent=True)
    took = launch_constexprs(monkeypatch, "lstm_fwd_kernel", "HALF_H")
    torch.manual_seed(0)
    T, B, I, H = 4, 9, 10, 33
    lengths = torch.tensor([4, 2, 3, 1, 4, 3, 2, 4, 1]) if case == "rev-lengths" else None
    if case == "bidirectional":
        ref = torch.nn.LSTM(I, H, bidirectional=True)
        x = torch.randn(T, B, I)
        hx = (torch.randn(2, B, H) * 1e3, torch.randn(2, B, H))
    else:
        problem = make_problem(T, B, I, H, torch.float32)
        problem["h0"] = problem["h0"] * 1e3
    results = []
    for half_h in (True, False):
        monkeypatch.setattr(kernels, "HALF_H", half_h)
        at_once = concurrent_programs(1) if config.persistent else contextlib.nullcontext()
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=True), use_config(config), at_once:
            if case == "bidirectional":
                m = tritonlstm.LSTM(I, H, bidirectional=True, backend="triton")
                m.load_state_dict(ref.state_dict())
                xx = x.clone().requires_grad_()
                hh = tuple(t.clone().requires_grad_() for t in hx)
                y, (hn, cn) = m(xx, hh)
                leaves = [xx, *hh, *m.parameters()]
            else:
                leaves = [problem[n].clone().requires_grad_() for n in NAMES]
                y, (hn, cn) = fused_lstm(*leaves, reverse=case == "rev-lengths", lengths=lengths,
                                         backend="triton")
            ((y * torch.arange(y.numel()).view_as(y).sin()).sum() + hn.sum() + cn.square().sum()).backward()
        results.append([y, hn, cn, *(t.grad for t in leaves)])
    assert took == [True, False]
    for a, b in zip(*results):
        assert torch.equal(a, b)
    assert results[0][0].abs().max() > 0.1  # not an all-zero or NaN answer that would equal itself


@pytest.mark.parametrize("config", [
    LSTMConfig(block_h=8, block_b=4, block_k=64, w_resident=True, batch_groups=2, persistent=False, split_k=4),
    LSTMConfig(block_h=16, block_b=8, block_k=64, w_resident=True, batch_groups=1, persistent=False, split_k=2),
    LSTMConfig(block_h=8, block_b=16, block_k=64, w_resident=True, batch_groups=1, persistent=True, split_k=4),
], ids=["tiles3-split4", "split2", "persistent-split4"])
def test_split_backward_pairs_are_the_unpaired_result_bit_for_bit(config, monkeypatch):
    """SPLIT_PAIRS (perf/NOTES.md v0.66): the split-K backward's gate loads two at a time only move loads, so dx,
    dh0, dc0 and every weight gradient equal those of the loads inside their dots, bit for bit: reversed with lengths,
    split 4 and 2 ways, and a persistent launch of 5 programs at once (tests/concurrency.py, one slow), where a
    load moved above the step's barrier would read dG stale. The spy proves which path each launch took."""
    took = launch_constexprs(monkeypatch, "lstm_bwd_kernel", "PAIRED")
    torch.manual_seed(0)
    problem = make_problem(6, 9, 10, 33, torch.float32)
    lengths = torch.tensor([6, 2, 5, 1, 6, 3, 4, 6, 1])
    results = []
    for paired in (True, False):
        monkeypatch.setattr(kernels, "SPLIT_PAIRS", paired)
        at_once = concurrent_programs(1) if config.persistent else contextlib.nullcontext()
        with use_config(config), at_once:
            leaves = [problem[n].clone().requires_grad_() for n in NAMES]
            y, (hn, cn) = fused_lstm(*leaves, reverse=True, lengths=lengths, backend="triton")
            ((y * torch.arange(y.numel()).view_as(y).sin()).sum() + hn.sum() + cn.square().sum()).backward()
        results.append([y, hn, cn, *(t.grad for t in leaves)])
    assert took == [True, False]
    for a, b in zip(*results):
        assert torch.equal(a, b)
    assert results[0][3].abs().max() > 0.01  # dx: not an all-zero or NaN answer that would equal itself


@pytest.mark.parametrize("w_scale,h0_scale", [(1e-8, 1e8), (1e8, 1e-8), (3e-13, 1.0), (1.0, 1e22)])
def test_half_w_scales_weights_and_h0_into_float16s_range(w_scale, h0_scale, half_weights_calls):
    """Without the power-of-two scaling these would underflow to zero or overflow to inf in float16: W_hh at 1e-8
    (float16's smallest subnormal is 6e-8) against h0 at 1e8 (beyond 65504), and the other way round; the first
    step's product is of order one, so a lost scale shows in y_0."""
    problem = make_problem(6, 17, 10, 33, torch.float32)
    problem["weight_hh"] = problem["weight_hh"] * w_scale
    problem["h0"] = problem["h0"] * h0_scale
    _, (y_r, hn_r, cn_r) = reference(problem)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=True), use_config(HALF_CONFIGS["resident"]):
        y, (hn, cn) = fused_lstm(*(problem[n] for n in NAMES), backend="triton")
    assert rel_err(y[0], y_r[0]) < HALF_TOL and rel_err(y, y_r) < HALF_TOL and rel_err(cn, cn_r) < HALF_TOL
    assert len(half_weights_calls) == 1


def test_half_w_raises_beyond_its_range_instead_of_returning_inf():
    problem = make_problem(3, 5, 4, 33, torch.float32)
    problem["weight_hh"][0, 0] = 1e30
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=True), use_config(HALF_CONFIGS["resident"]), \
            pytest.raises(RuntimeError, match="beyond 2\\^75"):
        fused_lstm(*(problem[n] for n in NAMES), backend="triton")
    assert int(kernels.barrier_errors.flag(torch.device("cpu"))[0]) == 0  # reported once, then cleared
    problem["weight_hh"][0, 0] = float("inf")  # inf is no range error: it propagates as in torch
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=True), use_config(HALF_CONFIGS["resident"]):
        fused_lstm(*(problem[n] for n in NAMES), backend="triton")


def half_operands_reference(w_hh, h0, w_ih=None, drop=None):
    """_half_weights' operands in ATen's ops (as it computed them before half_operands_kernel, perf/NOTES.md v0.35),
    and the error flag's value they set."""
    def exp2(k):
        return ((k + 127) << 23).view(torch.float32)

    n = w_hh.shape[0]
    stack = w_ih is not None and n > 1
    parts = [torch.linalg.vector_norm(w_hh, float("inf"), dim=(1, 2)),
             torch.linalg.vector_norm(h0, float("inf"), dim=(1, 2))]
    if stack:
        parts.append(torch.linalg.vector_norm(w_ih, float("inf"), dim=(1, 2)))
        parts.append(torch.linalg.vector_norm(drop, float("inf"), dim=(1, 2, 3)) if drop is not None else
                     w_hh.new_ones(n - 1))
    e = (torch.cat(parts).view(torch.int32) >> 23) & 0xFF
    k = 141 - e
    flag = 2 if bool(((k < -60) & (e != 255)).any()) else 0
    k = k.clamp(-60, 60)
    k_w, k_h0 = k[:n], k[n:2 * n]
    if stack:
        k_ih = torch.nn.functional.pad(k[2 * n:3 * n - 1], (1, 0))
        k_x = torch.nn.functional.pad(k[3 * n - 1:], (1, 0), value=14)  # REC_MUL = 2^14
    else:
        k_ih = k_x = torch.zeros_like(k_w)
    scales = exp2(torch.stack([k_h0, -(k_w + k_h0), -(k_w + 14), k_x, -(k_ih + k_x)], dim=1))
    w16 = (w_hh * exp2(k_w)[:, None, None]).to(torch.float16)
    wih16 = None if w_ih is None else (w_ih * exp2(k_ih[1:])[:, None, None]).to(torch.float16) if stack else w16
    return w16, wih16, scales, flag


def _half_case(n, H=24, B=3, T=4, stack=False, drop=False, poke=None):
    g = torch.Generator().manual_seed(n * 100 + H)
    w_hh = torch.randn(n, 4 * H, H, generator=g) * torch.logspace(-3, 3, n)[:, None, None]
    h0 = torch.randn(n, B, H, generator=g)
    w_ih = torch.randn(n - 1, 4 * H, H, generator=g) * 0.05 if stack else None
    d = (torch.rand(n - 1, T, B, H, generator=g) > 0.3).float() * (1 / 0.7) if stack and drop else None
    if poke:
        poke(w_hh, h0, w_ih, d)
    return w_hh, h0, w_ih, d


HALF_CASES = {
    "layer": lambda: _half_case(1),
    "bidirectional": lambda: _half_case(2, H=40),
    "stack4-dropout": lambda: _half_case(4, H=16, stack=True, drop=True),
    "stack3": lambda: _half_case(3, H=8, stack=True),
    "stack1": lambda: (lambda w, h, _, __: (w, h, w, None))(*_half_case(1, H=8)),
    "zero-h0-subnormal-w": lambda: _half_case(2, poke=lambda w, h, *_: (h.zero_(), w[1].mul_(1e-42))),
    "inf-and-nan": lambda: _half_case(2, poke=lambda w, h, *_: (w.__setitem__((0, 3, 2), float("inf")),
                                                               h.__setitem__((1, 0, 0), float("nan")))),
    "w-beyond": lambda: _half_case(2, poke=lambda w, *_: w.__setitem__((1, 5, 5), -1e30)),
    "h0-beyond": lambda: _half_case(1, poke=lambda w, h, *_: h.__setitem__((0, 2, 3), 3e23)),
    "w_ih-beyond": lambda: _half_case(3, H=8, stack=True, poke=lambda w, h, wi, d: wi.__setitem__((1, 0, 0), 1e24)),
    "dropout-beyond": lambda: _half_case(3, H=8, stack=True, drop=True,
                                         poke=lambda w, h, wi, d: d.__setitem__((0, 1, 1, 1), 1e25)),
    "just-in-range": lambda: _half_case(2, poke=lambda w, *_: w.__setitem__((1, 5, 5), 3e22)),
}


@pytest.mark.parametrize("case", HALF_CASES)
def test_half_operands_kernel_matches_the_formulas_bit_for_bit(case):
    """half_operands_kernel (one launch after ATen's magnitudes) against the same formulas in ATen's ops: the
    float16 operands and the scales bit for bit, and the range error where a finite magnitude is beyond 2^75."""
    w_hh, h0, w_ih, drop = HALF_CASES[case]()
    w16_r, wih16_r, scales_r, flag_r = half_operands_reference(w_hh, h0, w_ih, drop)
    flags = kernels.barrier_errors.flags(torch.device("cpu"))  # the device's, and the host's copy
    assert [int(f[0]) for f in flags] == [0, 0]
    try:
        w16, wih16, scales = kernels._half_weights(w_hh, h0, w_ih, drop)
        assert [int(f[0]) for f in flags] == [flag_r, flag_r], case
    finally:
        for f in flags:
            f.zero_()
    assert flag_r == (2 if "beyond" in case else 0)
    assert torch.equal(w16.view(torch.int16), w16_r.view(torch.int16)), case
    assert (wih16 is None) == (wih16_r is None)
    if wih16 is not None:
        assert torch.equal(wih16.view(torch.int16), wih16_r.view(torch.int16)), case
    assert torch.equal(scales.view(torch.int32), scales_r.view(torch.int32)), (case, scales, scales_r)


def test_half_w_keeps_float32_operands_where_tf32_is_not_allowed(half_weights_calls):
    """A half_w config runs as configs.without_half_w (W^T streamed in float32) when PyTorch's RNN precision
    says full float32: exact to the interpreter's float32 tolerance."""
    problem = make_problem(6, 17, 10, 33, torch.float32)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        check_against_reference(problem, torch.float32, config=HALF_CONFIGS["resident"])
    assert half_weights_calls == []
    # A 16-bit layer given a half_w config (a hand-made cache, say) runs it without, as float16 W^T is W itself.
    problem = make_problem(6, 17, 10, 33, torch.float16)
    check_against_reference(problem, torch.float16, config=HALF_CONFIGS["resident"])
    assert half_weights_calls == []
    with pytest.raises(ValueError, match="half_w"):  # a launcher given one anyway refuses it
        kernels._half_w(HALF_CONFIGS["resident"], torch.float16)


@pytest.mark.parametrize("config", [None, MULTI_PROGRAM[0].values[0]], ids=["default", "stepwise"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_lengths_match_reference(reverse, config):
    problem = make_problem(7, 5, 6, 12, torch.float32)
    lengths = torch.tensor([7, 3, 1, 5, 7])
    check_against_reference(problem, torch.float32, reverse=reverse, lengths=lengths, config=config)


@pytest.mark.parametrize("lengths", [None, torch.tensor([6, 2, 5])], ids=["padded", "lengths"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("init", [True, False], ids=["h0c0", "zeros"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_projection_matches_reference(dtype, init, reverse, lengths, kernel_calls):
    problem = make_problem(6, 3, 5, 12, dtype, proj=4, init=init)
    check_against_reference(problem, dtype, reverse=reverse, lengths=lengths)
    assert kernel_calls == {"fwd": 1, "bwd": 1}


def test_reference_matches_nn_lstm_projection():
    T, B, I, H, P = 5, 3, 4, 7, 3
    m = torch.nn.LSTM(I, H, proj_size=P).double()
    x = torch.randn(T, B, I, dtype=torch.float64)
    h0, c0 = torch.randn(1, B, P, dtype=torch.float64), torch.randn(1, B, H, dtype=torch.float64)
    out, (hn, cn) = m(x, (h0, c0))
    y, (h, c) = tritonlstm.naive.lstm_layer_reference(x, m.weight_ih_l0, m.weight_hh_l0, m.bias_ih_l0, m.bias_hh_l0,
                                                      h0[0], c0[0], weight_hr=m.weight_hr_l0)
    torch.testing.assert_close(y, out)
    torch.testing.assert_close(h, hn[0])
    torch.testing.assert_close(c, cn[0])


def test_reference_matches_nn_lstm_packed():
    """The reference's lengths semantics are nn.LSTM's on a PackedSequence, both directions."""
    T, B, I, H = 6, 4, 5, 7
    m = torch.nn.LSTM(I, H, bidirectional=True).double()
    x = torch.randn(T, B, I, dtype=torch.float64)
    lengths = torch.tensor([6, 2, 4, 1])
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
    out, (hn, cn) = m(packed)
    out, _ = torch.nn.utils.rnn.pad_packed_sequence(out, total_length=T)
    zeros = torch.zeros(B, H, dtype=torch.float64)
    for d, sfx in enumerate(("", "_reverse")):
        w = [getattr(m, f"{n}_l0{sfx}") for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
        y, (h, c) = tritonlstm.naive.lstm_layer_reference(x, *w, zeros, zeros, reverse=bool(d), lengths=lengths)
        torch.testing.assert_close(y, out[..., d * H:(d + 1) * H])
        torch.testing.assert_close(h, hn[d])
        torch.testing.assert_close(c, cn[d])


def test_long_memory_gradient_through_forget_gate():
    """With f ~ 1 and i ~ 0, dL/dc0 must survive T steps almost unchanged (the exact c_t -> c_{t-1} path)."""
    T, B, H = 16, 2, 8
    problem = make_problem(T, B, 4, H, torch.float32, scale=0.01)
    problem["bias_ih"] = torch.zeros(4 * H)
    problem["bias_hh"] = torch.cat([torch.full((H,), -8.0), torch.full((H,), 8.0), torch.zeros(2 * H)])
    p = leaf(problem)
    y, (hn, cn) = fused_lstm(*(p[n] for n in NAMES), backend="triton")
    cn.sum().backward()
    assert torch.allclose(p["c0"].grad, torch.ones(B, H), atol=1e-2), p["c0"].grad
    errs = check_against_reference(problem, torch.float32)
    assert errs["dc0"] < 1e-5


def test_gradients_bitwise_deterministic():
    problem = make_problem(5, 17, 6, 33, torch.float32)
    config = MULTI_PROGRAM[0].values[0]
    grads = []
    for _ in range(2):
        p = leaf(problem)
        with use_config(config):
            y, (hn, cn) = fused_lstm(*(p[n] for n in NAMES), backend="triton")
            (y.sum() + hn.square().sum() + cn.sum()).backward()
        grads.append([p[n].grad for n in NAMES])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_no_grad_forward_saves_nothing_and_matches(kernel_calls):
    problem = make_problem(5, 3, 4, 8, torch.float32)
    with torch.no_grad():
        y, (hn, cn) = fused_lstm(*(problem[n] for n in NAMES), backend="triton")
    _, (y_r, hn_r, cn_r) = reference(problem)
    assert rel_err(y, y_r) < RESOLUTION[torch.float32]
    assert rel_err(cn, cn_r) < RESOLUTION[torch.float32]
    assert kernel_calls == {"fwd": 1, "bwd": 0}


def test_only_some_inputs_require_grad():
    problem = make_problem(4, 3, 5, 8, torch.float32)
    p = {n: t.clone() for n, t in problem.items()}
    p["weight_hh"].requires_grad_()
    y, _ = fused_lstm(*(p[n] for n in NAMES), backend="triton")
    y.sum().backward()
    assert p["weight_hh"].grad is not None and p["x"].grad is None


def test_only_h_n_used_in_loss():
    problem = make_problem(5, 3, 4, 8, torch.float32)
    p = leaf(problem)
    _, (hn, _) = fused_lstm(*(p[n] for n in NAMES), backend="triton")
    hn.sum().backward()
    q, (_, hn_r, _) = reference(problem)
    hn_r.sum().backward()
    for n in NAMES:
        assert rel_err(p[n].grad, q[n].grad) < 1e-4, n


def test_nan_propagates_like_torch():
    problem = make_problem(4, 3, 5, 8, torch.float32)
    problem["x"][1, 0, 2] = float("nan")
    with torch.no_grad():
        y, (hn, cn) = fused_lstm(*(problem[n] for n in NAMES), backend="triton")
        y_t, (hn_t, cn_t) = fused_lstm(*(problem[n] for n in NAMES), backend="torch")
    assert torch.equal(torch.isnan(y), torch.isnan(y_t))
    assert torch.isnan(y[1:, 0]).all() and not torch.isnan(y[:, 1:]).any()
    assert torch.equal(torch.isnan(cn), torch.isnan(cn_t))


def test_inf_input_matches_torch():
    problem = make_problem(3, 2, 4, 8, torch.float32)
    problem["x"][0, 1, 0] = float("inf")
    with torch.no_grad():
        y, _ = fused_lstm(*(problem[n] for n in NAMES), backend="triton")
        y_t, _ = fused_lstm(*(problem[n] for n in NAMES), backend="torch")
    torch.testing.assert_close(y, y_t, equal_nan=True, rtol=1e-5, atol=1e-5)


def test_empty_batch_matches_nn_lstm():
    m = torch.nn.LSTM(4, 6)
    x = torch.randn(3, 0, 4)
    y, (hn, cn) = fused_lstm(x, m.weight_ih_l0, m.weight_hh_l0, m.bias_ih_l0, m.bias_hh_l0, backend="triton")
    y_t, (hn_t, _) = m(x)
    assert y.shape == y_t.shape == (3, 0, 6) and hn.shape == (0, 6) == hn_t.shape[1:]


def test_torch_backend_matches_nn_lstm():
    m = torch.nn.LSTM(5, 7).double()
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    y, (hn, cn) = fused_lstm(x, m.weight_ih_l0, m.weight_hh_l0, m.bias_ih_l0, m.bias_hh_l0, backend="torch")
    y_t, (hn_t, cn_t) = m(x)
    torch.testing.assert_close(y, y_t)
    torch.testing.assert_close(cn, cn_t[0])


def test_auto_backend_runs_triton_under_interpreter(kernel_calls):
    problem = make_problem(3, 2, 4, 8, torch.float32)
    with torch.no_grad():
        fused_lstm(*(problem[n] for n in NAMES))
    assert kernel_calls["fwd"] == 1


def test_auto_backend_float64_uses_torch(kernel_calls):
    problem = make_problem(3, 2, 4, 8, torch.float64)
    fused_lstm(*(problem[n] for n in NAMES))
    assert kernel_calls["fwd"] == 0


# Two persistent programs that the interpreter runs one after another (with _check_residency off): program 0's first
# barrier waits for a program that never arrives, and gives up after max_spin polls.
NEVER_MEETS = LSTMConfig(block_h=8, block_b=4, block_k=16, w_resident=True, persistent=True, max_spin=20)


def test_barrier_that_cannot_complete_raises(monkeypatch):
    """A persistent launch whose programs cannot all be resident: the interpreter runs program 0 to the end
    before program 1 starts, so program 0's barrier can never complete.
    It must raise, not hang."""
    monkeypatch.setattr(kernels, "_check_residency", lambda *a: None)
    config = NEVER_MEETS
    problem = make_problem(3, 2, 4, 16, torch.float32)
    with use_config(config), torch.no_grad(), pytest.raises(RuntimeError, match="barrier"):
        fused_lstm(*(problem[n] for n in NAMES), backend="triton")


def test_failed_barrier_poisons_outputs_and_is_reported_once(monkeypatch):
    """Without the per-launch check the failure still cannot pass for a result: every output after the failed
    barrier is NaN, and the flag stays set until the host reports it, once."""
    monkeypatch.setattr(kernels, "_check_residency", lambda *a: None)
    errors, cpu = kernels.barrier_errors, torch.device("cpu")
    monkeypatch.setattr(errors, "launched", lambda device, capturing: None)
    # Outputs start at zero, not conftest's NaN: program 1's unwritten h would otherwise carry NaN into program
    # 0's later steps whether or not the failure poisoned them.
    monkeypatch.setattr(kernels, "_alloc", lambda shape, dtype, device: torch.zeros(shape, dtype=dtype, device=device))
    config = NEVER_MEETS
    problem = make_problem(3, 2, 4, 16, torch.float32)
    with use_config(config), torch.no_grad():
        y, (hn, cn) = fused_lstm(*(problem[n] for n in NAMES), backend="triton")
    # Program 0 (units 0..7) ran every step before program 1 started: its step 0 preceded the failure.
    assert torch.isfinite(y[0, :, :8]).all()
    assert torch.isnan(y[1:]).all() and torch.isnan(y[:, :, 8:]).all()
    assert torch.isnan(hn).all() and torch.isnan(cn).all()
    with pytest.raises(RuntimeError, match="barrier"):
        tritonlstm.synchronize("cpu")
    tritonlstm.synchronize("cpu")
    assert int(errors.flag(cpu)[0]) == 0


def test_backward_barrier_that_cannot_complete_poisons_gradients_and_raises(monkeypatch):
    """The backward's barrier: program 0 runs every step before program 1 starts (interpreter), so its first
    barrier waits for a program that never arrives. Bounded: NaN gradients, then an error."""
    monkeypatch.setattr(kernels, "_check_residency", lambda *a: None)
    monkeypatch.setattr(kernels.barrier_errors, "launched", lambda device, capturing: None)
    config = NEVER_MEETS
    problem = leaf(make_problem(3, 2, 4, 16, torch.float32))
    y, _ = fused_lstm(*(problem[n] for n in NAMES), backend="triton")
    with use_config(config, "bwd"):
        y.sum().backward()
    assert torch.isnan(problem["weight_hh"].grad).any()
    with pytest.raises(RuntimeError, match="barrier"):
        tritonlstm.synchronize("cpu")


def test_failed_launches_report_into_the_host_flag_themselves(monkeypatch):
    """v0.75: the host's flag is its own memory (pinned on a GPU), written by the program that gives up: nothing
    copies it here (check and launched do nothing), yet a failed forward, backward and 2-D backward each set it; a
    launch that went well writes nothing (a sentinel there stays). The flag left set, the next check raises and
    clears both."""
    errors, cpu = kernels.barrier_errors, torch.device("cpu")
    monkeypatch.setattr(kernels, "_check_residency", lambda *a: None)
    check = errors.check
    monkeypatch.setattr(errors, "launched", lambda device, capturing: None)
    monkeypatch.setattr(errors, "check", lambda device, wait=False: None)
    err, host = errors.flags(cpu)
    assert host.data_ptr() != err.data_ptr()
    failing_2d = LSTMConfig(block_h=16, block_b=4, block_k=64, w_resident=True, persistent=True, grid_2d=True,
                            max_spin=20)
    try:
        for kernel, config, H in (("fwd", NEVER_MEETS, 16), ("bwd", NEVER_MEETS, 16), ("bwd", failing_2d, 33)):
            problem = leaf(make_problem(3, 2, 4, H, torch.float32))
            for cfg, sentinel in ((None, 5), (config, 0)):
                err.zero_()
                host.fill_(sentinel)
                with use_config(cfg if kernel == "fwd" else None, "fwd"):
                    y, _ = fused_lstm(*(problem[n] for n in NAMES), backend="triton")
                with use_config(cfg if kernel == "bwd" else None, "bwd"):
                    y.sum().backward()
                assert int(host[0]) == (sentinel if cfg is None else 1), (kernel, H, cfg)
                assert int(err[0]) == (0 if cfg is None else 1), (kernel, H, cfg)
        with pytest.raises(RuntimeError, match="barrier"):
            check(cpu)
        assert int(host[0]) == 0 and int(err[0]) == 0
    finally:
        err.zero_()
        host.zero_()


def test_flag_left_by_a_failed_launch_is_raised_by_the_next_launch():
    problem = make_problem(3, 2, 4, 8, torch.float32)
    args = [problem[n] for n in NAMES]
    for flag in kernels.barrier_errors.flags(torch.device("cpu")):  # as a failed launch leaves them
        flag.fill_(1)
    with torch.no_grad(), pytest.raises(RuntimeError, match="barrier"):
        fused_lstm(*args, backend="triton")
    with torch.no_grad():
        y, _ = fused_lstm(*args, backend="triton")
    assert torch.isfinite(y).all()


def test_persistent_multi_program_refused_under_interpreter():
    config = LSTMConfig(block_h=8, block_b=4, block_k=16, w_resident=True, persistent=True)
    problem = make_problem(3, 2, 4, 16, torch.float32)
    with use_config(config), torch.no_grad(), pytest.raises(ValueError, match="persistent"):
        fused_lstm(*(problem[n] for n in NAMES), backend="triton")


def test_tf32_follows_cudnn_flag():
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        assert kernels._dot_precision(torch.float32) == "ieee"
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=True):
        assert kernels._dot_precision(torch.float32) == "tf32"
    assert kernels._dot_precision(torch.float16) == "tf32"  # ignored for 16-bit operands


def test_launch_plan_follows_the_precision_flag_between_calls(monkeypatch):
    """The forward's and the backward's launch plans (built once per key, perf/NOTES.md v0.49) take the float32 dot
    precision from PyTorch's flag at each call: the same shape under both settings launches with both."""
    seen = []
    run = kernels._run
    monkeypatch.setattr(kernels, "_run", lambda kernel, grid, n, config, device, args, constexprs, *rest: (
        seen.append((kernel.fn.__name__, constexprs["DOT_PRECISION"])),
        run(kernel, grid, n, config, device, args, constexprs, *rest))[1])
    problem = make_problem(3, 2, 4, 8, torch.float32)
    for allow in (False, True, False):
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=allow):
            ins = [problem[n].clone().requires_grad_() for n in NAMES]
            y, _ = fused_lstm(*ins, backend="triton")
            y.sum().backward()
    fwd = [p for name, p in seen if name == "lstm_fwd_kernel"]
    bwd = [p for name, p in seen if name == "lstm_bwd_kernel"]
    assert fwd[0] == bwd[0] == "ieee" and "tf32" in fwd and "tf32" in bwd and fwd[-1] == bwd[-1] == "ieee"


_PRECISION_API_CHECK = """
import os, sys
os.environ["TRITON_INTERPRET"] = "1"
import torch
sys.path.insert(0, {tests!r})
from helpers import NAMES, make_problem
from tritonlstm import fused_lstm
from tritonlstm.kernels import lstm as kernels
target = torch.backends.cudnn.rnn
if {where!r} == "inherited":
    torch.backends.cudnn.rnn.fp32_precision = torch.backends.cudnn.fp32_precision = "none"
    target = torch.backends
target.fp32_precision = "ieee"
assert kernels._dot_precision(torch.float32) == "ieee"
problem = make_problem(3, 2, 4, 8, torch.float32)
with torch.no_grad():
    y, _ = fused_lstm(*(problem[n] for n in NAMES), backend="triton")
assert torch.isfinite(y).all()
target.fp32_precision = "tf32"
assert kernels._dot_precision(torch.float32) == "tf32"
print("OK")
"""


@pytest.mark.skipif(not hasattr(getattr(torch.backends.cudnn, "rnn", None), "fp32_precision"),
                    reason="this torch has no per-operator fp32 precision API")
@pytest.mark.parametrize("where", ["rnn", "inherited"])
def test_tf32_follows_the_rnn_precision_api(where):
    """PyTorch's per-operator API (torch.backends.cudnn.rnn.fp32_precision, or with it and cuDNN's "none" the
    global one): as nn.LSTM's cuDNN path reads it. Reading the legacy allow_tf32 then would raise in PyTorch
    (conv and RNN precisions differ), which made a float32 forward crash. In a process of its own: these
    settings cannot be put back as they were (setting one marks it explicit, and a parent's "none" then reaches
    the unset ones), and the legacy flag raises for every later test once conv and RNN differ."""
    import subprocess
    import sys
    from pathlib import Path

    code = _PRECISION_API_CHECK.format(tests=str(Path(__file__).parent), where=where)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


def test_torch_compile_fullgraph_forward_and_backward():
    """The op is one custom op to dynamo: no graph break, same gradients as eager."""
    problem = make_problem(4, 3, 5, 8, torch.float32)

    def f(*args):
        y, (hn, cn) = fused_lstm(*args, backend="triton")
        return (y * y).sum() + hn.sum() + cn.sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    p, q = leaf(problem), leaf(problem)
    compiled(*(p[n] for n in NAMES)).backward()
    f(*(q[n] for n in NAMES)).backward()
    for n in NAMES:
        torch.testing.assert_close(p[n].grad, q[n].grad, rtol=1e-6, atol=1e-7)


def test_non_contiguous_inputs():
    """Batch-first data transposed to time-major, transposed weights: same results as contiguous copies."""
    problem = make_problem(5, 3, 6, 8, torch.float32)
    nc = dict(problem)
    nc["x"] = problem["x"].transpose(0, 1).contiguous().transpose(0, 1)
    nc["weight_hh"] = problem["weight_hh"].t().contiguous().t()
    nc["h0"] = problem["h0"].t().contiguous().t()
    assert not nc["x"].is_contiguous() and not nc["weight_hh"].is_contiguous()
    p, q = leaf(problem), {n: t.detach().requires_grad_() if t is not None else None for n, t in nc.items()}
    y1, (h1, c1) = fused_lstm(*(p[n] for n in NAMES), backend="triton")
    y2, (h2, c2) = fused_lstm(*(q[n] for n in NAMES), backend="triton")
    torch.testing.assert_close(y1, y2)
    (y1.sum() + c1.sum()).backward()
    (y2.sum() + c2.sum()).backward()
    for n in NAMES:
        torch.testing.assert_close(p[n].grad, q[n].grad)


@pytest.mark.parametrize("config", [None, MULTI_PROGRAM[0].values[0], MULTI_PROGRAM[1].values[0],
                                    LSTMConfig(block_h=16, block_b=4, block_k=64, w_resident=True, batch_groups=2,
                                               persistent=False, transposed=True),
                                    LSTMConfig(block_h=16, block_b=4, block_k=64, w_resident=True, batch_groups=2,
                                               persistent=False, grid_2d=True)],
                         ids=["default", "stepwise-P5-Q2", "streamedW", "transposed-reduce-scatter", "grid-2d"])
@pytest.mark.parametrize("lengths", [None, torch.tensor([6, 2, 5, 1, 6])], ids=["padded", "lengths"])
@pytest.mark.parametrize("proj", [0, 4], ids=["noproj", "proj4"])
def test_both_directions_in_one_launch(config, lengths, proj, kernel_calls):
    """lstm_layer with two directions (the second reversed) in one launch: outputs concatenated as nn.LSTM
    does, states stacked, every gradient, against the float64 reference run direction by direction."""
    from tritonlstm.functional import lstm_layer
    from tritonlstm.naive import lstm_layer_reference

    T, B, I, H = 6, 5, 7, 33 if config is not None else 12
    fwd, bwd = (make_problem(T, B, I, H, torch.float32, proj=proj) for _ in range(2))
    x = fwd["x"]
    keys = ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")
    h0 = torch.stack([fwd["h0"], bwd["h0"]])
    c0 = torch.stack([fwd["c0"], bwd["c0"]])

    def leaves(dtype):
        ws = [{k: p[k].detach().to(dtype).requires_grad_() if p.get(k) is not None else None for k in keys}
              for p in (fwd, bwd)]
        return ws, [t.detach().to(dtype).requires_grad_() for t in (x, h0, c0)]

    ws, (xl, hl, cl) = leaves(torch.float32)
    with use_config(config):
        y, (hn, cn) = lstm_layer(xl, [tuple(w[k] for k in keys) for w in ws], hl, cl, lengths=lengths,
                                 backend="triton")
    rs, (xr, hr, cr) = leaves(torch.float64)
    outs = [lstm_layer_reference(xr, *(rs[d][k] for k in keys[:4]), hr[d], cr[d], d == 1, lengths, rs[d]["weight_hr"])
            for d in range(2)]
    y_r = torch.cat([o[0] for o in outs], dim=2)
    hn_r = torch.stack([o[1][0] for o in outs])
    cn_r = torch.stack([o[1][1] for o in outs])
    weights = tuple(torch.randn_like(t) for t in (y_r, hn_r, cn_r))
    loss_of(y, hn, cn, weights).backward()
    loss_of(y_r, hn_r, cn_r, weights).backward()
    tol = RESOLUTION[torch.float32]
    assert rel_err(y, y_r) < tol and rel_err(hn, hn_r) < tol and rel_err(cn, cn_r) < tol
    for a, b in ((xl, xr), (hl, hr), (cl, cr)):
        assert rel_err(a.grad, b.grad) < 2 * tol
    for d in range(2):
        for k in keys:
            if ws[d][k] is not None:
                assert rel_err(ws[d][k].grad, rs[d][k].grad) < 2 * tol, (d, k)
    assert kernel_calls == {"fwd": 1, "bwd": 1}


def _stack_leaves(layers, dtype):
    """x, each layer's (weight_ih, weight_hh, bias_ih, bias_hh) and the stacked h0, c0 of `layers` (make_problem's),
    as leaves in `dtype`."""
    ws = [tuple(p[k].detach().to(dtype).requires_grad_() for k in NAMES[1:5]) for p in layers]
    st = [torch.stack([p[n] for p in layers]).detach().to(dtype).requires_grad_() for n in ("h0", "c0")]
    return layers[0]["x"].detach().to(dtype).requires_grad_(), ws, st


def _check_stack_against_reference(layers, scale, lengths, leaves, outs, tol):
    """A stack's outputs and (after its backward, run here) every gradient against the float64 reference run layer
    by layer, with `scale` (or None) multiplying each layer's output before the layer above."""
    xr, wr, (h0r, c0r) = _stack_leaves(layers, torch.float64)
    yr, hs, cs = xr, [], []
    for l in range(len(layers)):
        if l > 0 and scale is not None:
            yr = yr * scale[l - 1].double()
        yr, (h, c) = tritonlstm.naive.lstm_layer_reference(yr, *wr[l], h0r[l], c0r[l], lengths=lengths)
        hs.append(h)
        cs.append(c)
    refs = (yr, torch.stack(hs), torch.stack(cs))
    weights = tuple(torch.randn_like(t) for t in refs)
    loss_of(*outs, weights).backward()
    loss_of(*refs, weights).backward()
    assert all(rel_err(a, b) < tol for a, b in zip(outs, refs)), [rel_err(a, b) for a, b in zip(outs, refs)]
    x, ws, h0, c0 = leaves
    for a, b in [(x, xr), (h0, h0r), (c0, c0r)] + [(p, q) for wl, wq in zip(ws, wr) for p, q in zip(wl, wq)]:
        assert rel_err(a.grad, b.grad) < 2 * tol


_STACK_CONFIGS = {"default": None, "stepwise-P5-Q2": MULTI_PROGRAM[0].values[0],
                  "streamedW": MULTI_PROGRAM[1].values[0], "split4": MULTI_PROGRAM[3].values[0],
                  "transposed": LSTMConfig(block_h=16, block_b=4, block_k=64, w_resident=True, batch_groups=2,
                                           persistent=False, transposed=True),
                  "transposed-streamed": LSTMConfig(block_h=16, block_b=4, block_k=16, w_resident=False,
                                                    batch_groups=1, persistent=False, transposed=True)}
# T = 4 with 3 layers: 6 wavefront steps, the lengths ending at each step but the last (CI time: every step of a
# multi-program stack is its own interpreted launch).
_STACK_LENGTHS = {"padded": None, "lengths": torch.tensor([4, 2, 3, 1, 4])}
_STACK_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
# Every config x lengths x dtype without dropout, but the two multi-program combinations that a dropout case
# below repeats with dropout (CI time); with dropout, each multi-program config meets each lengths and each
# dtype once (the dropout code is the same for all).
_STACK_CASES = [(c, n, d, False) for c in _STACK_CONFIGS if c not in ("split4", "transposed", "transposed-streamed")
                for n in _STACK_LENGTHS
                for d in _STACK_DTYPES
                if (c, n, d) not in {("stepwise-P5-Q2", "padded", "fp16"), ("stepwise-P5-Q2", "lengths", "fp32")}] + [
    ("stepwise-P5-Q2", "padded", "fp16", True), ("stepwise-P5-Q2", "lengths", "fp32", True),
    ("streamedW", "padded", "fp32", True), ("streamedW", "lengths", "fp16", True),
    ("split4", "lengths", "fp16", True),
    ("transposed", "padded", "fp32", False), ("transposed", "lengths", "fp16", True),
    ("transposed-streamed", "lengths", "fp32", True)]
# A stack run as consecutive wavefronts of 2 layers (configs.stack_layers_per_launch: where all its layers' W
# cannot stay on chip together): 2 + 1 layers, the dropout between the two launches applied outside them.
_SPAN_CASES = [("default", "lengths", "fp32", True), ("stepwise-P5-Q2", "padded", "fp16", True)]


@pytest.mark.parametrize("config,lengths,dtype,dropout,span", [
    pytest.param(_STACK_CONFIGS[c], _STACK_LENGTHS[n], _STACK_DTYPES[d], drop, span,
                 id=f"{c}-{n}-{d}" + ("-dropout" if drop else "") + (f"-span{span}" if span else ""))
    for cases, span in ((_STACK_CASES, None), (_SPAN_CASES, 2)) for c, n, d, drop in cases])
def test_wavefront_stack_matches_layer_by_layer(config, lengths, dtype, dropout, span, monkeypatch):
    """lstm_stack (every layer in one forward launch, and in one backward launch, or with `span` in launches of
    that many layers; with a dropout scale between the layers or none) against the float64 reference run
    layer by layer: outputs, states and every gradient."""
    import tritonlstm.functional as F
    from tritonlstm.functional import lstm_stack

    if span:
        monkeypatch.setattr(F, "_layers_per_launch", lambda *a: span)
    launches = []
    for name in ("lstm_stack_forward", "lstm_stack_backward", "lstm_forward", "lstm_backward"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _n=name, _f=real, **k: launches.append(_n) or _f(*a, **k))
    T, B, I, H, L = 4, 5, 7, 33 if config is not None else 12, 3
    layers = [make_problem(T, B, I if l == 0 else H, H, dtype) for l in range(L)]
    x, ws, (h0, c0) = _stack_leaves(layers, dtype)
    scale = None
    if dropout:
        g = torch.Generator().manual_seed(7)
        scale = (torch.rand(L - 1, T, B, H, generator=g) > 0.3).to(dtype) / 0.7
    with use_config(config):
        y, (hn, cn) = lstm_stack(x, ws, h0, c0, lengths=lengths, dropout_scale=scale, backend="triton")
        _check_stack_against_reference(layers, scale, lengths, (x, ws, h0, c0), (y, hn, cn), RESOLUTION[dtype])
    chunks = -(-L // span) if span else 1
    assert launches == ["lstm_stack_forward"] * chunks + ["lstm_stack_backward"] * chunks


def test_half_w_stack_matches_layer_by_layer(half_weights_calls):
    """A float32 wavefront stack on float16 operands (LSTMConfig.half_w): W_hh and W_ih of each layer scaled apart,
    the layer below's output scaled by its dropout's largest factor (1 / keep: 1e4 at keep = 1e-4, beyond float16's
    range after the 2^14 that h alone takes), lengths; outputs, states and every gradient (the backward in float32)
    against the float64 reference, at TF32's tolerance."""
    from tritonlstm.functional import lstm_stack

    T, B, I, H, L, keep = 4, 5, 7, 33, 3, 1e-4
    lengths = torch.tensor([4, 2, 3, 1, 4])
    layers = [make_problem(T, B, I if l == 0 else H, H, torch.float32) for l in range(L)]
    layers[1]["weight_hh"] *= 1e-6  # its own scale, apart from the other layers'
    for p in layers[1:]:  # inputs up to 1 / keep, products of order one (TF32's rounding of larger ones is larger)
        p["weight_ih"] *= keep
    x, ws, (h0, c0) = _stack_leaves(layers, torch.float32)
    g = torch.Generator().manual_seed(7)
    scale = (torch.rand(L - 1, T, B, H, generator=g) < max(keep, 0.5)).float() / keep
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=True), use_config(HALF_CONFIGS["resident"]):
        y, (hn, cn) = lstm_stack(x, ws, h0, c0, lengths=lengths, dropout_scale=scale, backend="triton")
        _check_stack_against_reference(layers, scale, lengths, (x, ws, h0, c0), (y, hn, cn), HALF_TOL)
    assert [(w.dtype, wi.dtype) for w, wi, _ in half_weights_calls] == [(torch.float16, torch.float16)]


@pytest.mark.parametrize("device", [None, "cpu", torch.device("cpu")], ids=["default", "str", "device"])
def test_synchronize_is_quiet_when_no_barrier_failed(device):
    assert int(kernels.barrier_errors.flag(torch.device("cpu"))[0]) == 0
    tritonlstm.synchronize(device)


class _LaunchLog:
    """Stands in for a jitted kernel: records each launch's (S_START, S_COUNT) and the counters it started from."""

    def __init__(self, real=None, sync=None):
        self.real, self.sync, self.launches = real, sync, []

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.launches.append((args[-3], args[-2], None if self.sync is None else self.sync.tolist()))
            if self.real is not None:
                self.real[grid](*args, **meta)
            else:
                self.sync.fill_(99)  # what a launch leaves in its counters
        return launch


def test_persistent_launch_splits_where_the_barrier_counter_would_reach_its_limit():
    """Each step adds grid[0] * grid[2] arrivals to a counter, which must stay below RELEASED (a failed barrier
    sets it there): longer launches run as consecutive launches, each from zeroed counters."""
    sync = torch.zeros(2, dtype=torch.int32)
    log = _LaunchLog(sync=sync)
    steps_per_launch = (kernels.RELEASED.value - 1) // (40 * 3)
    n_steps = 2 * steps_per_launch + 5
    config = LSTMConfig(block_h=8, block_b=4, block_k=16, w_resident=True, persistent=True)
    kernels._run(log, (40, 2, 3), n_steps, config, torch.device("cpu"), (sync, 0, 0, 0, 0, 0, 0), {}, sync)
    assert log.launches == [(0, steps_per_launch, [0, 0]), (steps_per_launch, steps_per_launch, [0, 0]),
                            (2 * steps_per_launch, 5, [0, 0])]


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_split_persistent_launches_match_reference(monkeypatch, reverse):
    """The same recurrence cut into launches of 3 steps (forward) and of 3 (backward): the state between
    launches lives in memory, as between stepwise launches."""
    monkeypatch.setattr(kernels, "RELEASED", tl.constexpr(4))
    logs, real_run = {}, kernels._run

    def run(kernel, *args):
        logs[kernel] = log = _LaunchLog(kernel)
        real_run(log, *args)

    monkeypatch.setattr(kernels, "_run", run)
    config = MULTI_PROGRAM[2].values[0]  # one program, persistent
    check_against_reference(make_problem(7, 5, 6, 12, torch.float32), torch.float32, reverse=reverse,
                            lengths=torch.tensor([7, 3, 6, 1, 7]), config=config)
    assert [(s, n) for s, n, _ in logs[kernels.lstm_fwd_kernel].launches] == [(0, 3), (3, 3), (6, 1)]
    assert [(s, n) for s, n, _ in logs[kernels.lstm_bwd_kernel].launches] == [(0, 3), (3, 3), (6, 2)]


@pytest.mark.parametrize("lengths,reverse", [(None, False), (torch.tensor([6, 2, 5]), True)],
                         ids=["fwd", "rev-lengths"])
def test_prefetched_step_inputs_give_the_same_bits(lengths, reverse, monkeypatch):
    """A one-tile persistent launch loads its next step's own inputs before the barrier (PREFETCH, perf/NOTES.md
    v0.23: the forward its gx, carrying c in registers; the backward its saved gates, c_t, c_{t-1} and dy,
    carrying dc): the same arithmetic in the same order as loading them after the wait, so the same bits,
    training (gates over gx, dG over the gates) and inference alike. Also the launch-split path (a new launch
    reloads its state)."""
    import dataclasses

    problem = make_problem(6, 3, 5, 16, torch.float32)
    base = tritonlstm.configs.heuristic_config(16, 3, torch.float32, None, interpreter=True)
    assert base.persistent and base.prefetches(3, 16) and not base.prefetches(3, 24)
    outs = {}
    for prefetch in (True, False):
        p = leaf(problem)
        with use_config(dataclasses.replace(base, prefetch=prefetch)):
            y, (hn, cn) = fused_lstm(*(p[n] for n in NAMES), lengths=lengths, reverse=reverse, backend="triton")
            (y.square().sum() + hn.sum() + cn.sum()).backward()
        outs[prefetch] = [y, hn, cn] + [p[n].grad for n in NAMES]
    assert all(torch.equal(a, b) for a, b in zip(outs[True], outs[False]))
    monkeypatch.setattr(kernels, "RELEASED", tl.constexpr(3))  # launches of 2 steps: c through memory between
    with use_config(base), torch.no_grad():
        y, _ = fused_lstm(*(problem[n] for n in NAMES), lengths=lengths, reverse=reverse, backend="triton")
    assert torch.equal(y, outs[True][0].detach())


@pytest.mark.parametrize("lengths,reverse", [(None, False), (torch.tensor([6, 2, 5]), True)],
                         ids=["fwd", "rev-lengths"])
def test_reduce_scatter_backward_persistent_prefetched_and_split(lengths, reverse, monkeypatch, kernel_calls):
    """The backward's dh by reduce-scatter (perf/NOTES.md v0.24) on a persistent launch: its shares pass between
    steps through the double-buffered ring inside one launch, and across launches where the launch is split;
    prefetched inputs give the same bits as loading them after the wait; every gradient matches the reference."""
    import dataclasses

    config = LSTMConfig(block_h=16, block_b=4, block_k=16, w_resident=True, persistent=True, transposed=True)
    assert config.prefetches(3, 16)
    problem = make_problem(6, 3, 5, 16, torch.float32)
    check_against_reference(problem, torch.float32, reverse=reverse, lengths=lengths, config=config)
    grads = {}
    for name, cfg, released in (("prefetch", config, None), ("no-prefetch", dataclasses.replace(config, prefetch=False),
                                                             None), ("split", config, 3)):
        if released:
            monkeypatch.setattr(kernels, "RELEASED", tl.constexpr(released))  # launches of 2 steps
        p = leaf(problem)
        with use_config(cfg):
            y, (hn, cn) = fused_lstm(*(p[n] for n in NAMES), lengths=lengths, reverse=reverse, backend="triton")
            (y.square().sum() + hn.sum() + cn.sum()).backward()
        grads[name] = [p[n].grad for n in NAMES]
    assert all(torch.equal(a, b) for a, b in zip(grads["prefetch"], grads["no-prefetch"]))
    assert all(torch.equal(a, b) for a, b in zip(grads["prefetch"], grads["split"]))


# The backward's product on a 2-D grid (perf/NOTES.md v0.26): H = 33 in blocks of 16 makes 3 blocks, rounded to
# NB = 4 a side (the fourth empty), 16 programs per batch group, each owning 4 units of its block in the gate
# phase; 17 rows in tiles of 4 over 2 batch groups; stepwise, each half-step its own launch. And one persistent
# program (H = 16: NB = 1), where the two phases meet at the barrier.
GRID_2D = [pytest.param(LSTMConfig(block_h=16, block_b=4, block_k=64, w_resident=True, batch_groups=2,
                                   persistent=False, grid_2d=True), 33, id="stepwise-NB4-Q2-tiles3"),
           pytest.param(LSTMConfig(block_h=16, block_b=4, block_k=16, w_resident=True, persistent=True,
                                   grid_2d=True), 16, id="persistent-1prog")]


@pytest.mark.parametrize("config,H", GRID_2D)
@pytest.mark.parametrize("reverse,dtype,lengths", [(False, torch.float32, False), (True, torch.float16, True)],
                         ids=["fp32", "fp16-rev-lengths"])
def test_backward_on_a_2d_grid(config, H, reverse, dtype, lengths, kernel_calls):
    assert config.programs(H) == (32 if H == 33 else 1)
    problem = make_problem(6, 17, 10, H, dtype)
    lens = torch.tensor([6, 2, 5, 1, 6, 3, 4, 6, 1, 2, 6, 5, 3, 3, 6, 2, 4]) if lengths else None
    with use_config(None, "fwd"):
        check_against_reference(problem, dtype, reverse=reverse, lengths=lens, config=config)
    assert kernel_calls == {"fwd": 1, "bwd": 1}


# float32's backward on float16 operands (LSTMConfig.half_w, perf/NOTES.md v0.40, v0.41): W and each row of dG
# scaled by their own powers of two, so TF32's precision (the GPU's float32 tolerance) at float32's range. The 2-D
# grid's cases, and the tiles': unsplit over 17 programs of 2 units (the rows' largest |dG| gathered from 17
# programs, over two 16-wide loads), split-K, and one persistent program.
HALF_BWD = [pytest.param(dataclasses.replace(p.values[0], half_w=True), p.values[1], id="grid-2d-" + p.id)
            for p in GRID_2D] + [
    pytest.param(LSTMConfig(block_h=2, block_b=4, block_k=64, w_resident=True, batch_groups=2, persistent=False,
                            half_w=True), 33, id="tiles-stepwise-P17-Q2"),
    pytest.param(LSTMConfig(block_h=16, block_b=4, block_k=64, w_resident=True, batch_groups=2, persistent=False,
                            split_k=4, half_w=True), 33, id="tiles-split4-stepwise"),
    pytest.param(LSTMConfig(block_h=16, block_b=4, block_k=16, w_resident=True, persistent=True, half_w=True), 16,
                 id="tiles-persistent-1prog")]


@pytest.fixture
def half_bwd_launches(monkeypatch):
    """HALF_W of every single-layer backward launch (proof of which path ran)."""
    seen, real = [], kernels._run

    def spy(kernel, grid, n_steps, config, device, args, constexprs, *rest, **kw):
        if kernel in (kernels.lstm_bwd_2d_kernel, kernels.lstm_bwd_kernel):
            seen.append(constexprs["HALF_W"])
        return real(kernel, grid, n_steps, config, device, args, constexprs, *rest, **kw)

    monkeypatch.setattr(kernels, "_run", spy)
    return seen


# (Each case of these tests runs for seconds on the interpreter: the cases where the paths differ, not all of them.)
HALF_BWD_SINGLE = [p for p in HALF_BWD if "1prog" in p.id]


@pytest.mark.parametrize("config,H", HALF_BWD)
def test_half_w_backward_matches_reference_at_tf32_precision(config, H, half_bwd_launches):
    """Reverse, with per-row lengths (padded rows' dG zero, their largest |dG| masked)."""
    problem = make_problem(4, 17, 10, H, torch.float32)
    lens = torch.tensor([4, 2, 3, 1, 4, 3, 2, 4, 1, 2, 4, 3, 3, 1, 4, 2, 4])
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=True), use_config(None, "fwd"):
        check_against_reference(problem, torch.float32, reverse=True, lengths=lens, config=config, kernel="bwd",
                                tol=HALF_TOL)
    assert half_bwd_launches and all(half_bwd_launches)


@pytest.fixture
def half_g_launches(monkeypatch):
    """HALF_G of every 2-D grid backward launch."""
    return launch_constexprs(monkeypatch, "lstm_bwd_2d_kernel", "HALF_G")


# The 2-D grid's cases with HALF_G (v0.65: dG_{t+1} read in float16 as each gate-phase program scaled its own units):
# NB = 4 producers of 4 units a block, and one program (one producer).
HALF_G_CASES = [pytest.param(*p.values, True, id=p.id + "-half-g") for p in HALF_BWD if p.id.startswith("grid-2d")]


@pytest.mark.parametrize("config,H,half_g", [pytest.param(*p.values, False, id=p.id) for p in HALF_BWD
                                             if "1prog" in p.id or "P17" in p.id] + HALF_G_CASES)
def test_half_w_backward_scales_each_row_of_dg_on_its_own(config, H, half_g, half_bwd_launches, half_g_launches,
                                                          monkeypatch):
    """Rows of dG 1e24 apart (the output's gradient scaled row by row, which scales that row of dG): one scale for
    all of them, or none, would flush the small rows to zero or the large ones to inf in float16. Each row's input
    gradients are judged on their own, relative to their own size; h0's is dG_0 @ W_hh alone, the recurrent
    product with W_hh at 1e-12 (float16's subnormals end at 6e-8). The last unit's gradient is 1e5 times the
    others', so a row's largest |dG| is the last program's: a scale that missed it would overflow float16. With
    HALF_G the last program's units carry a scale 2^17 below the others' until the product brings them together."""
    monkeypatch.setattr(kernels, "HALF_G", half_g)
    T, B, I = 4, 5, 7
    problem = make_problem(T, B, I, H, torch.float32)
    problem["weight_hh"] = problem["weight_hh"] * 1e-12
    row = torch.tensor([1e-12, 1.0, 1e12, 3e-6, 7e8], dtype=torch.float64)
    p_ref, (y_r, _, _) = reference(problem)
    wy = torch.randn(y_r.shape, dtype=torch.float64) * row[None, :, None]
    wy[..., -1] *= 1e5
    (y_r * wy).sum().backward()
    p = leaf(problem)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=True), use_config(None, "fwd"), use_config(config, "bwd"):
        y, _ = fused_lstm(*(p[n] for n in NAMES), backend="triton")
        (y.double() * wy).sum().backward()
    for b in range(B):
        for n in ("x", "h0", "c0"):
            got, ref = p[n].grad.select(-2, b).double(), p_ref[n].grad.select(-2, b)
            assert rel_err(got, ref, floor=0) < HALF_TOL, (n, b, rel_err(got, ref, floor=0))
    assert rel_err(p["weight_hh"].grad, p_ref["weight_hh"].grad) < HALF_TOL
    assert half_bwd_launches and all(half_bwd_launches)
    assert half_g_launches == ([True] if half_g else [False] * config.grid_2d)


@pytest.mark.parametrize("config,H", [pytest.param(*p.values[:2], id=p.id) for p in HALF_G_CASES])
def test_half_g_backward_matches_the_float32_read(config, H, half_g_launches, monkeypatch):
    """HALF_G against the float32 read of dG (HALF_W alone): the same gradients to within float32's rounding of the
    products (the float16 operands differ only where they are subnormal, 2^29 under a row's largest), reversed with
    per-row lengths. (Against the reference: test_half_w_backward_scales_each_row_of_dg_on_its_own's HALF_G cases.)"""
    problem = make_problem(4, 9, 10, H, torch.float32)
    lens = torch.tensor([4, 2, 3, 1, 4, 3, 2, 4, 1])
    grads = []
    for half_g in (True, False):
        monkeypatch.setattr(kernels, "HALF_G", half_g)
        p = leaf(problem)
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=True), use_config(None, "fwd"), \
                use_config(config, "bwd"):
            y, (hn, cn) = fused_lstm(*(p[n] for n in NAMES), reverse=True, lengths=lens, backend="triton")
            (y * torch.arange(y.numel()).view_as(y).cos()).sum().backward()
        grads.append([p[n].grad for n in NAMES])
    assert half_g_launches == [True, False]
    for a, b in zip(*grads):
        assert rel_err(a, b) < 1e-6, rel_err(a, b)


@pytest.mark.parametrize("config,H", HALF_BWD_SINGLE)
def test_half_w_backward_scales_each_column_of_w_on_its_own(config, H, half_bwd_launches):
    """A unit whose W_hh weights are all 1e-10 times the others' (below 2^-29 of W's largest: one scale for all of
    W would flush them in float16): h0's gradient for that unit (dG_0 @ W_hh[:, unit] alone) judged on its own."""
    problem = make_problem(6, 5, 7, H, torch.float32)
    problem["weight_hh"][:, 0] *= 1e-10
    p_ref, (y_r, _, _) = reference(problem)
    wy = torch.randn(y_r.shape, dtype=torch.float64)
    (y_r * wy).sum().backward()
    p = leaf(problem)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=True), use_config(None, "fwd"), use_config(config, "bwd"):
        y, _ = fused_lstm(*(p[n] for n in NAMES), backend="triton")
        (y.double() * wy).sum().backward()
    got, ref = p["h0"].grad[:, 0], p_ref["h0"].grad[:, 0]
    assert rel_err(got, ref, floor=0) < 3 * HALF_TOL, rel_err(got, ref, floor=0)
    assert half_bwd_launches and all(half_bwd_launches)


def test_half_w_backward_keeps_float32_operands_where_tf32_is_not_allowed(half_bwd_launches):
    """A half_w backward runs as the heuristic's full-precision pick when PyTorch's RNN precision says float32 (its
    float32 W need not fit), and in 16-bit as it is without the flag (W is float16 already)."""
    config, H = HALF_BWD_SINGLE[0].values
    problem = make_problem(6, 17, 10, H, torch.float32)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False), use_config(None, "fwd"):
        check_against_reference(problem, torch.float32, config=config, kernel="bwd")
    assert half_bwd_launches == [False]  # the interpreter's heuristic pick
    problem = make_problem(6, 17, 10, H, torch.float16)
    with use_config(None, "fwd"):
        check_against_reference(problem, torch.float16, config=config, kernel="bwd")
    assert half_bwd_launches == [False, False]
    with pytest.raises(ValueError, match="half_w.*backward's 2-D grid or resident tiles"):
        kernels._half_w(config, torch.float16, backward=True)
    # A forward's transposed half_w config given to the backward (use_config for every kernel): its reduce-scatter
    # ignores the flag.
    assert not kernels._half_w(HALF_CONFIGS["resident"], torch.float32, backward=True)


@pytest.mark.parametrize("kernel", ["fwd", "bwd"])
def test_a_launch_the_gpu_cannot_hold_reruns_on_the_last_resort_config(kernel, monkeypatch):
    """Where Triton refuses a launch for want of shared memory (OutOfResources: raised before the kernel starts, on a
    GPU whose figures configs.fit_shared_memory was not checked against), the layer runs that recurrence again on
    configs.last_resort_config with a RuntimeWarning, and the results are the kernels' as usual; a config forced
    with use_config raises instead."""
    from triton.runtime.errors import OutOfResources

    from tritonlstm.configs import heuristic_config, last_resort_config

    name = {"fwd": "lstm_forward", "bwd": "lstm_backward"}[kernel]
    real, seen = getattr(kernels, name), []

    def refuses_once(*args, config, **kw):
        seen.append(config)
        if len(seen) == 1:
            raise OutOfResources(262144, 101376, "shared memory")
        return real(*args, config=config, **kw)

    monkeypatch.setattr(kernels, name, refuses_once)
    torch.manual_seed(0)
    T, B, H = 5, 3, 24
    with pytest.warns(RuntimeWarning, match="does not fit this GPU"):
        errors = check_against_reference(make_problem(T, B, 7, H, torch.float32), torch.float32)
    assert seen[1] == last_resort_config(kernel, B, torch.float32) and len(seen) == 2, (seen, errors)
    seen.clear()
    forced = heuristic_config(H, B, torch.float32, None, interpreter=True)
    with pytest.raises(OutOfResources):
        check_against_reference(make_problem(T, B, 7, H, torch.float32), torch.float32, config=forced)
    assert seen == [forced]


def test_cluster_exchange_is_refused_where_no_cluster_can_hold_the_barrier():
    """A cluster holds at most 16 CTAs (through Triton's launcher: at most 8, or 16), along the grid's axis 0: a
    barrier of other counts, a stack's (its barrier spans the layers, axis 2) and a 2-D grid's get a ValueError
    naming the exchange, not a launch that fails or hangs."""
    from tritonlstm.kernels import lstm as k

    cfg = LSTMConfig(block_h=16, block_b=16, block_k=64, w_resident=True, exchange="cluster")
    sync, cluster = k._barrier_state(cfg, (16, 2, 2), torch.device("cpu"))
    assert cluster == {"CLUSTER": True} and sync.numel() == 4
    with pytest.raises(ValueError, match="exchange='cluster'.*17 programs"):
        k._barrier_state(cfg, (17, 1, 1), torch.device("cpu"))
    # 9-15: non-portable cluster sizes, which Triton 3.6's launcher does not allow (it does for 16 only).
    assert k._barrier_state(cfg, (8, 1, 1), torch.device("cpu"))[1]["CLUSTER"]
    with pytest.raises(ValueError, match="exchange='cluster'.*at most 8 programs.*or exactly 16.*12 programs"):
        k._barrier_state(cfg, (12, 1, 1), torch.device("cpu"))
    with pytest.raises(ValueError, match="exchange='cluster'.*a stack"):
        k._barrier_state(cfg, (4, 1, 2), torch.device("cpu"), stack=True)
    with pytest.raises(ValueError, match="exchange='cluster'.*grid_2d"):
        LSTMConfig(block_h=32, block_b=32, block_k=64, w_resident=True, grid_2d=True, exchange="cluster")
    with pytest.raises(ValueError, match="exchange='cluster'.*persistent=False"):
        LSTMConfig(block_h=16, block_b=16, block_k=64, w_resident=True, persistent=False, exchange="cluster")


@pytest.mark.parametrize("capability", [(9, 0), (8, 0)], ids=["sm90", "sm80"])
def test_cluster_config_launches_as_a_cluster_only_where_the_gpu_has_clusters(capability, monkeypatch):
    """_run with a cluster config (v0.34) on a CUDA device, the launch itself stubbed: on sm_90 through
    _launch_as_cluster with CLUSTER set; on a GPU without thread-block clusters (a cache copied from an H100) the
    plain launch with the counter barrier (CLUSTER off, the same zeroed counters) and a warning naming the GPU."""
    from tritonlstm.kernels import lstm as k

    launches = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **meta: launches.append(("plain", grid, meta["CLUSTER"], meta["ARRIVE_EARLY"]))

    monkeypatch.setattr(k, "interpreting", lambda: False)
    monkeypatch.setattr(k, "_launch_as_cluster", lambda kernel, grid, args, meta: launches.append(
        ("cluster", grid, meta["CLUSTER"], meta["ARRIVE_EARLY"])))
    monkeypatch.setattr(k.barrier_errors, "check", lambda *a, **kw: None)
    monkeypatch.setattr(k.barrier_errors, "launched", lambda *a, **kw: None)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    cfg = LSTMConfig(block_h=16, block_b=16, block_k=64, w_resident=True, exchange="cluster")
    sync, cluster = k._barrier_state(cfg, (16, 2, 1), torch.device("cpu"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        k._run(Kernel(), (16, 2, 1), 8, cfg, torch.device("cuda"), (), {**cluster, "ARRIVE_EARLY": True}, sync)
    if capability >= (9, 0):
        assert launches == [("cluster", (16, 2, 1), True, True)] and not caught
    else:
        # ARRIVE_EARLY (v0.68) arrives at the counter's barrier instead.
        assert launches == [("plain", (16, 2, 1), False, True)]
        assert any("A100" in str(w.message) and "grid barrier" in str(w.message) for w in caught)


def test_early_arrival_only_where_every_program_arrives_once_a_step(monkeypatch):
    """ARRIVE_EARLY (v0.68): a cluster's barrier cannot time out, so a program that never arrived would hang the
    launch (and fail the grid barrier's). The plans turn it on only for a prefetching launch whose batch groups have
    a tile each (a group without rows runs no step body, where the arrival is); never with the switch off. CARRY: a
    cluster's 16-bit tiles only, as words where a thread loads two values (16 x 16 on 4 warps), as values where it
    loads one (8 warps)."""
    cfg = LSTMConfig(block_h=16, block_b=16, block_k=64, w_resident=True, exchange="cluster", transposed=True)
    on = kernels.step_constexprs
    assert on(cfg, 2, True, True, True, True) == dict(PREFETCH=True, CARRY=2, ARRIVE_EARLY=True)
    assert on(dataclasses.replace(cfg, num_warps=8), 2, True, True, True, True) == dict(
        PREFETCH=True, CARRY=1, ARRIVE_EARLY=True)
    assert on(cfg, 4, True, True, True, True)["CARRY"] == 0
    assert on(dataclasses.replace(cfg, exchange="barrier"), 2, True, True, True, True)["CARRY"] == 0
    assert not on(cfg, 2, True, False, True, True)["ARRIVE_EARLY"]  # a group without a tile
    assert on(cfg, 2, False, True, True, True) == dict(PREFETCH=False, CARRY=0, ARRIVE_EARLY=False)
    assert on(dataclasses.replace(cfg, exchange="barrier"), 2, True, True, True, True)["ARRIVE_EARLY"]
    assert on(dataclasses.replace(cfg, transposed=False), 2, True, True, True, True)["ARRIVE_EARLY"]
    assert on(cfg, 2, True, True, False, False) == dict(PREFETCH=True, CARRY=0, ARRIVE_EARLY=False)
    # Through the plans, at the module's switches: 3 tiles of 40 rows over 4 groups, or 1 tile of 16 rows over 1.
    monkeypatch.setattr(kernels, "ARRIVE_EARLY", True)
    four = dataclasses.replace(cfg, batch_groups=4)
    plan = kernels._forward_plan(four, torch.float16, 40, 64, 1, True, True, True, False, "ieee", True, True, True)
    assert plan[3]["PREFETCH"] and not plan[3]["ARRIVE_EARLY"]
    plan = kernels._forward_plan(cfg, torch.float16, 16, 64, 1, True, True, True, False, "ieee", True, True, True)
    assert plan[3]["ARRIVE_EARLY"] and plan[3]["CARRY"] == 2
    plan = kernels._backward_plan(four, torch.float16, 40, 64, 1, False, "ieee", torch.device("cpu"), True, True, True)
    assert plan[2]["PREFETCH"] and not plan[2]["ARRIVE_EARLY"]


def test_bulk_exchange_only_where_its_protocol_holds(monkeypatch):
    """BULK (v0.69): every program of a cluster copies its h_t into every program's shared memory each step and
    waits for the copies on an mbarrier, so it needs the cluster, one batch tile a program (a program without rows
    would send nothing), h_{t-1} whole in one transposed chunk, 16-bit values in 16-byte reads. The plans take it
    only with the switch and there, never with early arrival (no barrier to arrive at); lstm_forward asks for it
    only for CUDA launches (the interpreter has no shared memory between programs). Its codes: row b's unit k in a
    slot of producer-major [P, BB, BH] blocks, -1 past H."""
    from helpers import launch_constexprs

    cfg = LSTMConfig(block_h=16, block_b=16, block_k=64, w_resident=True, exchange="cluster", transposed=True)

    def plan(c, dtype=torch.float16, B=16, bulk=True):
        return kernels._forward_plan(c, dtype, B, 64, 1, True, True, True, False, "ieee", True, True, True, bulk)[3]

    assert plan(cfg)["BULK"] and plan(cfg)["PREFETCH"] and not plan(cfg)["ARRIVE_EARLY"]
    assert plan(cfg, torch.bfloat16)["BULK"] and plan(cfg, B=9)["BULK"]
    assert plan(cfg, bulk=False)["ARRIVE_EARLY"] and not plan(cfg, bulk=False)["BULK"]
    assert not plan(cfg, torch.float32)["BULK"]
    assert not plan(dataclasses.replace(cfg, exchange="barrier"))["BULK"]
    assert not plan(dataclasses.replace(cfg, batch_groups=4), B=40)["BULK"]  # 3 tiles over 4 groups
    assert not plan(dataclasses.replace(cfg, transposed=False))["BULK"]
    assert not plan(dataclasses.replace(cfg, prefetch=False))["BULK"]
    assert not plan(dataclasses.replace(cfg, block_k=128, w_resident=False))["BULK"]

    codes = kernels.bulk_codes(2, 8, 32, 20, torch.device("cpu"))
    assert codes.shape == (2, 32) and codes.dtype == torch.int16
    assert (codes[:, 20:] == -1).all()
    for b in range(2):
        for k in range(20):
            assert codes[b, k] == ((k // 8 * 2 + b) * 8 + k % 8) * 2, (b, k)
    assert sorted(codes[:, :16].flatten().tolist()) == list(range(0, 64, 2))  # producers 0, 1: two whole blocks

    monkeypatch.setattr(kernels, "BULK_H", True)
    took = launch_constexprs(monkeypatch, "lstm_fwd_kernel", "BULK")
    problem = make_problem(4, 16, 8, 16, torch.float16)
    with use_config(dataclasses.replace(cfg, block_k=16), "fwd"):  # one program: persistent on the interpreter
        fused_lstm(*(problem[n] for n in NAMES), backend="triton")
    assert took == [False]


@pytest.mark.parametrize("given", ["bias_ih", "bias_hh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_one_bias_of_the_two(given, dtype):
    """fused_lstm with only one of nn.LSTM's two biases: the kernel adds the one given (v0.54: it loads both in their
    own dtype and adds them in float32, or the one there is), and only it gets a gradient."""
    problem = make_problem(5, 3, 6, 24, dtype)
    problem["bias_hh" if given == "bias_ih" else "bias_ih"] = None
    check_against_reference(problem, dtype)


def test_bias_gradients_are_separate_tensors_as_in_nn_lstm():
    """The kernels take b_ih and b_hh as they are and the backward gives both the same float32 sum in their dtype:
    as two tensors, so that an in-place update of one gradient (clip_grad_norm_, an optimizer's) leaves the other
    alone, as nn.LSTM's do. One direction (the biases as views of themselves), two, and a stack."""
    torch.manual_seed(0)
    for kw in (dict(), dict(bidirectional=True), dict(num_layers=2)):
        for dtype in (torch.float32, torch.bfloat16):
            ref = torch.nn.LSTM(6, 8, **kw).to(dtype)
            ours = tritonlstm.LSTM(6, 8, backend="triton", **kw).to(dtype)
            ours.load_state_dict(ref.state_dict())
            x = torch.randn(4, 3, 6, dtype=dtype)
            for m in (ref, ours):
                m(x)[0].square().sum().backward()
                torch.nn.utils.clip_grad_norm_(m.parameters(), 1e-3)
                for name, p in m.named_parameters():
                    if name.startswith("bias_ih"):
                        p.grad.mul_(2)
            for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
                tol = 2e-5 if dtype == torch.float32 else 2e-2
                torch.testing.assert_close(a.grad, b.grad, rtol=tol, atol=tol * 1e-3, msg=f"{kw} {dtype} {name}")
            ptrs = [p.grad.data_ptr() for n, p in ours.named_parameters() if n.startswith("bias")]
            assert len(set(ptrs)) == len(ptrs), (kw, dtype)
