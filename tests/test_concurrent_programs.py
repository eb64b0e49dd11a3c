"""Persistent launches of several programs on the interpreter, the programs running at once (tests/concurrency.py):
the exchanges between programs (grid barrier, cluster barrier, reduce-scatter, the 2-D grid's two
barriers a step, a stack's wavefront) against the float64 reference, as they run on a GPU but for its memory
ordering. Without this, a launch of more than one program runs only on a GPU; the interpreter's tests run such
configs stepwise, one launch per step."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import triton.language as tl

from concurrency import concurrent_programs
from helpers import (
    NAMES,
    RESOLUTION,
    RESOLUTION_GPU,
    check_against_reference,
    launch_constexprs,
    make_problem,
    reference,
    rel_err,
)
from tritonlstm import configs, fused_lstm, use_config
from tritonlstm.functional import lstm_layer, lstm_stack
from tritonlstm.kernels import lstm as kernels

SMS = 132  # the H100's: configs as the heuristic and the tuner would give them there


@pytest.fixture
def launches(monkeypatch):
    """(kernel name, programs, persistent) of every recurrence launch."""
    seen = []
    run = kernels._run

    def spy(kernel, grid, n_steps, config, *args, **kwargs):
        seen.append((kernel.fn.__name__, grid[0] * grid[1] * grid[2], config.persistent))
        return run(kernel, grid, n_steps, config, *args, **kwargs)

    monkeypatch.setattr(kernels, "_run", spy)
    return seen


def variant(kernel, name, H, B, layers=1, dtype=torch.float32):
    if name in ("grid-2d", "grid-2d-half"):  # 2 x 2 unit blocks (its own pick, at these H, is one block)
        return dataclasses.replace(configs.grid_2d_config(H, B, dtype.itemsize, SMS), block_h=H // 2,
                                   half_w=name == "grid-2d-half")
    return configs.named_variants(kernel, H, B, dtype, SMS, names=(name,), layers=layers)[name]


def run_and_compare(problem, fwd, bwd, *, lengths=None, reverse=False, seed=0, tol=None):
    """check_against_reference with fwd and bwd forced on their kernels and the programs running at once."""
    with concurrent_programs(seed), use_config(fwd, "fwd"), use_config(bwd, "bwd"):
        check_against_reference(problem, problem["x"].dtype, reverse=reverse, lengths=lengths, tol=tol)


# (forward variant, backward variant, H, B): every exchange, the prefetching forward, split and merged dots, 64- and
# 128-row tiles, several batch groups, the backward's reduce-scatter and 2-D grid.
CASES = [
    ("unsplit", "unsplit", 64, 5),
    ("transposed", "transposed", 32, 5),
    ("no-prefetch", "transposed-streamed", 32, 5),
    ("cluster", "cluster", 64, 5),
    ("transposed-cluster", "transposed-cluster", 32, 5),
    ("merged", "split", 64, 20),
    ("transposed", "wide", 64, 40),
    ("transposed", "grid-2d", 64, 40),
    ("transposed-streamed-bb128", "unsplit-w4", 64, 130),
    ("cluster-bh64", "unsplit", 128, 5),
]


@pytest.mark.parametrize("fwd_name, bwd_name, H, B", CASES, ids=[f"{f}+{b}-H{h}-B{bb}" for f, b, h, bb in CASES])
def test_single_layer_with_programs_at_once(fwd_name, bwd_name, H, B, launches, monkeypatch):
    torch.manual_seed(0)
    fwd, bwd = variant("fwd", fwd_name, H, B), variant("bwd", bwd_name, H, B)
    monkeypatch.setattr(kernels, "BIAS_IN_KERNEL", True)  # (off by default: v0.73)
    bias_copies = launch_constexprs(monkeypatch, "lstm_bwd_kernel", "BIAS_COPIES")
    # "no-prefetch" is the heuristic's pick without the prefetch: in float32 on float16 operands since v0.38 (half_w,
    # as precise as TF32).
    run_and_compare(make_problem(4, B, H - 3, H, torch.float32), fwd, bwd,
                    tol=RESOLUTION_GPU[torch.float32] if fwd.half_w else None)
    assert [k for k, _, _ in launches] == ["lstm_fwd_kernel", "lstm_bwd_2d_kernel" if bwd.grid_2d
                                           else "lstm_bwd_kernel"]
    # Where the backward's programs sum the bias gradients themselves (v0.73: one batch group, few registers for
    # the sums; here the transposed ones and the 8-warp unsplit tiles at H = 128), they are checked with the rest.
    summed = kernels.bias_sums_in_kernel(bwd, "bwd", H)
    assert bias_copies == ([] if bwd.grid_2d else [2 if summed else None]), (bias_copies, bwd)
    assert summed == (bwd_name.startswith("transposed") or H == 128), bwd
    assert all(persistent and programs > 1 for _, programs, persistent in launches), launches


# 16-bit operands; half_w: float32 on float16 operands, as precise as
# TF32's (a float32 stack's forward at H = 512 takes it; the backward's 2-D grid and split tiles, v0.40-v0.41, with
# each row's largest |dG| passed between the programs); the transposed dots' 16-bit operands.
SIXTEEN_BIT_CASES = [
    ("transposed", "transposed", torch.bfloat16, RESOLUTION[torch.bfloat16]),
    ("transposed-half", "transposed", torch.float32, RESOLUTION_GPU[torch.float32]),
    ("transposed", "split-half", torch.float32, RESOLUTION_GPU[torch.float32]),
    ("transposed", "grid-2d-half", torch.float32, RESOLUTION_GPU[torch.float32]),
    ("transposed-cluster", "transposed-cluster", torch.float16, RESOLUTION[torch.float16]),
]


@pytest.mark.parametrize("fwd_name, bwd_name, dtype, tol", SIXTEEN_BIT_CASES,
                         ids=[f"{f}+{b}-{str(d)[6:]}" for f, b, d, _ in SIXTEEN_BIT_CASES])
def test_sixteen_bit_exchanges_and_half_operands(fwd_name, bwd_name, dtype, tol, launches):
    torch.manual_seed(3)
    H, B = 64, 5
    fwd = variant("fwd", fwd_name, H, B, dtype=dtype)
    run_and_compare(make_problem(4, B, H, H, dtype), fwd, variant("bwd", bwd_name, H, B, dtype=dtype), seed=3,
                    tol=tol)
    assert fwd.half_w == (fwd_name == "transposed-half")
    assert all(persistent and programs > 1 for _, programs, persistent in launches), launches


def test_half_g_backward_with_programs_at_once(monkeypatch, launches):
    """v0.65's float16 dG (HALF_G) sits in one buffer for every step: a product phase's reads of dG_{t+1} end at the
    barrier before the next gate phase writes dG_t over them. With the programs at once and one of them slow, a write
    too early (or a read too late) would be read stale. 2 x 2 unit blocks of 32 units: each block's dG comes from two
    programs, each with its own scale."""
    half_g = launch_constexprs(monkeypatch, "lstm_bwd_2d_kernel", "HALF_G")
    monkeypatch.setattr(kernels, "HALF_G", True)
    torch.manual_seed(5)
    H, B = 64, 5
    fwd, bwd = variant("fwd", "transposed", H, B), variant("bwd", "grid-2d-half", H, B)
    run_and_compare(make_problem(4, B, H, H, torch.float32), fwd, bwd, lengths=torch.tensor([4, 2, 3, 4, 1]), seed=5,
                    tol=RESOLUTION_GPU[torch.float32])
    assert half_g == [True]
    assert all(persistent and programs > 1 for _, programs, persistent in launches), launches


def test_sequence_longer_than_a_launch_runs_as_consecutive_launches(monkeypatch, launches):
    """A counter would pass RELEASED: the launcher splits the sequence into launches of 2 steps here (state through
    memory between them), each of several programs."""
    monkeypatch.setattr(kernels, "RELEASED", tl.constexpr(9))  # 4 programs: (9 - 1) // 4 = 2 steps a launch
    torch.manual_seed(4)
    H, B = 64, 5
    fwd, bwd = variant("fwd", "transposed", H, B), variant("bwd", "transposed", H, B)
    run_and_compare(make_problem(5, B, H, H, torch.float32), fwd, bwd, lengths=torch.tensor([5, 2, 3, 5, 1]), seed=4)
    assert launches == [("lstm_fwd_kernel", 4, True), ("lstm_bwd_kernel", 4, True)]  # 3 launches each


# v0.68 (perf/NOTES.md), 2 batch groups of one tile, 4 programs each. transposed-cluster forward and reduce-scatter
# backward: the forward's 16-bit tiles (16 x 16 on 4 warps) carry gx as int32 words (CARRY 2, from the word at unit
# 16 on: j0 > 0), the backward's (8 warps) one value a thread (CARRY 1). On the grid barrier (no carry): dG as the
# exchange (split), each row's largest |dG| with it (split-half); the forward's h_{t-1} exchanged in float16
# (transposed-half: HALF_H, its store after y's).
EARLY_CASES = [(torch.float16, "transposed-cluster", "transposed-cluster", 2, 1),
               (torch.bfloat16, "transposed-cluster", "transposed-cluster", 2, 1),
               (torch.float16, "transposed", "split", 0, 0),
               (torch.float32, "transposed-half", "split-half", 0, 0)]


@pytest.mark.parametrize("dtype, fwd_name, bwd_name, fwd_carry, bwd_carry", EARLY_CASES,
                         ids=[f"{f}+{b}-{str(d)[6:]}" for d, f, b, _, _ in EARLY_CASES])
def test_early_arrival_and_carried_prefetch_with_programs_at_once(dtype, fwd_name, bwd_name, fwd_carry, bwd_carry,
                                                                   monkeypatch):
    """Launches that arrive at each step's barrier right after their exchange's stores and wait at the step's end
    (ARRIVE_EARLY), a cluster's carrying the next step's inputs across the barrier as loaded (CARRY): against the
    float64 reference with the programs at once and one of them slow, held back after each arrival (an exchange
    stored after the arrival would be read stale), in reverse with lengths; a program that arrived twice or waited
    without arriving would raise (concurrency.ClusterBarrier), one that never arrived would time out (the cluster)
    or fail the barrier (the grid's). And the same errors to the bit as the whole barrier with the inputs widened
    at their load."""
    H, B = 64, 20
    fwd, bwd = variant("fwd", fwd_name, H, B, dtype=dtype), variant("bwd", bwd_name, H, B, dtype=dtype)
    assert fwd.batch_groups == bwd.batch_groups == 2
    assert fwd.clustered == bwd.clustered == fwd_name.endswith("cluster")
    assert fwd.half_w == (fwd_name == "transposed-half") and bwd.half_w == (bwd_name == "split-half")
    lengths = torch.tensor([4, 2, 3, 4, 1] * 4)
    torch.manual_seed(6)
    problem = make_problem(4, B, H, H, dtype)
    seen = {name: launch_constexprs(monkeypatch, kernel, name) for name, kernel in (
        ("ARRIVE_EARLY", "lstm_fwd_kernel"), ("CARRY", "lstm_fwd_kernel"))}
    bwd_seen = {name: launch_constexprs(monkeypatch, "lstm_bwd_kernel", name) for name in ("ARRIVE_EARLY", "CARRY")}
    errors = {}
    for early in (True, False):
        monkeypatch.setattr(kernels, "ARRIVE_EARLY", early)
        monkeypatch.setattr(kernels, "PREFETCH_AS_LOADED", early)
        torch.manual_seed(7)  # the same output weights for both (the errors are equal only if every bit is)
        with concurrent_programs(6), use_config(fwd, "fwd"), use_config(bwd, "bwd"):
            errors[early] = check_against_reference(problem, dtype, reverse=True, lengths=lengths,
                                                    tol=RESOLUTION_GPU[dtype] if fwd.half_w or bwd.half_w else None)
    assert errors[True] == errors[False], errors
    assert seen["ARRIVE_EARLY"] == [True, False] and seen["CARRY"] == [fwd_carry, 0], seen
    assert bwd_seen["ARRIVE_EARLY"] == [True, False] and bwd_seen["CARRY"] == [bwd_carry, 0], bwd_seen


@pytest.mark.parametrize("names, H", [(("transposed", "transposed"), 32), (("unsplit", "cluster"), 64)])
def test_lengths_reverse_and_both_directions(names, H, launches):
    torch.manual_seed(1)
    B, T = 6, 5
    fwd, bwd = variant("fwd", names[0], H, B), variant("bwd", names[1], H, B)
    lengths = torch.tensor([5, 1, 3, 5, 2, 4])
    run_and_compare(make_problem(T, B, H, H, torch.float32), fwd, bwd, lengths=lengths, reverse=True, seed=1)

    # Both directions of a layer in one launch: two groups of programs, each with its own barrier.
    problems = [make_problem(T, B, H, H, torch.float32) for _ in range(2)]
    x = problems[0]["x"]
    refs = [reference({**pr, "x": x}, reverse=d == 1, lengths=lengths)[1] for d, pr in enumerate(problems)]
    weights = [tuple(pr[n] for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")) + (None,) for pr in problems]
    h0 = torch.stack([pr["h0"] for pr in problems])
    c0 = torch.stack([pr["c0"] for pr in problems])
    with concurrent_programs(2), use_config(fwd, "fwd"):
        y, (hn, cn) = lstm_layer(x, weights, h0, c0, lengths=lengths, backend="triton")
    assert rel_err(y, torch.cat([r[0] for r in refs], dim=2)) <= RESOLUTION[torch.float32]
    assert rel_err(hn, torch.stack([r[1] for r in refs])) <= RESOLUTION[torch.float32]
    assert rel_err(cn, torch.stack([r[2] for r in refs])) <= RESOLUTION[torch.float32]
    assert all(persistent and programs > 1 for _, programs, persistent in launches), launches


@pytest.mark.parametrize("fwd_name, bwd_name", [("unsplit", "unsplit"), ("transposed", "unsplit-w4")])
def test_stack_wavefronts_with_programs_at_once(fwd_name, bwd_name, launches):
    """Two layers in one forward launch and one backward launch, several programs a layer, with dropout between
    them, against the same stack run one step per launch (where every program's outputs are in memory before the
    next step's launch reads them)."""
    torch.manual_seed(2)
    L, T, B, H = 2, 4, 5, 32
    layers = [make_problem(T, B, H, H, torch.float32) for _ in range(L)]
    x = layers[0]["x"].requires_grad_()
    weights = [tuple(pr[n].requires_grad_() for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
               for pr in layers]
    scale = (torch.rand(L - 1, T, B, H) > 0.3).float() / 0.7
    fwd, bwd = variant("stack", fwd_name, H, B, L), variant("stack_bwd", bwd_name, H, B, L)

    def run(persistent):
        configs_ = (fwd, bwd) if persistent else (dataclasses.replace(fwd, persistent=False, exchange="barrier"),
                                                  dataclasses.replace(bwd, persistent=False, exchange="barrier"))
        with concurrent_programs(3), use_config(configs_[0], "stack"), use_config(configs_[1], "stack_bwd"):
            y, (hn, cn) = lstm_stack(x, weights, dropout_scale=scale, backend="triton")
            grads = torch.autograd.grad((y * torch.arange(y.numel()).view_as(y).sin()).sum() + hn.sum() + cn.sum(),
                                        [x, *(t for w in weights for t in w)])
        return (y, hn, cn, *grads)

    expected = run(persistent=False)
    launches.clear()
    got = run(persistent=True)
    for a, b in zip(got, expected):
        assert rel_err(a, b) <= RESOLUTION[torch.float32]
    assert [k for k, _, _ in launches] == ["lstm_fwd_kernel", "lstm_bwd_kernel"]
    assert all(persistent and programs > 1 for _, programs, persistent in launches), launches


def test_waits_that_give_up_together_poison_the_rest_and_raise(monkeypatch):
    """max_spin = 2 polls: the programs waiting for the slowed one give up, every output from then on is NaN, and the
    failure is reported. The give-ups come at about the same time (perf/NOTES.md v0.14: several give-ups must
    release the launch once, not wrap the counter)."""
    import tritonlstm

    monkeypatch.setattr(kernels.barrier_errors, "launched", lambda device, capturing: None)
    torch.manual_seed(5)
    B, H, dtype = 5, 64, torch.float32
    config = dataclasses.replace(variant("fwd", "unsplit", H, B, dtype=dtype), max_spin=2)
    problem = make_problem(4, B, H, H, dtype)
    with concurrent_programs(6), use_config(config, "fwd"), torch.no_grad():
        y, (hn, cn) = fused_lstm(*(problem[n] for n in NAMES), backend="triton")
    assert torch.isnan(y[-1]).all() and torch.isnan(hn).all() and torch.isnan(cn).all()
    with pytest.raises(RuntimeError, match="barrier"):
        tritonlstm.synchronize("cpu")


def test_bulk_exchange_with_programs_at_once(monkeypatch):
    """BULK (v0.69) on the interpreter's stand-in for the cluster's shared memory (kernels._ring_end: each program's
    slots, staging blocks and mbarriers in RING, the mbarriers updated as the hardware updates them: the phases
    completed, the pending arrival, the tx-count, which a copy may take below zero before its phase is armed). What
    runs is the kernel's own protocol: which production goes to which slot, whose phase each step waits for and with
    which parity, when each mbarrier is armed and for how many bytes, what each copy counts. 2 batch groups (2
    clusters) of 4 programs, fp16, in reverse with per-row lengths, the programs at once and one of them slow (its
    copies late): against the float64 reference and bit for bit the cluster barrier's outputs; then the sequence
    split into launches of 3 and 1 steps (each launch's first h_{t-1} from memory, a one-step launch arming one
    mbarrier); then both directions in one launch (4 clusters). A copy counted against the wrong phase, or a slot
    overwritten before it was read, fails here; a wait for the wrong parity, or clusters sharing a region, times out."""
    dtype, H, B = torch.float16, 64, 20
    fwd = variant("fwd", "transposed-cluster", H, B, dtype=dtype)
    assert fwd.clustered and fwd.batch_groups == 2 and fwd.programs(H) == 8  # 4 a cluster
    lengths = torch.tensor([4, 2, 3, 4, 1] * 4)
    torch.manual_seed(8)
    problem = make_problem(4, B, H, H, dtype)
    _, (y_r, hn_r, cn_r) = reference(problem, reverse=True, lengths=lengths)
    monkeypatch.setattr(kernels, "BULK_EMULATED", True)
    took = launch_constexprs(monkeypatch, "lstm_fwd_kernel", "BULK")

    def forward(bulk, seed=8):
        monkeypatch.setattr(kernels, "BULK_H", bulk)
        with concurrent_programs(seed), use_config(fwd, "fwd"), torch.no_grad():
            y, (hn, cn) = fused_lstm(*(problem[n] for n in NAMES), reverse=True, lengths=lengths, backend="triton")
        return y, hn, cn

    outs = {bulk: forward(bulk) for bulk in (True, False)}
    for got, ref in zip(outs[True], (y_r, hn_r, cn_r)):
        assert rel_err(got, ref) < RESOLUTION[dtype], rel_err(got, ref)
    assert all(torch.equal(a, b) for a, b in zip(outs[True], outs[False]))
    monkeypatch.setattr(kernels, "RELEASED", tl.constexpr(13))  # 4 programs: (13 - 1) // 4 = 3 steps a launch
    steps, launch = [], kernels.launcher.launch

    def spy(kernel, grid, args, meta):
        steps.append(args[-3:-1])
        return launch(kernel, grid, args, meta)

    monkeypatch.setattr(kernels.launcher, "launch", spy)
    assert all(torch.equal(a, b) for a, b in zip(forward(True, seed=9), outs[False]))
    assert steps == [(0, 3), (3, 1)] and took == [True, False, True], (steps, took)

    # Both directions in one launch (a cluster a direction and batch group: direction 1's h0, y columns and rows).
    monkeypatch.setattr(kernels, "RELEASED", tl.constexpr(1 << 30))
    problems = [make_problem(4, B, H, H, dtype) for _ in range(2)]
    refs = [reference({**pr, "x": problem["x"]}, reverse=d == 1, lengths=lengths)[1] for d, pr in enumerate(problems)]
    weights = [tuple(pr[n] for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")) + (None,) for pr in problems]
    with concurrent_programs(10), use_config(fwd, "fwd"), torch.no_grad():
        y, (hn, cn) = lstm_layer(problem["x"], weights, torch.stack([pr["h0"] for pr in problems]),
                                 torch.stack([pr["c0"] for pr in problems]), lengths=lengths, backend="triton")
    for got, ref in ((y, torch.cat([r[0] for r in refs], dim=2)), (hn, torch.stack([r[1] for r in refs])),
                     (cn, torch.stack([r[2] for r in refs]))):
        assert rel_err(got, ref) < RESOLUTION[dtype], rel_err(got, ref)
    assert took[-1], took


def test_bias_sums_finished_by_the_last_program_with_programs_at_once(monkeypatch):
    """v0.71's column sums: every program of a column block stores its partial, then counts itself in; the one that
    counts last sums the partials. With the programs at once and one of them slow (sleeping before each store), a
    finisher that ran before another's partial was stored, or two finishers, would give another sum than the
    programs one after another do; here the same bits, over 8 draws of the slow program. The chunks as for a GPU of
    4 SMs (10 programs a column block; the interpreter's own 3 let the slow one count last too often). Checked: with
    the partial stored after the count, 5 of these 16 launches came out wrong."""
    from tritonlstm.kernels import reduce

    class Props:
        multi_processor_count = 4

    monkeypatch.setattr(reduce, "interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: Props())
    torch.manual_seed(0)
    for shape in ((600, 40), (2, 600, 40)):
        m = torch.randn(shape)
        alone = reduce.column_sums(m, torch.float32, copies=2)
        torch.testing.assert_close(alone[0].double(), m.double().sum(-2), rtol=1e-6, atol=1e-5)
        for seed in range(8):
            with concurrent_programs(seed):
                together = reduce.column_sums(m, torch.float32, copies=2)
            assert torch.equal(together, alone), (shape, seed)
