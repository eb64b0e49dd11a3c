"""GPU tests: the persistent multi-program kernels against cuDNN (torch.nn.LSTM) with copied weights.

They run wherever CUDA exists (`pytest -m gpu tests/`); without CUDA the suite runs the kernels on the CPU
interpreter and these are skipped."""

from __future__ import annotations

import contextlib
import dataclasses

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


@pytest.mark.parametrize("precision", ["tf32", "ieee"])
def test_float32_gemms_follow_the_rnn_precision(monkeypatch, precision):
    """float32 on the GPU: with the RNN precision allowing TF32 (PyTorch's default) the input projection and
    the weight and input gradients run on kernels.matmul in TF32, as cuDNN's do; with it off, torch's GEMMs in
    full float32 and the recurrent dot in IEEE. Both against cuDNN under the same setting."""
    from tritonlstm.kernels import matmul as mm

    calls = []
    real = mm.matmul
    monkeypatch.setattr(mm, "matmul", lambda a, b, **kw: calls.append(a.shape) or real(a, b, **kw))
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=precision == "tf32"):
        errs = run_both(64, 64, 512, torch.float32)
    assert (len(calls) == 5) == (precision == "tf32"), calls  # projection, dx, dW_ih, dW_hh's two products
    if precision == "ieee":
        assert max(errs.values()) <= 1e-4, errs


def test_float16_gradients_match_cudnn(monkeypatch):
    """v0.61-v0.62 (HALF_GRADS): a float32 training step whose weight gradients run on column-scaled float16
    operands and whose input gradient on row-scaled ones, both on cuBLAS's float16 GEMM with a float32 output
    (torch.mm's out_dtype), against cuDNN at its TF32 tolerance; dW_ih's and dW_hh's later steps take it (4 column
    conversions), the first step's small product does not; dx's product never reaches matmul_kernel."""
    from tritonlstm.kernels import matmul as mm

    monkeypatch.setattr(mm, "HALF_GRADS", True)
    converted, cublas = [], []
    real, real_mm = mm._half_columns, mm._mm_half_to_float
    monkeypatch.setattr(mm, "_half_columns", lambda x: converted.append(tuple(x.shape)) or real(x))
    monkeypatch.setattr(mm, "_mm_half_to_float", lambda a, b: cublas.append(tuple(a.shape)) or real_mm(a, b))
    run_both(256, 64, 512, torch.float32)
    assert len(converted) == 4, converted
    assert len(cublas) >= 3, cublas  # dW_hh's, dW_ih's, and dx's (in row chunks)


def test_float16_gemms_match_float64_row_by_row():
    """kernels.matmul on row-scaled float16 operands (v0.43) at a bench cell's size, on the GPU's wgmma: rows of a
    1e30 apart and columns of b 1e20 apart, each row as precise as TF32 makes it; in row chunks the same bits."""
    from tritonlstm.kernels import matmul as mm

    g = torch.Generator(device="cuda").manual_seed(0)
    M, K, N = 16384, 1024, 4096
    a = torch.randn(M, K, device="cuda", generator=g) * torch.logspace(-15, 15, M, device="cuda")[:, None]
    b = (torch.randn(N, K, device="cuda", generator=g) * torch.logspace(-10, 10, N, device="cuda")[:, None]).t()
    out = mm.matmul(a, b, half=True, row_chunk=M)
    ref = a.double() @ b.double()
    rows = (out.double() - ref).norm(dim=1) / ref.norm(dim=1)
    assert rows.max() < 5e-3 and rows.mean() < 1e-3, (rows.max(), rows.mean())
    assert torch.equal(mm.matmul(a, b, half=True, row_chunk=1000), out)


def _training_step_peak(T, B, H, dtype, w) -> int:
    """Peak bytes allocated by one training step (forward + backward) over what was allocated before it."""
    x = torch.randn(T, B, H, device="cuda", dtype=dtype, requires_grad=True)
    fused_lstm(x, *w, backend="triton")[0].sum().backward()  # compile and warm up
    x.grad = None
    for p in w:
        p.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    y, _ = fused_lstm(x, *w, backend="triton")
    y.backward(torch.ones_like(y))
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_training_step_keeps_what_the_count_says(dtype):
    """The memory of a training step per T*B*H (perf/NOTES.md v0.12): forward gates over gx, c_t, y; backward
    dG over the gates; no zero-filled gradients. The count, dx included: 18 bytes per T*B*H in 16-bit, 32 in
    fp32 (before v0.12: ~38 and ~66); at most 20 and 36 here. Measured as the margin between two sequence
    lengths: run 4 showed a part that does not grow with T (tens of MB, growing with H and B; NOTES v0.20),
    which a single length's peak per T*B*H mixed into the count (32.5 and 44.5 bytes at T = 64)."""
    B, H = 256, 512
    _, w = cudnn_and_weights(H, H, dtype)
    short, long = _training_step_peak(64, B, H, dtype, w), _training_step_peak(128, B, H, dtype, w)
    margin = (long - short) / (64 * B * H)
    fixed_mb = (short - margin * 64 * B * H) / 2 ** 20
    per = 20 if dtype == torch.float16 else 36
    assert margin <= per, f"{margin:.1f} bytes per T*B*H at the margin (and {fixed_mb:.0f} MB that do not grow with T)"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("H,B", [(256, 16), (512, 64)])
