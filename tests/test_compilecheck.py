"""Compile-only check for the H100 (sm_90): every config the heuristic can choose for H <= 4096 (one or two
directions per launch) compiles, fits shared memory and spills at most SPILL_LIMIT bytes of registers (some
measured-faster configs spill a little; perf/NOTES.md v0.9). Runs here without a GPU; catches what the
interpreter cannot."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from helpers import run_python
from tritonlstm.compilecheck import GPUS, SM90_SHARED_LIMIT, SPILL_LIMIT, shipped_configs
from tritonlstm.configs import (
    LSTMConfig,
    fit_shared_memory,
    heuristic_config,
    shared_bytes,
    stack_backward_config,
    wide_tile_config,
)

ESIZE = {"fp16": 2, "bf16": 2, "fp32": 4}


def assert_estimate_bounds_the_compile(rows):
    """configs.shared_bytes (what fit_shared_memory sizes configs by) at or above the compiled shared memory."""
    from tritonlstm.kernels.lstm import pairs_gates

    for r in rows:
        cfg, esize = LSTMConfig(**r["config"]), ESIZE[r["dtype"]]
        paired = pairs_gates(cfg, r["kernel"], r["hidden"], esize, r["smem_limit"])
        est = shared_bytes(cfg, r["kernel"], r["hidden"], esize, paired=paired)
        assert est >= r["shared"], (est, r)


def test_every_shipped_config_compiles_for_sm90_within_limits(tmp_path):
    out = tmp_path / "cc.json"
    # Without TRITON_INTERPRET: the interpreter does not compile.
    proc = run_python("-m", "tritonlstm.compilecheck", "--max-hidden", "4096", "--json", str(out), timeout=1200)
    rows = json.loads(out.read_text())
    bad = [r for r in rows if not r["ok"]]
    assert not bad, "\n".join(proc.stdout.splitlines()[-40:])
    assert proc.returncode == 0
    assert {r["kernel"] for r in rows} == {"fwd", "bwd", "stack", "stack_bwd"}
    assert {r["dtype"] for r in rows} == {"fp16", "bf16", "fp32"}
    assert all(0 < r["shared"] <= SM90_SHARED_LIMIT and r["spill_bytes"] <= SPILL_LIMIT and r["error"] is None
               for r in rows)
    # Spill-free wherever nothing was measured against it: the streamed weights, and the stacks' wavefronts but
    # for their whole-K resident tiles at K = 512 (perf/NOTES.md v0.13: at most ~500 bytes, measured faster than
    # streaming W in K chunks in run 5, and the fp32 backward split 4 ways: 668 bytes, 0.54x the unsplit step).
    for r in rows:
        resident_stack = r["kernel"].startswith("stack") and r["config"]["w_resident"]
        limit = 700 if resident_stack else 0 if r["kernel"].startswith("stack") or not r["config"]["w_resident"] \
            else SPILL_LIMIT
        assert r["spill_bytes"] <= limit, r
    assert_estimate_bounds_the_compile(rows)
    configs = shipped_configs(4096)
    # The single-layer forward in both variants; a stack in its training one (dropout, the heavier).
    assert len(rows) == sum(2 if kernel == "fwd" else 1 for kernel, *_ in configs)
    assert {r["store_gates"] for r in rows if r["kernel"] == "fwd"} == {True, False}


def test_heuristic_tiles_keep_programs_resident_and_weights_on_chip_up_to_1024():
    """The tiles (measured=False: before the forward's layout from the A/B): W on chip up to H = 1024, except where
    16-row tiles would make a program walk >= 4 tiles per step: 64-row tiles with W streamed there (perf/NOTES.md
    v0.15)."""
    for kernel in ("fwd", "bwd"):
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            for hidden in (1, 24, 256, 512, 1000, 1024):
                for batch in (1, 16, 64, 256, 4096):
                    cfg = heuristic_config(hidden, batch, dtype, 132, kernel=kernel, measured=False)
                    assert cfg.persistent and cfg.programs(hidden) <= 132, (dtype, hidden, batch, cfg)
                    wide = wide_tile_config(hidden, batch, dtype.itemsize, 132, kernel)
                    assert cfg.w_resident or cfg == wide, (kernel, dtype, hidden, batch, cfg)
                    if cfg == wide:
                        assert batch >= 64
    # The bench cells furthest behind cuDNN in run 3 take the wide tiles.
    for dtype, hidden, batch in ((torch.float16, 1024, 256), (torch.bfloat16, 1024, 256), (torch.float32, 512, 256),
                                 (torch.float32, 1024, 64)):
        assert heuristic_config(hidden, batch, dtype, 132, measured=False).block_b == 64
    assert heuristic_config(512, 256, torch.float16, 132, measured=False).w_resident  # 2 tiles per program: stays


# The layouts that won the H100's tuner logs (every named variant: runs 4-5 for the 16-bit forward, perf/NOTES.md
# v0.20; run 6 for the float32 forward, the forward at H = 1024, B = 256 and the backward, v0.38; run 7's H200 for
# the float32 backward at H = 1024 from 64 rows, v0.44), other than the cluster barrier's (Hopper's alone):
# (kernel, dtype, H, B) -> configs.named_variants name.
MEASURED_WINNERS = {
    ("fwd", torch.float16, 512, 16): "transposed", ("fwd", torch.bfloat16, 1024, 1): "transposed",
    ("fwd", torch.float32, 256, 16): "transposed-half", ("fwd", torch.float32, 1024, 16): "transposed-half",
    ("fwd", torch.float16, 256, 64): "merged", ("fwd", torch.float16, 256, 256): "merged",
    ("fwd", torch.float16, 1024, 64): "transposed", ("fwd", torch.float32, 1024, 64): "transposed-half",
    ("fwd", torch.float16, 512, 256): "transposed-streamed",
    ("fwd", torch.bfloat16, 1024, 256): "transposed-streamed-bb128",
    ("fwd", torch.float32, 1024, 256): "transposed-streamed-bb128",
    ("bwd", torch.float16, 256, 16): "transposed", ("bwd", torch.float32, 512, 64): "transposed",
    ("bwd", torch.float16, 256, 256): "unsplit-w4", ("bwd", torch.float16, 512, 64): "split4",
    ("bwd", torch.float16, 512, 256): "grid-2d", ("bwd", torch.bfloat16, 1024, 64): "grid-2d",
    ("bwd", torch.float32, 512, 256): "grid-2d", ("bwd", torch.float32, 1024, 256): "grid-2d-half",
    ("bwd", torch.float32, 1024, 64): "grid-2d-half",
}


def test_heuristic_takes_the_layouts_that_won_the_h100_ab():
    from tritonlstm.configs import named_variants

    for (kernel, dtype, hidden, batch), name in MEASURED_WINNERS.items():
        assert heuristic_config(hidden, batch, dtype, 132, kernel=kernel) == \
            named_variants(kernel, hidden, batch, dtype, 132)[name], (kernel, dtype, hidden, batch, name)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for hidden in (1, 24, 100, 256, 512, 1000, 1024, 2048):
            for batch in (1, 16, 17, 64, 256, 4096):
                for directions in (1, 2):
                    cfg = heuristic_config(hidden, batch, dtype, 132, directions=directions)
                    assert cfg.persistent or hidden > 1024, (dtype, hidden, batch, directions, cfg)
                    if cfg.persistent:
                        assert directions * cfg.programs(hidden) <= 132, (dtype, hidden, batch, directions, cfg)


def test_heuristic_streams_weights_beyond_1024():
    cfg = heuristic_config(2048, 16, torch.float16, 132)
    assert cfg.persistent and not cfg.w_resident and cfg.block_k == 64 and cfg.programs(2048) <= 132
    wide = heuristic_config(4096, 16, torch.float32, 132)
    assert not wide.persistent and not wide.w_resident  # more programs than SMs: one launch per step


def test_heuristic_splits_the_sms_between_two_directions():
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for hidden in (256, 512, 1024):
            cfg = heuristic_config(hidden, 64, dtype, 132, directions=2)
            assert cfg.persistent and 2 * cfg.programs(hidden) <= 132, (dtype, hidden, cfg)


def test_stack_configs_of_the_bench_rows_run_persistent():
    """The bench's multi-layer rows (H = 512, B = 16): both wavefronts in one persistent launch, every layer's
    programs resident together."""
    from tritonlstm.configs import stack_backward_config

    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for layers in (2, 4):
            fwd, bwd = heuristic_config(512, 16, dtype, 132, layers=layers, kernel="stack"), \
                stack_backward_config(512, 16, dtype, 132, layers)
            for cfg in (fwd, bwd):
                assert cfg.persistent and layers * cfg.programs(512) <= 132, (dtype, layers, cfg)
            # Run 5's stack A/B: the transposed forward where W^T and W_ih^T fit (16-bit; float32 with them in
            # float16, v0.29), the backward split 4 ways where W stays resident.
            assert fwd.transposed and fwd.w_resident and fwd.half_w == (dtype == torch.float32), (dtype, layers, fwd)
            assert bwd.split_k == (4 if bwd.w_resident else 1), (dtype, layers, bwd)


def test_stacks_whose_weights_cannot_stay_on_chip_run_in_resident_chunks():
    """configs.stack_layers_per_launch: fp32 at H = 512 keeps W resident for 2 layers, not 3 or 4 (run 5: 40-45
    us per step streamed at 4 layers against 10-11 resident at 2), so longer fp32 stacks run as wavefronts of 2;
    16-bit keeps 4 layers resident there; where no count is resident (H = 1024), one streamed wavefront."""
    from tritonlstm.configs import stack_backward_config, stack_layers_per_launch

    assert [stack_layers_per_launch(512, 16, torch.float32, 132, n) for n in (2, 3, 4, 6)] == [2, 2, 2, 2]
    # Inference needs only the forward's weights on chip: float32 W^T in float16 (v0.29) keeps 4 layers' there.
    assert [stack_layers_per_launch(512, 16, torch.float32, 132, n, training=False) for n in (2, 3, 4, 6)] == \
        [2, 3, 4, 4]
    assert [stack_layers_per_launch(512, 16, torch.float16, 132, n) for n in (2, 4, 5, 8)] == [2, 4, 4, 4]
    assert stack_layers_per_launch(1024, 16, torch.bfloat16, 132, 4) == 4
    for dtype in (torch.float16, torch.float32):
        for layers in (2, 3, 4, 8):
            span = stack_layers_per_launch(512, 16, dtype, 132, layers)
            if span < layers:
                assert heuristic_config(512, 16, dtype, 132, layers=span, kernel="stack").w_resident
                assert stack_backward_config(512, 16, dtype, 132, span).w_resident


def test_half_w_configs():
    """LSTMConfig.half_w (perf/NOTES.md v0.29, v0.40-v0.41): on the transposed dots, or (the backward's) W
    resident; its forward stand-in where TF32 is not allowed streams float32 W^T; its shared memory
    counts W at 2 bytes; the forward's tuner candidate is float32's only."""
    from tritonlstm.configs import named_variants, without_half_w

    with pytest.raises(ValueError, match="half_w needs transposed=True .* or W resident"):
        LSTMConfig(block_h=16, block_b=16, block_k=64, w_resident=False, half_w=True)
    tiles = LSTMConfig(block_h=16, block_b=16, block_k=1024, w_resident=True, half_w=True, split_k=8, num_warps=8)
    assert shared_bytes(tiles, "bwd", 1024, 4) == shared_bytes(dataclasses.replace(tiles, half_w=False), "bwd", 1024,
                                                               4) - 4 * 1024 * 16 * 2
    half = heuristic_config(512, 16, torch.float32, 132, layers=4, kernel="stack")
    full = without_half_w(half)
    assert (full.half_w, full.w_resident, full.transposed, full.block_k, full.num_stages) == (False, False, True, 32, 3)
    assert without_half_w(full) is full
    assert shared_bytes(half, "stack", 512, 4) == shared_bytes(dataclasses.replace(half, half_w=False), "stack", 512, 2)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for kernel in ("fwd", "bwd"):
            got = named_variants(kernel, 1024, 16, dtype, 132).get("transposed-half")
            assert (got is not None) == (kernel == "fwd" and dtype == torch.float32), (kernel, dtype, got)
    assert named_variants("fwd", 1024, 16, torch.float32, 132)["transposed-half"] == dataclasses.replace(
        named_variants("fwd", 1024, 16, torch.float16, 132)["transposed"], half_w=True)
    # Timed by run 6's tuner (v0.38), transposed-half is the single-layer heuristic's float32 pick from there on;
    # both searches offer it for float32 only.
    assert heuristic_config(1024, 16, torch.float32, 132).half_w
    from tritonlstm.tuning import candidates

    for dtype in (torch.float16, torch.float32):
        assert any(c.half_w for c in candidates(1024, 16, dtype, 132, SM90_SHARED_LIMIT)) == (dtype == torch.float32)


def test_transposed_dots_load_h_in_one_chunk_where_it_fits():
    """kernels.lstm.transposed_chunk (perf/NOTES.md v0.31): a single layer's resident transposed dots load h_{t-1}
    whole up to 16 KB (16-bit K = 512, fp32 K = 256, at 16 rows), each chunk beyond costing an L2 round trip; a
    stack's two dots, and larger tiles, in 8 KB chunks (registers)."""
    from tritonlstm.kernels import lstm as k

    def kc(H, dtype, stack=False):
        cfg = heuristic_config(H, 16, dtype, 132, layers=2 if stack else 1, kernel="stack" if stack else "fwd")
        assert cfg.transposed and cfg.w_resident, cfg
        return k.transposed_chunk(cfg, dtype.itemsize, stack=stack)

    assert [kc(H, torch.float16) for H in (256, 512, 1024)] == [256, 512, 256]
    assert [kc(H, torch.bfloat16) for H in (256, 512)] == [256, 512]
    assert kc(256, torch.float32) == 256
    assert [kc(H, torch.float16, stack=True) for H in (256, 512)] == [256, 256]
    assert kc(512, torch.float32, stack=True) == 128  # W^T in float16 (half_w), h loaded in float32
    # 8 warps take twice 4 warps' tile in one chunk (v0.64): the 16-bit [16, 1024] tile
    w8 = dataclasses.replace(heuristic_config(1024, 16, torch.float16, 132, kernel="fwd"), num_warps=8)
    assert k.transposed_chunk(w8, 2) == 1024 and k.transposed_chunk(w8, 2, stack=True) < 1024


def test_half_w_candidates_compile_without_spills(tmp_path):
    """The float32 transposed-half forward configs (tuner candidates) at H = 1000 and 1024: W^T in float16 within
    shared memory where float32's is not, at most 64 bytes of spills (the chunks of h loaded ahead of the previous
    dot: 16-40 bytes at H = 1024; 0 without that, perf/NOTES.md v0.31), and its streamed ones with W^T's chunks in
    float16 (v0.42). The backward's split-half tiles (v0.41): W
    in float16 within shared memory, at most 512 bytes of spills (372-412 at H = 1024: dG's float32 row tiles in
    registers before they are scaled). (The stacks' half_w picks are heuristic picks: the sweep of every shipped
    config compiles them.)"""
    out = tmp_path / "half.json"
    proc = run_python("-m", "tritonlstm.compilecheck", "--half-w", "--min-hidden", "1000", "--max-hidden", "1024",
                      "--json", str(out), timeout=1200)
    rows = json.loads(out.read_text())
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert {(r["dtype"], r["hidden"]) for r in rows} == {("fp32", 1024)}  # H = 1000 is not aligned: none
    assert {r["kernel"] for r in rows} == {"fwd", "bwd"}
    assert all(r["config"]["half_w"] for r in rows)
    # the forward's streamed ones (v0.42): 16-row tiles at B <= 16, 64 and 128 at B = 256
    assert {r["config"]["block_b"] for r in rows if not r["config"]["w_resident"]} == {16, 64, 128}
    assert all(r["ok"] and r["spill_bytes"] <= (64 if r["kernel"] == "fwd" else 512) for r in rows), \
        proc.stdout[-3000:]
    assert_estimate_bounds_the_compile(rows)


def test_reduce_scatter_backward_candidates_compile_without_spills(tmp_path):
    """The backward's reduce-scatter configs (tuner candidates, perf/NOTES.md v0.24) at the largest tiles the bench
    uses (H = 1024: W^T resident in 16-bit, streamed in every dtype, 64 producers summed) and an unaligned H:
    every one within shared memory and free of spills, the 8 warps' point (4 spill 40-800 bytes)."""
    out = tmp_path / "rs.json"
    proc = run_python("-m", "tritonlstm.compilecheck", "--reduce-scatter", "--min-hidden", "1000", "--max-hidden",
                      "1024", "--json", str(out), timeout=1200)
    rows = json.loads(out.read_text())
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert {(r["dtype"], r["config"]["w_resident"]) for r in rows} == {
        ("fp16", True), ("bf16", True), ("fp16", False), ("bf16", False), ("fp32", False)}
    assert {r["hidden"] for r in rows} == {1000, 1024}
    assert all(r["kernel"] == "bwd" and r["config"]["transposed"] and r["config"]["num_warps"] == 8 for r in rows)
    assert all(r["ok"] and r["spill_bytes"] == 0 for r in rows), proc.stdout[-3000:]
    assert_estimate_bounds_the_compile(rows)


def test_grid_2d_backward_candidates_compile_without_spills(tmp_path):
    """The backward's 2-D grid configs (tuner candidates, perf/NOTES.md v0.26) at H = 1000 and 1024 (128-unit
    blocks, 8 a side; float32's with W's block in float16, v0.40, at the aligned H only): within shared memory; in
    16-bit free of spills on 32-row tiles, and on 64-row tiles (wgmma) at most 600 bytes (212 at H = 1024, 552 at the
    unaligned 1000); in float32 at most 80 bytes on 32-row tiles (16 at H = 1024) and 1500 on 64-row ones (its
    float32 dG tiles, and the [64, 128] exponents of the epilogue's per-row and per-column scales)."""
    out = tmp_path / "g2.json"
    proc = run_python("-m", "tritonlstm.compilecheck", "--grid-2d", "--min-hidden", "1000", "--max-hidden", "1024",
                      "--json", str(out), timeout=1200)
    rows = json.loads(out.read_text())
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert {(r["dtype"], r["hidden"], r["config"]["block_b"]) for r in rows} == {
        (d, h, bb) for d in ("fp16", "bf16", "fp32") for h in (1000, 1024) for bb in (32, 64)
        if d != "fp32" or h == 1024}
    bound = {("fp16", 32): 0, ("bf16", 32): 0, ("fp32", 32): 80, ("fp16", 64): 600, ("bf16", 64): 600,
             ("fp32", 64): 1500}
    assert all(r["config"]["grid_2d"] and r["config"]["block_h"] == 128 and r["ok"]
               and r["config"]["half_w"] == (r["dtype"] == "fp32")
               and r["spill_bytes"] <= bound[r["dtype"], r["config"]["block_b"]] for r in rows), proc.stdout[-3000:]
    assert_estimate_bounds_the_compile(rows)


def _heuristic_picks(sms: int):
    """(kernel, dtype, H, B, directions, layers, config) of the heuristic on a GPU of `sms` SMs, as the runtime
    asks for them (before fit_shared_memory)."""
    from tritonlstm.compilecheck import _hiddens

    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for hidden in _hiddens(1, 4096):
            for batch in (1, 16, 17, 64, 256, 4096):
                for d in (1, 2):
                    for kernel in ("fwd", "bwd"):
                        yield kernel, dtype, hidden, batch, d, 1, heuristic_config(hidden, batch, dtype, sms,
                                                                                   directions=d, kernel=kernel)
                for n in (2, 4):
                    yield "stack", dtype, hidden, batch, 1, n, heuristic_config(hidden, batch, dtype, sms, layers=n,
                                                                                kernel="stack")
                    yield "stack_bwd", dtype, hidden, batch, 1, n, stack_backward_config(hidden, batch, dtype, sms, n)


def test_fit_shared_memory_keeps_h100_picks_and_fits_smaller_gpus():
    """configs.fit_shared_memory, applied to every pick at run time: on an H100 it changes nothing (the heuristic
    was measured there); on an A100 (163 KB of shared memory per block) and the 99 KB GPUs (A10, L4, RTX 4090),
    where a launch of the unfitted pick fails with OutOfResources (fp16 H >= 512, fp32 H >= 256), every fitted
    pick is under the limit by the estimate, keeps its programs resident, and is the pick itself wherever that
    already fits."""
    for name, gpu in GPUS.items():
        changed = 0
        for kernel, dtype, hidden, batch, d, n, cfg in _heuristic_picks(gpu.sms):
            fitted = fit_shared_memory(cfg, kernel, hidden, batch, dtype, gpu.sms, gpu.smem, d, n)
            assert shared_bytes(fitted, kernel, hidden, dtype.itemsize) <= gpu.smem, (name, kernel, hidden, cfg)
            assert not fitted.persistent or fitted.programs(hidden) * d * n <= gpu.sms, (name, kernel, hidden, fitted)
            if shared_bytes(cfg, kernel, hidden, dtype.itemsize) <= gpu.smem:
                assert fitted == cfg
            changed += fitted != cfg
        if name == "h100":
            assert changed == 0
        else:
            assert changed > 0, name
    # RTX 4090: the fp16 H = 1024 forward streams W^T (resident it needs 139 KB); the backward halves its units per
    # program, still resident (96 KB); fp32 at H = 1024 streams W in 16-wide K chunks.
    gpu = GPUS["rtx4090"]
    fwd = fit_shared_memory(heuristic_config(1024, 16, torch.float16, gpu.sms), "fwd", 1024, 16, torch.float16,
                            gpu.sms, gpu.smem)
    assert fwd.transposed and not fwd.w_resident
    bwd = fit_shared_memory(heuristic_config(1024, 16, torch.float16, gpu.sms, kernel="bwd"), "bwd", 1024, 16,
                            torch.float16, gpu.sms, gpu.smem)
    assert bwd.w_resident and bwd.block_h == 8
    fp32 = fit_shared_memory(heuristic_config(1024, 16, torch.float32, gpu.sms), "fwd", 1024, 16, torch.float32,
                             gpu.sms, gpu.smem)
    assert not fp32.w_resident and fp32.persistent and (fp32.transposed, fp32.half_w, fp32.block_k) == (True, False, 32)


def test_picks_fitted_to_an_rtx4090_compile_for_sm89_within_its_shared_memory():
    """The configs fit_shared_memory gives an sm_89 GPU with 99 KB of shared memory per block where the H100's
    pick does not fit (H 256-1024, every kernel and dtype; the rest are the H100's picks, compiled above),
    compiled for sm_89: each within 101376 bytes, spills at most the H100 sweep's. (`python -m
    tritonlstm.compilecheck --gpu rtx4090` compiles them all.)"""
    code = (
        "import concurrent.futures, dataclasses, json\n"
        "from tritonlstm import compilecheck as cc\n"
        "gpu = cc.GPUS['rtx4090']\n"
        "h100 = {(k, d, h, c) for k, d, h, c, _ in cc.shipped_configs(1024, 256)}\n"
        "jobs = [(k, d, h, c, p, True, gpu) for k, d, h, c, p in cc.shipped_configs(1024, 256, target=gpu)\n"
        "        if (k, d, h, c) not in h100]\n"
        "with concurrent.futures.ProcessPoolExecutor(2) as pool:\n"
        "    rows = list(pool.map(cc._check_job, jobs))\n"
        "print(json.dumps([dict(dataclasses.asdict(r), ok=r.ok) for r in rows]))\n")
    proc = run_python("-c", code, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout)
    assert len(rows) > 20 and {r["kernel"] for r in rows} == {"fwd", "bwd", "stack", "stack_bwd"}
    assert all(r["ok"] and r["smem_limit"] == 101376 and r["spill_bytes"] <= 700 for r in rows), \
        [r for r in rows if not r["ok"] or r["spill_bytes"] > 700]
    assert_estimate_bounds_the_compile(rows)


CLUSTER_COMPILE = """
import torch
from tritonlstm import compilecheck as cc
from tritonlstm.configs import named_variants
ptx = []
report = cc._ptxas_report
cc._ptxas_report = lambda text: ptx.append(text) or report(text)
for kernel, hidden, name in (("fwd", 256, "transposed-cluster"), ("fwd", 512, "transposed-cluster"),
                             ("fwd", 512, "cluster"), ("bwd", 256, "transposed-cluster"), ("bwd", 512, "cluster")):
    cfg = named_variants(kernel, hidden, 16, torch.float16, 132)[name]
    r = cc.check(kernel, torch.float16, hidden, cfg, prefetch=cfg.prefetches(16, hidden))
    text = ptx[-1]
    print(kernel, hidden, name, r.ok, r.error, r.spill_bytes, "barrier.cluster.arrive.release" in text,
          "barrier.cluster.wait.acquire" in text, "%ctaid.x" in text, "%clusterid" in text, "atom." in text)
"""


def test_cluster_exchange_compiles_for_sm90_with_one_program_a_cta():
    """The cluster exchange's kernels (v0.34) for sm_90 (the forward's transposed tiles at H = 512 with 32 units a
    program): no spills, the cluster barrier in place of the counter's atomics, and tl.program_id(0) read from
    %ctaid.x with num_ctas = 1, which _launch_as_cluster relies on (each CTA of the cluster is still its own
    program)."""
    proc = run_python("-c", CLUSTER_COMPILE, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 5, proc.stdout
    for line in lines:
        assert line.split()[3:] == ["True", "None", "0", "True", "True", "True", "False", "False"], line


ORDERING_COMPILE = """
import re, torch
from tritonlstm import compilecheck as cc
from tritonlstm.configs import named_variants
ptx = []
report = cc._ptxas_report
cc._ptxas_report = lambda text: ptx.append(text) or report(text)
for kernel, name in (("fwd", "transposed"), ("bwd", "transposed"), ("fwd", "unsplit"), ("bwd", "unsplit")):
    cfg = named_variants(kernel, 256, 16, torch.float16, 132)[name]
    r = cc.check(kernel, torch.float16, 256, cfg, prefetch=cfg.prefetches(16, 256))
    ops = sorted(set(re.findall(r"\\b(?:atom|ld|st|fence)\\.[a-z0-9_.]+", ptx[-1])))
    print(kernel, name, r.ok, " ".join(ops))
"""

# What each exchange's correctness on a GPU rests on beyond its protocol (which tests/test_concurrent_programs.py
# checks on the interpreter, where every store is visible at once): the memory ordering of its instructions.
COUNTER = ("atom.global.gpu.acq_rel.add", "atom.global.gpu.release.max")  # the counter: arrive/poll, give up
ORDERING = {"transposed": COUNTER, "unsplit": COUNTER}


def test_exchanges_compile_with_the_memory_ordering_they_rely_on():
    """sm_90 PTX of the forward and backward kernels with the counter barrier between programs (fp16, H = 256,
    B = 16; the transposed and the unsplit tiles): it arrives and polls with acq_rel atomics at GPU scope and
    releases a failed wait with an atomic max."""
    proc = run_python("-c", ORDERING_COMPILE, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 4, proc.stdout
    for line in lines:
        kernel, name, ok, *ops = line.split()
        assert ok == "True", line
        for op in ORDERING[name]:
            assert any(o.startswith(op) for o in ops), f"{kernel} {name}: no {op} in {ops}"


CLUSTER_LAUNCH = """
import importlib.util, sys
import torch
from tritonlstm.compilecheck import launch_onto_nothing

calls = []
launch_onto_nothing(lambda *args: calls.append(args))
torch.cuda.current_stream = lambda device=None: type("S", (), {"cuda_stream": 7})()
from tritonlstm.kernels import lstm as k

spec = importlib.util.spec_from_file_location("floor_probe", sys.argv[1])
probe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(probe)
u = torch.zeros(4, 16, 256, dtype=torch.float16)
y, ints = torch.zeros_like(u), torch.zeros(2, dtype=torch.int32)
args = (u, y, ints[:1], ints[1:], 4, 16, 256, 1000)
meta = dict(BB=16, BH=16, BK=256, MODE=probe.MODES["cluster"], LOAD_H=True, num_warps=4)
probe.floor_probe_kernel[(16, 2, 3)](*args, **meta)
k._launch_as_cluster(probe.floor_probe_kernel, (16, 2, 3), args, meta)
plain, cluster = calls
print(plain[:3], cluster[:3], plain[5][1], cluster[5][1], plain[5][::2] == cluster[5][::2], plain[3:5] == cluster[3:5],
      type(plain[6]) is type(cluster[6]), plain[7:9] == cluster[7:9],
      len(cluster[9:]) == len(probe.floor_probe_kernel.arg_names), plain[9:] == cluster[9:])
"""


def test_cluster_launch_hands_tritons_launcher_what_a_plain_launch_does_but_grid_x_and_num_ctas():
    """_launch_as_cluster (v0.34) against Triton's own launch of the same kernel and arguments, through a
    stand-in driver that records what reaches the launcher: the same function, stream and arguments (every
    parameter, in order), grid x = 1 instead of P, and the metadata's num_ctas = P, which the launcher turns into
    P CTAs along x in clusters of P."""
    from pathlib import Path

    probe = Path(__file__).resolve().parents[1] / "perf" / "floor_probe.py"
    proc = run_python("-c", CLUSTER_LAUNCH, str(probe), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["(16,", "2,", "3)", "(1,", "2,", "3)", "1", "16"] + ["True"] * 6, proc.stdout


HALF_OPERANDS_COMPILE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tritonlstm.compilecheck import _ptxas_report
from tritonlstm.kernels import lstm as k
sig = dict(W_HH="*fp32", W_IH="*fp32", AMAX="*fp32", W16="*fp16", WIH16="*fp16", SCALES="*fp32", ERR="*i32",
           ERR_HOST="*i32", H0="*fp32", H016="*fp16", N="i32", NUMEL="i32", NUMEL_H0="i32", K_REC="constexpr",
           STACK="constexpr", HAS_DROP="constexpr", HAS_H016="constexpr", BLOCK="constexpr", BN="constexpr")
names = list(sig)
attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in ("W_HH", "W_IH", "AMAX", "W16", "WIH16", "SCALES",
                                                                 "H0", "H016", "NUMEL", "NUMEL_H0")}
for stack, drop, h016 in ((False, False, False), (True, False, False), (True, True, False), (False, False, True)):
    consts = dict(K_REC=14, STACK=stack, HAS_DROP=drop, HAS_H016=h016, BLOCK=k.HALF_BLOCK, BN=4)
    c = triton.compile(ASTSource(fn=k.half_operands_kernel, signature=sig, constexprs=consts, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
    regs, spills = _ptxas_report(c.asm["ptx"])
    print(stack, drop, h016, regs, spills, "ld.global.v4" in c.asm["ptx"], "cvt.rn.f16x2.f32" in c.asm["ptx"])
"""


def test_half_operands_kernel_compiles_for_sm90_vectorised_without_spills():
    """_half_weights' kernel (perf/NOTES.md v0.35): 16-byte loads and round-to-nearest float16 pairs, no spills;
    also where it writes h0's float16 copy for the forward's HALF_H (v0.63)."""
    proc = run_python("-c", HALF_OPERANDS_COMPILE, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.split("\n")[:4]
    cases = ((False, False, False), (True, False, False), (True, True, False), (False, False, True))
    for line, (stack, drop, h016) in zip(lines, cases, strict=True):
        s, d, h, regs, spills, v4, cvt = line.split()
        assert (s, d, h) == (str(stack), str(drop), str(h016)) and int(spills) == 0 and int(regs) <= 64 \
            and v4 == cvt == "True", line


TRANSPOSED_SHARED = """
import json, sys
import torch
from tritonlstm.compilecheck import check
from tritonlstm.configs import LSTMConfig, shared_bytes
rows = []
for kernel, dtype, H, bh, bb, warps, half in json.loads(sys.argv[1]):
    dtype = getattr(torch, dtype)
    cfg = LSTMConfig(block_h=bh, block_b=bb, block_k=H, w_resident=True, batch_groups=1, num_warps=warps,
                     transposed=True, half_w=half)
    r = check(kernel, dtype, H, cfg)
    rows.append([r.error, r.shared, shared_bytes(cfg, kernel, H, dtype.itemsize)])
print(json.dumps(rows))
"""


def test_shared_estimate_bounds_the_transposed_tiles_beyond_the_picks():
    """configs.shared_bytes of resident transposed tiles that neither the heuristic nor a named variant picks on an
    H100 but a tuned cache or a smaller GPU's fitting may meet: 64-row batch tiles and 32-unit programs, whose
    product's layout change outgrows h's chunk (it was under by 6-22 KB, perf/NOTES.md v0.34), and h in several
    chunks on 8 warps (4 KB more)."""
    cases = [("fwd", "float16", 64, 32, 64, 4, False), ("fwd", "float16", 256, 16, 64, 8, False),
             ("fwd", "float16", 512, 32, 64, 8, False), ("fwd", "float32", 512, 16, 16, 8, False),
             ("stack", "float16", 512, 16, 16, 8, False), ("fwd", "float32", 1024, 32, 64, 8, True)]
    proc = run_python("-c", TRANSPOSED_SHARED, json.dumps(cases), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for case, (error, compiled, estimate) in zip(cases, json.loads(proc.stdout.splitlines()[-1]), strict=True):
        assert error is None and compiled <= estimate <= compiled + 16384, (case, compiled, estimate)


BB128_COMPILE = """
import json
import torch
from tritonlstm.compilecheck import check
from tritonlstm.configs import named_variants
rows = []
for dtype in (torch.bfloat16, torch.float32):
    cfg = named_variants("fwd", 1024, 256, dtype, 132, names=("transposed-streamed-bb128",))[
        "transposed-streamed-bb128"]
    for store in (False, True):
        r = check("fwd", dtype, 1024, cfg, store_gates=store, prefetch=cfg.prefetches(256, 1024))
        rows.append([str(dtype), store, cfg.prefetches(256, 1024), r.error, r.shared, r.spill_bytes])
print(json.dumps(rows))
"""


def test_bb128_forward_compiles_as_launched_without_spills():
    """v0.36's 128-row tiles as the tuner launches them at H = 1024, B = 256 (each program one tile, so its next
    step's gx prefetched; training and inference variants): no spills, 72 KB of shared memory."""
    proc = run_python("-c", BB128_COMPILE, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout.splitlines()[-1])
    assert len(rows) == 4
    for dtype, store, prefetch, error, shared, spills in rows:
        assert prefetch and error is None and spills == 0 and shared <= 80 * 1024, (dtype, store, shared, spills)


W8_COMPILE = """
import json
import torch
from tritonlstm.compilecheck import check
from tritonlstm.configs import named_variants, shared_bytes
from tritonlstm.kernels import lstm as k
rows = []
for dtype, name in ((torch.float16, "transposed-w8"), (torch.bfloat16, "transposed-w8"),
                    (torch.float32, "transposed-half-w8")):
    for B in (16, 64):
        cfg = named_variants("fwd", 1024, B, dtype, 132, names=(name,))[name]
        half_h = cfg.half_w and dtype == torch.float32
        r = check("fwd", dtype, 1024, cfg, prefetch=cfg.prefetches(B, 1024))
        rows.append([str(dtype), B, cfg.num_warps, k.transposed_chunk(cfg, dtype.itemsize, half_h=half_h), r.error,
                     r.shared, r.spill_bytes, shared_bytes(cfg, "fwd", 1024, dtype.itemsize)])
print(json.dumps(rows))
"""


def test_eight_warp_transposed_tiles_take_h_in_one_load_without_spills():
    """v0.64's transposed-w8 / transposed-half-w8 at H = 1024, 16-row tiles: 8 warps hold the whole [16, 1024] h tile
    (16-bit, or float32's in float16 with HALF_H) in one load, where 4 warps take four (and spill 864-912 bytes in one:
    compile-only sm_90); no spills, and the shared-memory estimate at or above the compile."""
    proc = run_python("-c", W8_COMPILE, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout.splitlines()[-1])
    assert len(rows) == 6
    for dtype, B, warps, kc, error, shared, spills, estimate in rows:
        assert warps == 8 and kc == 1024 and error is None and spills == 0 and shared <= estimate, \
            (dtype, B, kc, error, shared, spills, estimate)


ROUNDS_COMPILE = """
import importlib.util, json, sys
import torch, triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tritonlstm import compilecheck as cc
from tritonlstm.configs import named_variants

compiled = []
compile_ = triton.compile
triton.compile = lambda *a, **kw: compiled.append(compile_(*a, **kw)) or compiled[-1]


@triton.jit
def row_sums(X, Y, B, H, BB: tl.constexpr, BK: tl.constexpr):
    # The floor probe's read before session 25: a loaded tile summed in registers.
    o_b = tl.arange(0, BB)
    o_k = tl.arange(0, BK)
    for s in range(4):
        b = tl.load(X + (s * B + o_b[:, None]) * H + o_k[None, :], mask=(o_b < B)[:, None] & (o_k < H)[None, :])
        tl.store(Y + s * B + o_b, tl.sum(b.to(tl.float32), axis=1))


def rounds(fn, sig, consts, H, opcode, **options):
    c = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=cc._launch_attrs(sig, H)),
                       target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, **options))
    return cc.load_rounds(cc.sass(c.asm["cubin"]), opcode)


out = {"sum": rounds(row_sums, dict(X="*fp16", Y="*fp32", B="i32", H="i32"), dict(BB=16, BK=256), 256, "LDG.E.128")}
spec = importlib.util.spec_from_file_location("floor_probe", sys.argv[1])
probe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(probe)
sig = dict(U="*fp16", Y="*fp16", SYNC="*i32", ERR="*i32", T="i32", B="i32", H="i32", max_spin="i32")
for mode in ("none", "barrier", "cluster"):
    for H in (256, 512):
        out[f"probe {mode} {H}"] = rounds(probe.floor_probe_kernel, sig,
                                          dict(BB=16, BH=16, BK=H, MODE=probe.MODES[mode], LOAD_H=True), H,
                                          "LDG.E.128.STRONG.GPU" if mode == "cluster" else "LDG.E.128", num_stages=1)
for H in (256, 512):
    cfg = named_variants("fwd", H, 16, torch.float16, 132, names=("transposed-cluster",))["transposed-cluster"]
    assert cc.check("fwd", torch.float16, H, cfg, prefetch=cfg.prefetches(16, H)).ok
    out[f"kernel {H}"] = cc.load_rounds(cc.sass(compiled[-1].asm["cubin"]), "LDG.E.128.STRONG.GPU")
print(json.dumps(out))
"""


def test_h_read_takes_one_round_trip_where_it_is_one_chunk(tmp_path):
    """The SASS of a step's h_{t-1} read, in L2 round trips one after another (compilecheck.load_rounds): one in the
    16-bit B = 16 forward's transposed-cluster tiles at H = 256 and 512 (all its 16-byte loads issued before any
    is waited for), and one in the floor probe's modes, whose read goes to a dot as the kernel's does. The control:
    the same tile summed in registers (the probe's read before session 25) takes four, ptxas consuming each load
    before it issues the next (perf/NOTES.md "Session 25")."""
    from pathlib import Path

    probe = Path(__file__).resolve().parents[1] / "perf" / "floor_probe.py"
    script = tmp_path / "rounds.py"  # (a file: Triton reads a jit function's source from it)
    script.write_text(ROUNDS_COMPILE)
    proc = run_python(str(script), str(probe), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out.pop("sum") >= 2, out
    assert out == {k: 1 for k in out} and len(out) == 8, out


# The shipped H200 configs compiled in a subprocess, each compile kept (`compiled`) for its SASS.
SHIPPED_COMPILES = """
import json, re, torch, triton
from tritonlstm import compilecheck as cc
from tritonlstm.kernels import lstm as k
from tritonlstm.tuning import config_key, lookup_in

compiled = []
compile_ = triton.compile
triton.compile = lambda *a, **kw: compiled.append(compile_(*a, **kw)) or compiled[-1]
"""

PAIRS_COMPILE = SHIPPED_COMPILES + """
out = []
for dtype, H, B, switches in ((torch.float16, 512, 16, (True, False)), (torch.float32, 1024, 16, (True,))):
    cfg = lookup_in("NVIDIA H200", config_key("bwd", dtype, H, B, 1))[0]
    for on in switches:
        k.SPLIT_PAIRS = on
        r = cc.check("bwd", dtype, H, cfg, prefetch=cfg.prefetches(B, H))
        out.append([str(dtype), H, B, cfg.split_k, k.pairs_gates(cfg, "bwd", H, dtype.itemsize, cc.H100.smem),
                    r.error, r.spill_bytes, cc.load_rounds(cc.sass(compiled[-1].asm["cubin"]), "LDG.E.128.STRONG.GPU"),
                    r.shared])
print(json.dumps(out))
"""


def test_split_backward_pairs_take_fewer_round_trips_and_spill_less():
    """v0.66 on the shipped H200 split-K backward tiles (sm_90 SASS): dG_{t+1}'s gates loaded two at a time read it
    in fewer L2 round trips one after another (compilecheck.load_rounds) and spill less than each gate loaded
    inside its dot: 16-bit H = 512 B = 16 in 2 rounds without spills (unpaired: 4 rounds, 172 bytes). Where the
    second gate's operand would not fit the shared memory (fp32 H = 1024, split 8: 262144 bytes paired), the tiles
    stay unpaired, within the limit. (16-bit H = 1024 and fp32 H 256 B 256, 4 -> 3 rounds: perf/NOTES.md v0.66.)"""
    proc = run_python("-c", PAIRS_COMPILE, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    paired, unpaired, fp32 = json.loads(proc.stdout.splitlines()[-1])
    assert all(r[3] > 1 and r[5] is None and r[8] <= SM90_SHARED_LIMIT for r in (paired, unpaired, fp32))
    assert paired[4] and not unpaired[4]
    assert paired[6:8] == [0, 2] and unpaired[6:8] == [172, 4], (paired, unpaired)
    assert not fp32[4], fp32


GATHER_COMPILE = SHIPPED_COMPILES + """
cfg = lookup_in("NVIDIA H200", config_key("bwd", torch.float16, 256, 16, 1))[0]
out = []
for in_registers, load in ((k.REDUCE_SCATTER_IN_REGISTERS, k.REDUCE_SCATTER_LOAD), (0, 16)):
    k.REDUCE_SCATTER_IN_REGISTERS, k.REDUCE_SCATTER_LOAD = in_registers, load
    r = cc.check("bwd", torch.float16, 256, cfg, prefetch=cfg.prefetches(16, 256))
    sass = cc.sass(compiled[-1].asm["cubin"])
    ops = re.findall(r"/\\*[0-9a-f]{4}\\*/\\s+(?:@!?U?P\\w+\\s+)?([A-Z][A-Z0-9_.]+)", sass)
    out.append([cfg.transposed, k.reduce_scatter_constexprs(cfg, 256)["QC"], r.error, r.spill_bytes,
                ops.count("SHFL.BFLY"), ops.count("BAR.SYNC.DEFER_BLOCKING")])
print(json.dumps(out))
"""


def test_reduce_scatter_backward_sums_the_shares_without_exchanges_between_threads():
    """v0.67 on the shipped H200 reduce-scatter backward (16-bit H = 256 B = 16, sm_90 SASS): with one producer's
    share a load each thread sums its own elements, so the step loses the sum's shuffles and 5 of its CTA barriers
    (the control, 16 producers a load as before: 50 shuffles, 11 barriers), spilling nothing."""
    proc = run_python("-c", GATHER_COMPILE, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, sixteen = json.loads(proc.stdout.splitlines()[-1])
    assert one[:4] == [True, 1, None, 0] and sixteen[:4] == [True, 16, None, 0], (one, sixteen)
    assert one[4] == 0 and sixteen[4] >= 32, (one, sixteen)
    assert one[5] <= sixteen[5] - 4, (one, sixteen)


CARRY_COMPILE = SHIPPED_COMPILES + """
out = []
for kernel in ("fwd", "bwd"):
    cfg = lookup_in("NVIDIA H200", config_key(kernel, torch.float16, 256, 16, 1))[0]
    for as_loaded, early in ((False, False), (True, False), (True, True)):
        k.PREFETCH_AS_LOADED, k.ARRIVE_EARLY = as_loaded, early
        r = cc.check(kernel, torch.float16, 256, cfg, prefetch=cfg.prefetches(16, 256))
        sass = cc.sass(compiled[-1].asm["cubin"])
        out.append([kernel, cfg.clustered, r.error, r.spill_bytes, cc.prefetch_reads_before_the_wait(sass),
                    *cc.memory_ops_between_arrive_and_wait(sass)])
cfg = lookup_in("NVIDIA H200", config_key("bwd", torch.float16, 512, 16, 1))[0]
k.PREFETCH_AS_LOADED = True
for early in (False, True):
    k.ARRIVE_EARLY = early
    r = cc.check("bwd", torch.float16, 512, cfg, prefetch=cfg.prefetches(16, 512))
    sass = cc.sass(compiled[-1].asm["cubin"])
    out.append(["bwd", cfg.clustered, r.error, r.spill_bytes, *cc.memory_ops_between_arrive_and_wait(sass)])
print(json.dumps(out))
"""


def test_prefetch_crosses_the_barrier_as_loaded_and_early_arrival_frees_the_fence():
    """v0.68 on the shipped H200 cluster configs at 16-bit H = 256 B = 16 (sm_90 SASS), forward and backward. Widened
    at the load (the control), the prefetched gx (forward) and gates and dy (backward) were read right after their
    loads, before the step's barrier: each step sat out their round trip there. Carried as loaded (CARRY), none is
    read before the wait. With ARRIVE_EARLY the stores no other program needs (gates, c_all, dG, c / dc) and the
    prefetch's loads come between the arrival (with its fence) and the wait; with the barrier whole, nothing does.
    The same on the grid barrier (the split-K backward at 16-bit H = 512 B = 16: its dc store and prefetch between
    the counter's release and its first poll). No spills in any."""
    proc = run_python("-c", CARRY_COMPILE, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout.splitlines()[-1])
    for kernel, (widened, carried, early) in (("fwd", rows[:3]), ("bwd", rows[3:6])):
        assert all(r[:4] == [kernel, True, None, 0] for r in (widened, carried, early)), rows
        assert widened[4] >= 4 and carried[4] == 0 and early[4] == 0, rows
        assert widened[5:] == carried[5:] == [0, 0], rows
        assert early[5] >= 5 and early[6] >= 4, rows
    whole, early = rows[6:]
    assert whole[:4] == early[:4] == ["bwd", False, None, 0], rows
    assert whole[4:] == [0, 0] and early[4] >= 1 and early[5] >= 4, rows


BULK_COMPILE = SHIPPED_COMPILES + """
out = []
for dtype, H in ((torch.float16, 256), (torch.bfloat16, 512)):
    cfg = lookup_in("NVIDIA H200", config_key("fwd", dtype, H, 16, 1))[0]
    for bulk in (False, True):
        k.BULK_H = bulk
        r = cc.check("fwd", dtype, H, cfg, prefetch=cfg.prefetches(16, H))
        ptx, ops = compiled[-1].asm["ptx"], [m for m, _ in cc.instructions(cc.sass(compiled[-1].asm["cubin"]))]
        waits = [i for i, m in enumerate(ops) if m == "UCGABAR_WAIT"]
        # From the first wait to the last arrival's fence (with BULK, the launch's closing barrier): the steps.
        last = max(i for i, m in enumerate(ops) if m == "UCGABAR_ARV")
        loop = ops[waits[0] + 1:max(i for i, m in enumerate(ops[:last]) if m == "MEMBAR.ALL.GPU")]
        out.append([cfg.clustered, r.error, r.spill_bytes, len(waits), ptx.count("mbarrier.try_wait.parity"),
                    ops.count("UBLKCP.S.S"), sum(m.startswith(("UCGABAR", "MEMBAR.ALL.GPU")) for m in loop),
                    loop.count("LDS.128")])
print(json.dumps(out))
"""


def test_bulk_exchange_has_no_barrier_in_the_step():
    """v0.69 (BULK) on the shipped H200 transposed-cluster forwards (fp16 H = 256, 4 warps; bf16 H = 512, 8 warps;
    B = 16; sm_90 SASS): with it, the cluster barrier and its fence (UCGABAR_*, MEMBAR.ALL.GPU) are left only at the
    launch's start and end, and between them the step waits on an mbarrier, reads h_{t-1} from its own shared memory
    in 16-byte loads and copies its h_t to the cluster with one bulk copy (UBLKCP; one more for the launch's first
    h_{t-1}); without it (the control) the step's barrier is the only UCGABAR_WAIT. No spills."""
    proc = run_python("-c", BULK_COMPILE, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout.splitlines()[-1])
    for whole, bulk in (rows[:2], rows[2:]):
        assert whole[:5] == [True, None, 0, 1, 0] and whole[5] == 0, rows
        assert bulk[:3] == [True, None, 0] and bulk[3] == 2 and bulk[4] >= 1 and bulk[5] == 2, rows
        assert bulk[6] == 0 and bulk[7] >= 4, rows