def test_training_step_peak_holds_nothing_beyond_the_count(H, B, dtype):
    """The whole peak of a training step, not its margin: the counted tensors (at most 20 / 36 bytes per T*B*H) and
    the weight gradients, plus 4 MB. Run 5's peaks held 30-130 MB more (ATen's staging of the bias gradient's
    row sum; perf/NOTES.md v0.30): bf16 at H = 256, B = 16 took 49 MB, cuDNN 40."""
    T = 256
    _, w = cudnn_and_weights(H, H, dtype)
    peak = _training_step_peak(T, B, H, dtype, w)
    per = 20 if dtype != torch.float32 else 36
    weight_grads = sum(p.numel() for p in w) * dtype.itemsize
    bound = per * T * B * H + weight_grads + 4 * 2 ** 20
    assert peak <= bound, f"peak {peak / 2 ** 20:.1f} MB > {bound / 2 ** 20:.1f} MB"


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


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_launch_cache_runs_what_tritons_own_launch_runs(monkeypatch, dtype):
    """kernels.launcher (v0.49) against kernel[grid](...): a forward and backward through each, bitwise equal
    (the same compiled kernels, the same arguments), at a cluster config's shape (H = 256, B = 16) and a plain
    barrier's (H = 1024, B = 64), with lengths (another specialisation) and without."""
    from tritonlstm.kernels import launcher

    outs = []
    for enabled in (True, False, True):
        monkeypatch.setattr(launcher, "ENABLED", enabled)
        got = []
        for H, B in ((256, 16), (1024, 64)):
            torch.manual_seed(H + B)
            _, w = cudnn_and_weights(H, H, dtype)
            x = torch.randn(24, B, H, device="cuda", dtype=dtype, requires_grad=True)
            lengths = torch.randint(1, 25, (B,), device="cuda")
            for lens in (None, lengths):
                for p in (x, *w):
                    p.grad = None
                y, (hn, cn) = fused_lstm(x, *w, lengths=lens, backend="triton")
                (y.float().sum() + hn.float().sum()).backward()
                got += [y, hn, cn, x.grad] + [p.grad for p in w]
        outs.append([t.clone() for t in got])
    for cached, plain, again in zip(*outs):
        assert torch.equal(cached, plain) and torch.equal(again, plain)


def test_module_parity_multilayer_bidirectional_projection():
    import tritonlstm

    for kw in (dict(num_layers=2, bidirectional=True), dict(num_layers=2, proj_size=128)):
        ref = torch.nn.LSTM(256, 256, **kw).cuda()
        ours = tritonlstm.LSTM(256, 256, backend="triton", **kw).cuda()
        ours.load_state_dict(ref.state_dict())
        x = torch.randn(32, 16, 256, device="cuda")
        y0, (h0, c0) = ref(x)
        y1, (h1, c1) = ours(x)
        assert rel_err(y1, y0) < 5e-3 and rel_err(c1, c0) < 5e-3, kw


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_runs_in_autocast_dtype(dtype):
    import tritonlstm

    ref = torch.nn.LSTM(128, 128).cuda()
    ours = tritonlstm.LSTM(128, 128, backend="triton").cuda()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(16, 8, 128, device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        y0, _ = ref(x)
        y1, (h1, c1) = ours(x)
    # Ours runs in the autocast dtype. cuDNN's nn.LSTM runs fp16 under any autocast dtype (PyTorch's cuDNN RNN
    # autocast wrapper, aten/src/ATen/cudnn/AutocastRNN.cpp, casts to half; seen on an H100, 2026-11-26).
    assert y1.dtype == dtype and h1.dtype == dtype and y0.dtype == torch.float16
    assert rel_err(y1.float(), y0.float()) < 3e-2
    y1.float().sum().backward()
    assert ours.weight_hh_l0.grad is not None and ours.weight_hh_l0.grad.dtype == torch.float32


def test_cuda_graph_capture_forward_and_training_step():
    import tritonlstm

    model = tritonlstm.LSTM(128, 128, num_layers=2, backend="triton").cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    static_x = torch.randn(16, 8, 128, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):  # warm-up: compile the kernels outside the capture
            opt.zero_grad(set_to_none=True)
            model(static_x)[0].square().mean().backward()
            opt.step()
    torch.cuda.current_stream().wait_stream(s)

    g = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(g):
        static_y, _ = model(static_x)
        static_loss = static_y.square().mean()
        static_loss.backward()
        opt.step()
    new_x = torch.randn_like(static_x)
    static_x.copy_(new_x)
    before = [p.detach().clone() for p in model.parameters()]
    g.replay()
    torch.cuda.synchronize()
    # The replay did real work on the new input: the same forward, eagerly, on the pre-step weights.
    check = tritonlstm.LSTM(128, 128, num_layers=2, backend="triton").cuda()
    with torch.no_grad():
        for p, b in zip(check.parameters(), before):
            p.copy_(b)
        y_eager, _ = check(new_x)
    assert rel_err(static_y, y_eager) < 1e-3
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))


@pytest.mark.timeout(300)  # compiles ~60 candidates (device_check.sh runs the GPU tests with --timeout 60)
@pytest.mark.parametrize("quick", [False, True])
def test_tune_small_shape_end_to_end(tmp_path, monkeypatch, quick):
    import json

    from tritonlstm import tuning

    monkeypatch.setenv("TRITONLSTM_CACHE_DIR", str(tmp_path))
    results = tuning.tune(hidden=[64], batch=[16], dtypes=["float16"], seq=16, quick=quick,
                          log_path=tmp_path / "log.json")
    assert {r.key for r in results} == {"fwd|float16|H64|B16|D1", "bwd|float16|H64|B16|D1"}
    assert all(r.best_ms <= r.default_ms * 1.0001 and r.tried >= 1 for r in results)
    log = json.loads((tmp_path / "log.json").read_text())
    assert [k["key"] for k in log["keys"]] == [r.key for r in results]
    for key, r in zip(log["keys"], results):
        assert len(key["candidates"]) == r.tried and key["best_ms"] == min(c["ms"] for c in key["candidates"]
                                                                           if c["ms"] is not None)
        assert all(bool(c["name"]) == quick for c in key["candidates"])
    found = tuning.lookup("fwd", 64, 9, torch.float16, 1, torch.device("cuda"))
    assert found == results[0].best
    if quick:  # a re-tune times what the cache holds now, by that name, so its winner is never slower
        again = tuning.tune_key("fwd", torch.float16, 64, 16, 1, 16, quick=True)
        cached = [c for c in again.log if c["name"].startswith("cache")]
        assert len(cached) == 1 and cached[0]["config"] == dataclasses.asdict(found), again.log
        assert again.best_ms <= cached[0]["ms"] * 1.0001
    _, w = cudnn_and_weights(64, 64, torch.float16)
    y, _ = fused_lstm(torch.randn(16, 16, 64, device="cuda", dtype=torch.float16), *w, backend="triton")
    assert torch.isfinite(y).all()


def reported_once_then_clean(x, w):
    """After a failed launch: synchronize() raises the barrier error once, then a launch with the default
    config runs clean."""
    import tritonlstm

    with pytest.raises(RuntimeError, match="barrier"):
        tritonlstm.synchronize()
    tritonlstm.synchronize()  # reported once
    with torch.no_grad():
        y, _ = fused_lstm(x, *w, backend="triton")
    assert torch.isfinite(y).all()


def test_barrier_that_cannot_complete_gives_nan_then_raises(monkeypatch):
    """192 KB of shared memory per program (compile-only check: fp16, H = 2048, BH = 8, resident W) allows one
    program per SM, so 256 programs of one group cannot all be resident: the barrier must fail, boundedly. The
    launch does not sync to report it; its outputs are NaN, and the report comes at synchronize()."""
    import tritonlstm
    from tritonlstm import LSTMConfig, use_config
    from tritonlstm.kernels import lstm as k

    assert torch.cuda.get_device_properties(0).multi_processor_count < 256
    monkeypatch.setattr(k, "_check_residency", lambda *a: None)
    # Outputs start as a sentinel (conftest fills _alloc's with NaN, which would hide unwritten elements among
    # the poisoned ones): a sentinel left over means never written, another finite value written unpoisoned.
    sentinel = 7.0
    monkeypatch.setattr(k, "_alloc", lambda shape, dtype, device: torch.full(shape, sentinel, dtype=dtype,
                                                                              device=device))
    cfg = LSTMConfig(block_h=8, block_b=16, block_k=2048, w_resident=True, persistent=True, num_warps=8,
                     max_spin=20000)
    _, w = cudnn_and_weights(64, 2048, torch.float16)
    x = torch.randn(6, 16, 64, device="cuda", dtype=torch.float16)
    with use_config(cfg), torch.no_grad():
        y, (hn, cn) = fused_lstm(x, *w, backend="triton")
    finite = {name: torch.isfinite(t).sum().item() for name, t in (("y[1:]", y[1:]), ("hn", hn), ("cn", cn))}
    if any(finite.values()):
        unwritten = {name: (t == sentinel).sum().item() for name, t in (("y", y), ("hn", hn), ("cn", cn))}
        per_step = torch.isfinite(y).flatten(1).sum(1).tolist()
        # Which programs (8 hidden units each) and batch rows own the finite elements of the last step.
        rows, cols = torch.isfinite(y[-1]).nonzero(as_tuple=True)
        programs = sorted(set((cols // 8).tolist()))
        with contextlib.suppress(RuntimeError):  # the sticky flag must not fail the next test's launch
            tritonlstm.synchronize()
        pytest.fail(f"finite elements left: {finite}; of them still the sentinel (never written): {unwritten}; "
                    f"finite per step of y: {per_step}; programs owning finite y[-1]: {programs[:40]} "
                    f"({len(programs)}), rows: {sorted(set(rows.tolist()))}")
    reported_once_then_clean(x, w)

    # Without synchronize(), the next launch reports it, once the failing program's write into the pinned host flag
    # has landed (v0.75: no copy behind the launch; `launched` does nothing here); and with TRITONLSTM_FLAG_COPY=1's
    # copy instead.
    errors = k.barrier_errors
    for copy in (False, True):
        monkeypatch.setattr(k, "FLAG_COPY", copy)
        with monkeypatch.context() as m:
            if not copy:
                m.setattr(errors, "launched", lambda device, capturing: None)
            with use_config(cfg), torch.no_grad():
                fused_lstm(x, *w, backend="triton")
        torch.cuda.synchronize()
        assert int(errors._host[x.device][0]) == 1  # the host's copy, pinned
        with torch.no_grad(), pytest.raises(RuntimeError, match="barrier"):
            fused_lstm(x, *w, backend="triton")


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("layers", [2, 4])
def test_stack_training_matches_cudnn(layers, dtype):
    """The bench's stack rows (H = 512, B = 16) through both wavefronts, persistent and multi-program:
    outputs and every gradient against cuDNN."""
    import tritonlstm
    from tritonlstm.configs import stack_backward_config

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert stack_backward_config(512, 16, dtype, sms, layers).persistent
    ref = torch.nn.LSTM(512, 512, num_layers=layers).to("cuda", dtype)
    ours = tritonlstm.LSTM(512, 512, num_layers=layers, backend="triton").to("cuda", dtype)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(64, 16, 512, device="cuda", dtype=dtype)
    grads = []
    for m in (ref, ours):
        xl = x.clone().requires_grad_()
        y, (h, c) = m(xl)
        g = torch.Generator(device="cuda").manual_seed(1)
        ((y * torch.randn(y.shape, device="cuda", generator=g, dtype=dtype)).sum() + h.sum() + c.sum()).backward()
        grads.append([y, h, c, xl.grad, *(p.grad for p in m.parameters())])
    tritonlstm.synchronize()
    tol = RESOLUTION_GPU[dtype] * 4  # four layers and 64 steps of rounding differences, both sides TF32 for fp32
    bad = {i: rel_err(a, b) for i, (a, b) in enumerate(zip(grads[1], grads[0])) if not rel_err(a, b) <= tol}
    assert not bad, bad


def test_float32_stack_inference_in_one_launch_on_float16_weights(monkeypatch):
    """float32, 4 layers at H = 512 (perf/NOTES.md v0.29): without training, one forward wavefront with W^T and
    W_ih^T resident in float16 (half_w), where training runs two 2-layer ones; against cuDNN (TF32 on both sides)."""
    from torch.utils._pytree import tree_leaves

    import tritonlstm
    from tritonlstm.kernels import lstm as k

    launches = []
    real = k.lstm_stack_forward
    monkeypatch.setattr(k, "lstm_stack_forward", lambda *a, **kw: launches.append(kw["config"]) or real(*a, **kw))
    ref = torch.nn.LSTM(512, 512, num_layers=4).to("cuda")
    ours = tritonlstm.LSTM(512, 512, num_layers=4, backend="triton").to("cuda")
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(64, 16, 512, device="cuda")
    with torch.no_grad():
        outs = [m(x) for m in (ref, ours)]
    tritonlstm.synchronize()
    assert len(launches) == 1 and launches[0].half_w and launches[0].w_resident, launches
    tol = RESOLUTION_GPU[torch.float32] * 4
    for a, b in zip(tree_leaves(outs[1]), tree_leaves(outs[0])):
        assert rel_err(a, b) <= tol


@pytest.mark.parametrize("H,B,name", [(1024, 1, "transposed-half"), (1024, 16, "transposed-half"),
                                      (512, 64, "transposed-half"), (512, 256, "transposed-streamed-half"),
                                      (1024, 256, "transposed-streamed-bb128-half")])
@pytest.mark.parametrize("half_h", [True, False], ids=["h16", "h32"])
def test_half_w_forward_matches_cudnn(H, B, name, half_h, monkeypatch):
    """The float32 forward's half_w candidates (W^T in float16, scaled; resident v0.29, streamed v0.42) on persistent
    multi-program launches, against cuDNN's TF32; the backward as selected. h16: h_{t-1} exchanged in float16 (the
    default, v0.63); h32: read from y in float32 and rounded in the loop."""
    from tritonlstm.configs import named_variants, use_config
    from tritonlstm.kernels import lstm as k

    monkeypatch.setattr(k, "HALF_H", half_h)

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    cfg = named_variants("fwd", H, B, torch.float32, sms)[name]
    assert cfg.half_w and cfg.persistent and cfg.programs(H) > 1, cfg
    with use_config(cfg, "fwd"):
        run_both(256, B, H, torch.float32)


@pytest.mark.parametrize("dtype,H,B", [(torch.float16, 512, 16), (torch.float16, 1024, 16), (torch.float32, 256, 256)])
@pytest.mark.parametrize("paired", [True, False], ids=["paired", "unpaired"])
def test_split_backward_matches_cudnn_with_gates_loaded_in_pairs_or_not(dtype, H, B, paired, monkeypatch):
    """The shipped split-K backward tiles (persistent, several programs) against cuDNN with dG_{t+1}'s gates loaded
    two at a time (v0.66, the default) and inside their dots (before it)."""
    from tritonlstm.configs import named_variants, use_config
    from tritonlstm.kernels import lstm as k

    monkeypatch.setattr(k, "SPLIT_PAIRS", paired)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    cfg = named_variants("bwd", H, B, dtype, sms)["split4"]
    assert cfg.split_k == 4 and cfg.persistent and cfg.programs(H) > 1, cfg
    with use_config(cfg, "bwd"):
        run_both(256, B, H, dtype)


def test_stack_dropout_matches_the_layer_by_layer_computation():
    """Dropout inside the wavefronts against the same scale applied between separate single-layer launches."""
    from tritonlstm.functional import lstm_layer, lstm_stack

    T, B, H, L = 48, 16, 256, 3
    ws = [tuple((torch.rand(*shape, device="cuda") * 2 - 1) * H ** -0.5 for shape in
                ((4 * H, H), (4 * H, H), (4 * H,), (4 * H,))) for _ in range(L)]
    scale = (torch.rand(L - 1, T, B, H, device="cuda") > 0.25).float() / 0.75
    x = torch.randn(T, B, H, device="cuda")
    outs = []
    for stacked in (True, False):
        leaves = [tuple(w.clone().requires_grad_() for w in lw) for lw in ws]
        xl = x.clone().requires_grad_()
        if stacked:
            y, _ = lstm_stack(xl, leaves, dropout_scale=scale, backend="triton")
        else:
            y = xl
            for l in range(L):
                y, _ = lstm_layer(y if l == 0 else y * scale[l - 1], [(*leaves[l], None)], backend="triton")
        y.square().sum().backward()
        outs.append([y, xl.grad, *(w.grad for lw in leaves for w in lw)])
    for a, b in zip(*outs):
        assert rel_err(a, b) < 1e-2


def packed_bidirectional_pair(H, B, dtype):
    """cuDNN's bidirectional layer and ours with its weights, per-row lengths (one row of the full 64 steps) and
    a padded input [64, B, H]."""
    from tritonlstm import LSTM

    m = torch.nn.LSTM(H, H, bidirectional=True).to("cuda", dtype)
    ours = LSTM(H, H, bidirectional=True, backend="triton").to("cuda", dtype)
    ours.load_state_dict(m.state_dict())
    lengths = torch.randint(1, 65, (B,))
    lengths[0] = 64
    x = torch.randn(64, B, H, device="cuda", dtype=dtype)
    return m, ours, lengths, x


def packed_bidirectional_matches_cudnn(H, B, dtype, fwd_config):
    """Both directions and per-row lengths in one forward launch with fwd_config, against cuDNN's packed
    bidirectional layer."""
    from tritonlstm.configs import use_config

    m, ours, lengths, x = packed_bidirectional_pair(H, B, dtype)
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
    with use_config(fwd_config, "fwd"), torch.no_grad():
        a, b = m(packed)[0], ours(packed)[0]
    assert rel_err(b.data, a.data) <= RESOLUTION_GPU[dtype] * 2


LAYOUT_CASES = [pytest.param(kind, H, B, dt, id=f"{kind}-H{H}-B{B}-{name}")
                for kind in ("transposed", "merged")
                for name, dt in DTYPES.items() for H, B in ((256, 16), (512, 64), (1024, 16))
                if not (dt == torch.float32 and H == 1024 and kind.startswith("transposed"))] + \
    [pytest.param("transposed-streamed", H, B, dt, id=f"transposed-streamed-H{H}-B{B}-{name}")
     for name, dt in DTYPES.items() for H, B in ((1024, 16), (1024, 256))] + \
    [pytest.param("transposed-streamed-bb128", 1024, 256, dt, id=f"transposed-streamed-bb128-H1024-B256-{name}")
     for name, dt in DTYPES.items()]


def _layout_config(kind, H, B, dtype, sms, directions=1):
    """The heuristic's tiles (measured=False) with merged gate dots (v0.11), or the transposed tiles (v0.18: W^T
    resident or streamed), as the tuner's candidates build them."""
    import dataclasses

    from tritonlstm.configs import heuristic_config, transposed_config

    if kind == "merged":  # the heuristic's pick at B > 16 with a short K (v0.20); the backward ignores it
        plain = heuristic_config(H, B, dtype, sms, directions=directions, kernel="none", measured=False)
        return dataclasses.replace(plain, merged_gates=True, num_warps=8)
    share = sms // directions
    if kind == "transposed-streamed":
        return transposed_config(H, B, dtype.itemsize, share, 64 if B >= 64 else 16, streamed=True)
    if kind == "transposed-streamed-bb128":  # v0.36, as the tuner takes it
        from tritonlstm.configs import named_variants

        return named_variants("fwd", H, B, dtype, share, names=(kind,))[kind]
    return transposed_config(H, B, dtype.itemsize, share, 16)


@pytest.mark.parametrize("kind,H,B,dtype", LAYOUT_CASES)
def test_transposed_and_merged_dots_match_cudnn(kind, H, B, dtype):
    """The tuner's newer candidates on persistent multi-program launches, forward and backward, then both
    directions with per-row lengths: what the interpreter cannot show (wgmma)."""
    import dataclasses

    from tritonlstm.configs import use_config

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    cfg = _layout_config(kind, H, B, dtype, sms)
    assert cfg.persistent and cfg.programs(H) > 1, cfg
    # The backward on the same tiles and barrier, with dG's exchange as before (its reduce-scatter has its own test).
    with use_config(cfg, "fwd"), use_config(dataclasses.replace(cfg, transposed=False), "bwd"):
        run_both(256, B, H, dtype)
    packed_bidirectional_matches_cudnn(H, B, dtype, _layout_config(kind, H, B, dtype, sms, directions=2))


CLUSTER_CASES = [pytest.param(kind, H, dt, id=f"{kind}-H{H}-{name}") for name, dt in DTYPES.items()
                 for kind, H in (("cluster", 256), ("cluster", 512), ("transposed-cluster", 256),
                                 ("transposed-cluster", 512))
                 # float32 at H = 512 has 32 programs of 16 units in both layouts: over a cluster's 16 (no such
                 # variant: named_variants offers neither)
                 if not (H == 512 and dt == torch.float32)]


def _groups_without_rows_and_split_launches(kind, H, dtype, sms):
    """The forward of variant `kind` against cuDNN with 4 batch groups for B = 40's 3 tiles (a group of programs
    without rows, which must still meet the others), then at B = 16 with the sequence split into launches of 3 steps
    (each launch's first h_{t-1} from what the launch before left)."""

    from tritonlstm.configs import named_variants, use_config

    four_groups = dataclasses.replace(named_variants("fwd", H, 40, dtype, sms)[kind], batch_groups=4)
    with use_config(four_groups, "fwd"):
        run_both(16, 40, H, dtype, backward=False)
    _split_launches_match_cudnn(kind, H, dtype, sms)


def _split_launches_match_cudnn(kind, H, dtype, sms):
    """The forward of variant `kind` at B = 16 against cuDNN, the sequence split into launches of 3 steps."""
    import triton.language as tl

    from tritonlstm.configs import named_variants, use_config
    from tritonlstm.kernels import lstm as k

    fwd = named_variants("fwd", H, 16, dtype, sms)[kind]
    released = k.RELEASED
    k.RELEASED = tl.constexpr(3 * fwd.programs(H) + 1)
    try:
        with use_config(fwd, "fwd"):
            run_both(10, 16, H, dtype, backward=False)
    finally:
        k.RELEASED = released


@pytest.mark.parametrize("kind,H,dtype", CLUSTER_CASES)
def test_cluster_barrier_matches_cudnn(kind, H, dtype):
    """The cluster exchange (v0.34): a barrier's programs launched as one thread-block cluster (16 at H = 512,
    non-portable) and met by the hardware cluster barrier, forward and backward (the backward has no transposed
    tiles at H = 512: its own config there), B = 16 and B = 64 (batch groups: a cluster each), then both
    directions with per-row lengths (a cluster per direction); transposed-cluster's forward also with more batch
    groups than tiles, and with the sequence split into launches."""
    from tritonlstm.configs import named_variants, use_config

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for B in (16, 64):
        fwd = named_variants("fwd", H, B, dtype, sms)[kind]
        bwd = named_variants("bwd", H, B, dtype, sms).get(kind)
        assert fwd.clustered and fwd.programs(H) > 1 and (bwd is None or bwd.clustered), fwd
        with use_config(fwd, "fwd"), use_config(bwd, "bwd"):
            run_both(64, B, H, dtype)
    packed_bidirectional_matches_cudnn(H, 16, dtype, named_variants("fwd", H, 16, dtype, sms // 2)[kind])
    if kind == "transposed-cluster":
        _groups_without_rows_and_split_launches(kind, H, dtype, sms)


@pytest.mark.parametrize("kind", ["unsplit", "transposed"])
def test_stack_with_transposed_dots_matches_cudnn(kind):
    """A 4-layer fp16 stack (the bench's stack row, H = 512, B = 16) through both wavefronts, the forward's dots
    as the heuristic's tiles or transposed (W_ih and W_hh), a barrier over all 128 programs."""

    from tritonlstm import LSTM
    from tritonlstm.configs import LSTMConfig, heuristic_config, stack_backward_config, use_config

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    fwd = LSTMConfig(block_h=16, block_b=16, block_k=512, w_resident=True, num_warps=4, transposed=True) \
        if kind.startswith("transposed") else \
        heuristic_config(512, 16, torch.float16, sms, layers=4, kernel="stack", measured=False)
    bwd = stack_backward_config(512, 16, torch.float16, sms, 4)
    m = torch.nn.LSTM(512, 512, num_layers=4).to("cuda", torch.float16)
    ours = LSTM(512, 512, num_layers=4, backend="triton").to("cuda", torch.float16)
    ours.load_state_dict(m.state_dict())
    x = torch.randn(64, 16, 512, device="cuda", dtype=torch.float16)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    with use_config(fwd, "stack"), use_config(bwd, "stack_bwd"):
        y = ours(xs[1])[0]
        gy = torch.randn_like(y)
        (y * gy).sum().backward()
    y_ref = m(xs[0])[0]
    (y_ref * gy).sum().backward()
    tol = RESOLUTION_GPU[torch.float16] * 2
    assert rel_err(y, y_ref) <= tol and rel_err(xs[1].grad, xs[0].grad) <= tol
    for a, b in zip(ours.parameters(), m.parameters()):
        assert rel_err(a.grad, b.grad) <= tol


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_module_on_a_gpu_other_than_the_current_one():
    """Triton launches on the current device: a model on cuda:1 while cuda:0 is current must still run on
    cuda:1 (the launcher switches devices around the launch)."""
    from tritonlstm import LSTM

    ref = torch.nn.LSTM(64, 64, num_layers=2).to("cuda:1")
    ours = LSTM(64, 64, num_layers=2, backend="triton").to("cuda:1")
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(16, 4, 64, device="cuda:1", requires_grad=True)
    with torch.cuda.device(0):
        y, _ = ours(x)
        y.sum().backward()
    assert y.device == torch.device("cuda:1")
    assert rel_err(y, ref(x)[0]) <= RESOLUTION_GPU[torch.float32] * 2
    # A float32 stack on float16 operands (LSTMConfig.half_w): its operands come from a launch of their own
    # (half_operands_kernel, v0.35), before the recurrence's.
    from tritonlstm.configs import named_variants, use_config

    half = named_variants("stack", 64, 4, torch.float32, 66, names=("transposed-half",), layers=2)["transposed-half"]
    with torch.cuda.device(0), use_config(half, "stack"), torch.backends.cudnn.flags(enabled=True, allow_tf32=True):
        y, _ = ours(x)
    assert rel_err(y, ref(x)[0]) <= RESOLUTION_GPU[torch.float32] * 2


EARLY_CASES = ([pytest.param("transposed-cluster", H, dt, id=f"transposed-cluster-H{H}-{name}")
                for name, dt in DTYPES.items() for H in (256, 512)
                if not (H == 512 and dt == torch.float32)]  # float32 H = 512: 32 programs, over a cluster's 16
               + [pytest.param("shipped", H, dt, id=f"shipped-H{H}-{name}") for name, dt in DTYPES.items()
                  for H in (512, 1024)])


@pytest.mark.parametrize("kind,H,dtype", EARLY_CASES)
def test_early_arrival_matches_cudnn_and_the_whole_barrier(kind, H, dtype, monkeypatch):
    """ARRIVE_EARLY (perf/NOTES.md v0.68): each program arrives at the step's barrier right after its exchange's
    stores and waits at the step's end. On the hardware cluster barrier (transposed-cluster's forward and, at
    H = 256, its reduce-scatter backward) and on the grid barrier (the shipped configs at H 512 / 1024: split-K
    backward, dG the exchange), B = 16 and 64 (batch groups of one tile each where the config prefetches): against
    cuDNN, and the same errors to the bit as the whole barrier on the same inputs. A missing arrival would hang
    the cluster's launch and fail the grid barrier's; an exchange stored after the arrival would read stale."""
    from helpers import launch_constexprs
    from tritonlstm.configs import named_variants, use_config
    from tritonlstm.kernels import lstm as k

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    early = {name: launch_constexprs(monkeypatch, name, "ARRIVE_EARLY") for name in ("lstm_fwd_kernel",
                                                                                       "lstm_bwd_kernel")}
    for B in (16, 64):
        if kind == "shipped":
            configs = contextlib.nullcontext()
        else:
            fwd = named_variants("fwd", H, B, dtype, sms)[kind]
            configs = contextlib.ExitStack()
            configs.enter_context(use_config(fwd, "fwd"))
            configs.enter_context(use_config(named_variants("bwd", H, B, dtype, sms).get(kind), "bwd"))
        errs = {}
        with configs:
            for on in (True, False):
                monkeypatch.setattr(k, "ARRIVE_EARLY", on)
                torch.manual_seed(B)
                errs[on] = run_both(64, B, H, dtype)
        assert errs[True] == errs[False], errs
    # Each launch's flag: on, then off, at each B (on where the launch prefetches one tile a program).
    flags = early["lstm_fwd_kernel"] + early["lstm_bwd_kernel"]
    assert any(flags[0::2]) and not any(flags[1::2]), early
    if kind == "transposed-cluster":
        assert early["lstm_fwd_kernel"] == [True, False] * 2, early
        if H == 256:
            assert early["lstm_bwd_kernel"] == [True, False] * 2, early


BULK_CASES = [pytest.param(H, dt, id=f"H{H}-{name}") for name, dt in DTYPES.items() if dt != torch.float32
              for H in (256, 512)]


def _bulk_outputs(T, B, H, dtype, lengths=None):
    """y, h_n, c_n and every gradient of one training call of fused_lstm at seed B (in reverse with lengths)."""
    torch.manual_seed(B)
    _, w = cudnn_and_weights(H, H, dtype)
    x = torch.randn(T, B, H, device="cuda", dtype=dtype, requires_grad=True)
    h0 = (torch.randn(B, H, device="cuda", dtype=dtype) * 0.5).requires_grad_()
    c0 = (torch.randn(B, H, device="cuda", dtype=dtype) * 0.5).requires_grad_()
    y, (hn, cn) = fused_lstm(x, *w, h0, c0, reverse=lengths is not None, lengths=lengths, backend="triton")
    (y.float() * torch.randn(y.shape, device="cuda")).sum().backward()
    return [y, hn, cn, x.grad, h0.grad, c0.grad, *(p.grad for p in w)]


@pytest.mark.timeout(150)  # ~12 launches, most of them compiling (device_check.sh gives each test 60 s)
@pytest.mark.parametrize("H,dtype", BULK_CASES)
def test_bulk_exchange_matches_cudnn_and_the_cluster_barrier_bit_for_bit(H, dtype, monkeypatch):
    """BULK (perf/NOTES.md v0.69): transposed-cluster's forward with h_{t-1} copied into every program's shared
    memory and waited for on mbarriers, no barrier a step. Against cuDNN (B = 16, one cluster; B = 64, four), then
    the same bits as the cluster barrier (outputs and every gradient; the exchange carries the very values y holds),
    in reverse with per-row lengths too, with the sequence split into launches of 3 steps (each launch's first h_{t-1}
    read from what the launch before left, then its own copies), and both directions of a packed batch (a cluster a
    direction). A copy lost or counted against the wrong phase would fail the mbarrier's wait (the launch's error)
    or read a stale slot."""

    from helpers import launch_constexprs
    from tritonlstm.configs import named_variants, use_config
    from tritonlstm.kernels import lstm as k

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    took = launch_constexprs(monkeypatch, "lstm_fwd_kernel", "BULK")
    one = named_variants("fwd", H, 16, dtype, sms)["transposed-cluster"]
    for B in (16, 64):
        # B = 64 on 16-row tiles, a tile a batch group (the variant's own 64-row tiles take h in chunks: no BULK).
        with use_config(dataclasses.replace(one, batch_groups=B // 16), "fwd"):
            monkeypatch.setattr(k, "BULK_H", True)
            run_both(64, B, H, dtype)
            lengths = torch.randint(1, 65, (B,))
            lengths[0] = 64
            for lens in (None, lengths):
                outs = {}
                for on in (True, False):
                    monkeypatch.setattr(k, "BULK_H", on)
                    outs[on] = _bulk_outputs(64, B, H, dtype, lens)
                    k.barrier_errors.check(torch.device("cuda"), wait=True)
                assert all(torch.equal(a, b) for a, b in zip(outs[True], outs[False])), (B, lens is not None)
    assert took == [True, True, False, True, False] * 2, took
    monkeypatch.setattr(k, "BULK_H", True)
    _split_launches_match_cudnn("transposed-cluster", H, dtype, sms)
    both = named_variants("fwd", H, 16, dtype, sms // 2)["transposed-cluster"]
    packed_bidirectional_matches_cudnn(H, 16, dtype, both)
    assert all(took[10:]), took
    k.barrier_errors.check(torch.device("cuda"), wait=True)


REDUCE_SCATTER_CASES = [pytest.param(kind, H, B, dt, id=f"{kind}-H{H}-B{B}-{name}")
                        for kind in ("transposed", "transposed-streamed") for name, dt in DTYPES.items()
                        for H, B in ((256, 1), (512, 16), (1024, 16))
                        if not (kind == "transposed" and dt == torch.float32 and H == 1024)]


@pytest.mark.parametrize("kind,H,B,dtype", REDUCE_SCATTER_CASES)
def test_reduce_scatter_backward_matches_cudnn(kind, H, B, dtype):
    """The backward's dh by reduce-scatter (perf/NOTES.md v0.24) on persistent multi-program launches: each program
    stores its share of every unit's dh before the barrier and sums its units' shares after it, through a
    two-slot ring, so a missing fence or a slot reused too early shows here as a wrong gradient. Then both
    directions in one launch with per-row lengths, against cuDNN's packed bidirectional layer."""
    from tritonlstm.configs import named_variants, use_config

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    cfg = named_variants("bwd", H, B, dtype, sms)[kind]
    assert cfg.transposed and cfg.persistent and cfg.programs(H) > 1 and cfg.prefetches(B, H), cfg
    with use_config(cfg, "bwd"):
        run_both(256, B, H, dtype)

    packed_bidirectional_training_matches_cudnn(H, max(B, 3), dtype,
                                                named_variants("bwd", H, max(B, 3), dtype, sms // 2)[kind])


def packed_bidirectional_training_matches_cudnn(H, B, dtype, bwd_config):
    """Both directions and per-row lengths in one backward launch with bwd_config: output, input and parameter
    gradients against cuDNN's packed bidirectional layer."""
    from tritonlstm.configs import use_config

    m, ours, lengths, x = packed_bidirectional_pair(H, B, dtype)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    dy = None
    outs = []
    with use_config(bwd_config, "bwd"):
        for model, xi in ((m, xs[0]), (ours, xs[1])):
            packed = torch.nn.utils.rnn.pack_padded_sequence(xi, lengths, enforce_sorted=False)
            y = model(packed)[0].data
            dy = torch.randn_like(y) if dy is None else dy
            (y * dy).sum().backward()
            outs.append(y)
    tol = RESOLUTION_GPU[dtype] * 2
    assert rel_err(outs[1], outs[0]) <= tol
    assert rel_err(xs[1].grad, xs[0].grad) <= 2 * tol
    for (name, a), b in zip(ours.named_parameters(), m.parameters()):
        assert rel_err(a.grad, b.grad) <= 2 * tol, name


GRID_2D_CASES = [pytest.param(H, B, dt, id=f"grid-2d-H{H}-B{B}-{name}") for name, dt in DTYPES.items()
                 for H, B in ((512, 256), (1024, 64)) if not (dt == torch.float32 and H == 1024)]


@pytest.mark.parametrize("H,B,dtype", GRID_2D_CASES)
def test_backward_on_a_2d_grid_matches_cudnn(H, B, dtype):
    """The backward's product on a 2-D grid (perf/NOTES.md v0.26) on persistent multi-program launches: two
    barriers per step, the shares' float32 round trip between them, so a missing fence shows here as a wrong
    gradient. Then both directions in one launch with per-row lengths against cuDNN's packed layer."""
    from tritonlstm.configs import named_variants, use_config

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    cfg = named_variants("bwd", H, B, dtype, sms)["grid-2d"]
    assert cfg.grid_2d and cfg.persistent and cfg.programs(H) > 1, cfg
    with use_config(cfg, "bwd"):
        run_both(128, B, H, dtype)
    packed_bidirectional_training_matches_cudnn(H, B, dtype, named_variants("bwd", H, B, dtype, sms // 2)["grid-2d"])


@pytest.mark.parametrize("name,H,B", [("grid-2d-half", 1024, 64), ("grid-2d-half-bb64", 1024, 64),
                                      ("grid-2d-half", 512, 256), ("grid-2d-half-bb64", 512, 256),
                                      ("split-half", 1024, 16), ("split-half", 512, 64)])
@pytest.mark.parametrize("half_g", [False, True], ids=["g32", "g16"])
def test_float32_backward_on_float16_operands_matches_cudnn(name, H, B, half_g, monkeypatch):
    """float32's backward with W and dG's rows in float16 (LSTMConfig.half_w, perf/NOTES.md v0.40-v0.41), on the
    2-D grid and on the split tiles, persistent launches of 64-128 programs, against cuDNN's TF32: one direction,
    then both in one launch with per-row lengths. g16: the 2-D grid reads dG in float16 as its producers scaled it
    (HALF_G, v0.65; the split tiles have no such path)."""
    from tritonlstm.configs import named_variants, use_config
    from tritonlstm.kernels import lstm as k

    if half_g and not name.startswith("grid-2d"):
        pytest.skip("HALF_G is the 2-D grid's")
    monkeypatch.setattr(k, "HALF_G", half_g)

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    cfg = named_variants("bwd", H, B, torch.float32, sms)[name]
    assert cfg.half_w and cfg.persistent and cfg.programs(H) > 1, cfg
    with use_config(cfg, "bwd"):
        run_both(128, B, H, torch.float32)
    both = named_variants("bwd", H, B, torch.float32, sms // 2)[name]
    packed_bidirectional_training_matches_cudnn(H, B, torch.float32, both)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("B", [16, 256])
@pytest.mark.parametrize("H", [512, 1024])
def test_configs_fitted_to_a_99kb_gpu_match_cudnn(monkeypatch, H, B, dtype):
    """configs.fit_shared_memory's picks for a GPU with 99 KB of shared memory per block (A10, L4, RTX 4090: the
    shipped or heuristic pick cut down: W^T streamed, half the units per program, W streamed), run on this GPU as
    if it had only that much (perf/NOTES.md v0.27): forward and backward against cuDNN."""
    from tritonlstm import configs

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    monkeypatch.setattr(configs, "device_limits", lambda device: (sms, 101376))
    cfgs = [select_config(H, B, dtype, torch.device("cuda"), False, kernel) for kernel in ("fwd", "bwd")]
    assert all(configs.shared_bytes(c, k, H, dtype.itemsize) <= 101376 for c, k in zip(cfgs, ("fwd", "bwd")))
    run_both(64, B, H, dtype)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("shape", [(4096, 1024), (3, 4096, 1024), (16384, 4096), (1500, 300), (1024, 8)],
                         ids=["b16", "stack", "large", "ragged", "narrow"])
def test_bias_sums_finished_by_the_last_program_match_float64(shape, dtype):
    """kernels.reduce (perf/NOTES.md v0.71): each column block's last program to arrive sums the other programs'
    partials, in the biases' dtype, twice. A partial read before its program's release (the ordering of
    _grid_barrier's arrival) or a second finisher shows as a sum off by whole chunks, or as sums that differ
    from launch to launch; here 20 launches agree bit for bit, with float64's sum to one rounding."""
    from tritonlstm.kernels import reduce

    torch.manual_seed(0)
    m = torch.randn(shape, device="cuda").to(dtype)
    got = reduce.column_sums(m, dtype, copies=2)
    assert got.shape == (2, *shape[:-2], shape[-1]) and got.dtype == dtype
    assert torch.equal(got[0], got[1])
    torch.testing.assert_close(got[0].double(), m.double().sum(-2), rtol=max(torch.finfo(dtype).eps, 1e-5),
                               atol=1e-2)
    for _ in range(20):
        assert torch.equal(reduce.column_sums(m, dtype, copies=2), got)


@pytest.mark.parametrize("dtype,H,B", [(torch.float16, 256, 16), (torch.bfloat16, 512, 1), (torch.float32, 512, 16)],
                         ids=["fp16-H256-B16", "bf16-H512-B1", "fp32-H512-B16"])
def test_backward_launch_sums_the_bias_gradients_as_cudnn(dtype, H, B, monkeypatch):
    """v0.73 (TRITONLSTM_BIAS_IN_KERNEL=1) on the shipped configs it applies to: the backward's programs sum dG into
    registers and write both bias gradients at the end (BIAS_COPIES = 2), within the tolerance of cuDNN's
    (test_matches_cudnn's, via run_both), and within float32 rounding of kernels.reduce's sums (switched off)."""
    from helpers import launch_constexprs
    from tritonlstm.kernels import lstm as k

    monkeypatch.setattr(k, "BIAS_IN_KERNEL", True)  # (off by default until this A/B: perf/NOTES.md v0.73)
    seen = launch_constexprs(monkeypatch, "lstm_bwd_kernel", "BIAS_COPIES")
    torch.manual_seed(0)
    run_both(64, B, H, dtype)
    assert seen == [2], seen
    _, w = cudnn_and_weights(H, H, dtype)
    x = torch.randn(64, B, H, device="cuda", dtype=dtype)
    grads = []
    for on in (True, False):
        monkeypatch.setattr(k, "BIAS_IN_KERNEL", on)
        ps = [p.detach().clone().requires_grad_() for p in w]
        y, _ = fused_lstm(x, *ps, backend="triton")
        y.float().square().sum().backward()
        grads.append([p.grad for p in ps])
    assert seen[1:] == [2, None], seen
    for a, b in zip(*grads):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-2 if dtype != torch.float32 else 1e-4, atol=1e-2)
