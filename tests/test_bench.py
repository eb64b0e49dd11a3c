"""The bench's argument parsing, writers, no-GPU path, and its refusal to time a wrong cell (no GPU needed)."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from helpers import run_python
from tritonlstm import bench

PERF = Path(__file__).parents[1] / "perf"


def _perf_script(name: str):
    """perf/<name>.py imported as a module (the perf scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, PERF / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ENV = {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "triton": "3.6.0", "cudnn": "91900", "date": "2026-11-26"}


def synthetic_rows():
    rows = []
    for i, (d, h, b, m) in enumerate([("float16", 256, 16, "fwd"), ("bfloat16", 512, 1, "fwdbwd"),
                                      ("float32", 1024, 64, "fwd")]):
        rows.append({"dtype": d, "hidden": h, "batch": b, "seq": 256, "layers": 1, "bidirectional": False, "mode": m,
                     "tritonlstm_ms": 0.5 + i, "cudnn_ms": 2.0 + i, "speedup": (2.0 + i) / (0.5 + i),
                     "tritonlstm_peak_mb": 10.0, "cudnn_peak_mb": 11.0, "max_rel_err": 1e-3,
                     "tritonlstm_ms_q20": 0.4})
    rows.append({"dtype": "float16", "hidden": 512, "batch": 16, "seq": 256, "layers": 1, "bidirectional": False,
                 "mode": "fwd", "max_rel_err": 0.5, "error": "output differs from cuDNN: rel err 5.00e-01 > 1e-02"})
    rows.append({**rows[0], "layers": 2, "bidirectional": True, "hidden": 512, "speedup": 3.0, "cudnn_ms": 3.0,
                 "tritonlstm_ms": 1.0})
    return rows


def test_defaults_are_the_issue_matrix():
    a = bench.parse_args([])
    assert a.dtypes == ["float16", "bfloat16", "float32"] and a.hidden == [256, 512, 1024]
    assert a.batch == [1, 16, 64, 256] and a.seq == 256 and a.modes == ["fwd", "fwdbwd"]


def test_options_parse():
    a = bench.parse_args(["--dtypes", "bfloat16", "--hidden", "128,256", "--batch", "8", "--seq", "32",
                          "--modes", "fwd", "--out", "x"])
    assert (a.dtypes, a.hidden, a.batch, a.seq, a.modes, a.out) == (["bfloat16"], [128, 256], [8], 32, ["fwd"], "x")
    assert bench.parse_args(["--quick"]).hidden == [512]


@pytest.mark.parametrize("argv", [["--dtypes", "float64"], ["--hidden", "a"], ["--batch", "0"], ["--seq", "0"],
                                  ["--modes", "train"]],
                         ids=["dtype", "hidden-nan", "batch-0", "seq-0", "mode"])
def test_bad_options_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        bench.parse_args(argv)
    assert e.value.code == 2
    assert argv[0] in capsys.readouterr().err


def test_writers(tmp_path):
    rows = synthetic_rows()
    bench.write_results(tmp_path, ENV, rows)
    data = json.loads((tmp_path / "results.json").read_text())
    assert {k: data[k] for k in ENV} == ENV
    assert len(data["rows"]) == 5 and all(list(r) == list(bench.ROW_KEYS) for r in data["rows"])
    assert data["rows"][0]["speedup"] == pytest.approx(4.0)
    assert data["errors"][0]["error"].startswith("output differs")
    assert data["spread"][0] == {**{k: rows[0][k] for k in bench.CELL_KEYS}, "tritonlstm_ms_q20": 0.4,
                                 "tritonlstm_ms_q80": None, "cudnn_ms_q20": None, "cudnn_ms_q80": None}
    assert len(data["spread"]) == 4  # every row with a quantile (the error row has none)
    with open(tmp_path / "results.csv") as f:
        got = list(csv.DictReader(f))
    assert len(got) == 5 and list(got[0]) == list(bench.ROW_KEYS) and float(got[0]["cudnn_ms"]) == 2.0
    md = (tmp_path / "results.md").read_text()
    assert "NVIDIA H100 80GB HBM3" in md and "| 1 | 256 | 16 | 256 | 0.500 | 1.95 | 2.000 | 4.00x | 10 / 11 |" in md
    assert "| 2 bidir | 512 | 16 | 256 | 1.000 | 3.91 | 3.000 | 3.00x |" in md
    assert "ERROR: output differs" in md
    png = (tmp_path / "heatmap.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_matrix_cells():
    full = bench.cells(bench.parse_args([]))
    assert len(full) == 3 * 3 * 4 * 2 + 3 * 4 * 2
    assert ("bfloat16", 512, 16, 256, 2, True, "fwdbwd") in full
    assert ("float32", 1024, 256, 256, 1, False, "fwd") in full
    quick = bench.cells(bench.parse_args(["--quick"]))
    assert len(quick) == 3 * 2 * 2 + 3 * 2
    assert len(bench.cells(bench.parse_args(["--no-stacks", "--dtypes", "float16"]))) == 3 * 4 * 2


def test_no_gpu_path_says_so_and_exits_0():
    out = run_python("-m", "tritonlstm.bench", "--quick", timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    first = out.stdout.splitlines()[0]
    assert "no CUDA device" in first
    assert "self-check passed" in out.stdout


def test_package_main_checks_the_kernels_and_takes_no_arguments():
    """`python -m tritonlstm` without a GPU sets the interpreter itself (run_python removes TRITON_INTERPRET) and
    checks all three dtypes; --help prints its usage; an unknown argument is an error that names it."""
    out = run_python("-m", "tritonlstm", timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "CPU interpreter" in out.stdout and "self-check passed" in out.stdout
    for dtype in ("float32", "float16", "bfloat16"):
        assert sum(line.startswith("ok") and f" {dtype} " in line for line in out.stdout.splitlines()) == 4, dtype
    usage = run_python("-m", "tritonlstm", "--help", timeout=120)
    assert usage.returncode == 0 and usage.stdout.startswith("usage: python -m tritonlstm")
    bad = run_python("-m", "tritonlstm", "--quick", timeout=120)
    assert bad.returncode == 2 and "unrecognized arguments: --quick" in bad.stderr
    assert "self-check" not in bad.stdout


def test_wrong_cell_is_reported_not_timed():
    """A tritonlstm output that disagrees with the baseline gives an error row and is never timed."""
    import torch

    x = torch.randn(4, 3)
    timed = []

    def timer(*a, **k):
        timed.append(1)
        return [1.0, 1.0, 1.0]

    out = bench.check_then_time(lambda: x + 0.1, lambda: x, 1e-2, timer=timer)
    assert "differs from cuDNN" in out["error"] and out["max_rel_err"] > 1e-2
    assert not timed and "tritonlstm_ms" not in out


def test_agreeing_cell_is_checked_then_timed(monkeypatch, tmp_path):
    import torch

    for fn in ("synchronize", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, fn, lambda: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: 0)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 2 ** 20)
    x = torch.randn(4, 3)
    times = iter([[0.5, 0.4, 0.6], [2.0, 1.9, 2.1]])
    out = bench.check_then_time(lambda: x, lambda: x, 1e-2, timer=lambda *a, **k: next(times))
    assert out["speedup"] == pytest.approx(4.0) and out["cudnn_peak_mb"] == 1.0 and "error" not in out
    assert "tritonlstm_host_ms" not in out  # (no host time with another timer, unless asked)

    # The host's time per call of each side, beside the GPU's, into results.json's "host" list (the rows keep their
    # keys): here ours spends 0.45 ms of its 0.5 on the host, a host-bound cell.
    times = iter([[0.5, 0.4, 0.6], [2.0, 1.9, 2.1]])
    host = iter([0.45, 0.1])
    out = bench.check_then_time(lambda: x, lambda: x, 1e-2, timer=lambda *a, **k: next(times),
                                host_timer=lambda fn, grad_to_none: next(host))
    assert (out["tritonlstm_host_ms"], out["cudnn_host_ms"]) == (0.45, 0.1)
    row = {**bench.cell_row(("float16", 256, 16, 256, 1, False, "fwd")), **out}
    bench.write_results(tmp_path, ENV, [row], heatmap=False)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["host"] == [{**{k: row[k] for k in bench.CELL_KEYS}, "tritonlstm_host_ms": 0.45,
                             "cudnn_host_ms": 0.1}]
    assert list(data["rows"][0]) == list(bench.ROW_KEYS)


def test_host_time_is_the_calls_queued_behind_a_sleep_kernel(monkeypatch):
    """bench.host_ms: the sleep holds the GPU, the calls are timed on the host alone, each with its gradients reset
    first (as do_bench's grad_to_none), and the device waited for after the clock stops."""
    import torch

    seen = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: seen.append("sync"))
    monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: seen.append(("sleep", cycles)))
    x = torch.zeros(2, requires_grad=True)
    x.grad = torch.ones(2)

    def call():
        seen.append(("call", x.grad))

    ms = bench.host_ms(call, [x], calls=3, sleep_cycles=7)
    assert ms >= 0 and seen == ["sync", ("sleep", 7), ("call", None), ("call", None), ("call", None), "sync"]


def test_training_cell_checks_every_gradient_before_timing(monkeypatch):
    """fwdbwd cells: the input's and every parameter's gradient against cuDNN's, not the output alone (run 7's
    tuner found a backward problem that agreed on y and was 0.18 off in dG)."""
    import torch

    for fn in ("synchronize", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, fn, lambda: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: 0)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 2 ** 20)
    x = torch.randn(5, requires_grad=True)
    w_ours, w_ref = torch.randn(5, requires_grad=True), None
    w_ref = w_ours.detach().clone().requires_grad_()

    def step(w, wrong_by=1.0):
        y = x * w
        (y * wrong_by).sum().backward()
        return y.detach()

    leaves = ([x, w_ours], [x, w_ref], 1e-2)
    timer = lambda *a, **k: [1.0, 1.0, 1.0]  # noqa: E731
    out = bench.check_then_time(lambda: step(w_ours), lambda: step(w_ref), 1e-2, grad_to_none=[x, w_ours, w_ref],
                                timer=timer, grads=leaves)
    assert "error" not in out and out["grad_rel_err"] == 0 and out["speedup"] == 1
    out = bench.check_then_time(lambda: step(w_ours, 1.5), lambda: step(w_ref), 1e-2,
                                grad_to_none=[x, w_ours, w_ref], timer=timer, grads=leaves)
    assert out["max_rel_err"] == 0 and "differs from cuDNN: rel err 5.00e-01" in out["error"]
    assert "speedup" not in out
    env = {"gpu": "GPU", "torch": "2", "triton": "3", "cudnn": "9", "date": "today"}
    md = bench.markdown_table(env, [{**bench.cell_row(("float32", 8, 1, 4, 1, False, "fwdbwd")), "tritonlstm_ms": 1.0,
                          "cudnn_ms": 2.0, "speedup": 2.0, "tritonlstm_peak_mb": 1, "cudnn_peak_mb": 2,
                          "max_rel_err": 1e-4, "grad_rel_err": 3e-4}])
    assert "| 1.0e-04 / 3.0e-04 |" in md


def test_barrier_failure_while_timed_is_an_error_not_a_time(monkeypatch):
    import torch

    from tritonlstm.kernels import lstm as kernels

    for fn in ("synchronize", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, fn, lambda: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: 0)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 2 ** 20)

    def timer(*a, **k):  # a launch inside the timing loop failed its barrier
        kernels.barrier_errors.flag(torch.device("cpu")).fill_(1)
        return [0.5, 0.4, 0.6]

    x = torch.randn(4, 3)
    out = bench.check_then_time(lambda: x, lambda: x, 1e-2, timer=timer)
    assert "barrier" in out["error"] and "speedup" not in out
    assert int(kernels.barrier_errors.flag(torch.device("cpu"))[0]) == 0


@pytest.mark.parametrize("script", ["kernel_ab", "floor_probe", "memory_probe", "gemm_probe", "launch_spread",
                                    "step_timeline"])
def test_perf_script_without_gpu_says_so_and_exits_0(script):
    proc = run_python(str(PERF / f"{script}.py"), timeout=120)
    assert proc.returncode == 0 and "no CUDA device" in proc.stdout, proc.stderr[-2000:]


NCU_SOURCE_CSV = """==PROF== Connected to process 1
"Address","Source","Warp Stall Sampling (All Samples)","Warp Stall Sampling (Not-issued Samples)"
"0x7f0","@P1 LDG.E.128.STRONG.GPU R40, desc[UR60][R26.64]","2","1"
"0x800","STS.128 [R38+0x8000], R40","60","58"
"0x810","UCGABAR_WAIT","30","30"
"0x820","MEMBAR.ALL.GPU","1,000","990"
"0x830","@!P1 BRA 0x1fb0","",""
"""


def test_ncu_source_report_ranks_instructions_and_opcodes_by_stall_samples(tmp_path):
    """perf/ncu_source.py on a made-up page of ncu's source CSV: the instructions by their share of the samples
    (thousands separators read, rows without a number skipped), then the shares by opcode; a file without the
    page's header says what it found instead."""
    ncu = _perf_script("ncu_source")
    rows, column = ncu.read_rows(NCU_SOURCE_CSV.splitlines())
    assert column == "Warp Stall Sampling (All Samples)" and len(rows) == 4
    text = ncu.report(rows, column)
    ranked = [line.split()[0] for line in text.splitlines()[3:7]]
    assert ranked == ["91.6%", "5.5%", "2.7%", "0.2%"], text
    assert "MEMBAR.ALL.GPU" in text.splitlines()[3] and "91.6%  MEMBAR" in text and "0.2%  LDG" in text
    assert ncu.opcode("@!P1 LDG.E.128.STRONG.GPU R4, desc[UR6][R10.64]") == "LDG"
    bad = tmp_path / "bad.csv"
    bad.write_text("==ERROR== something else\n")
    assert ncu.main([str(bad)]) == 1


def test_profile_one_script_takes_the_ab_variants_and_without_gpu_says_so():
    script = str(PERF / "profile_one.py")
    proc = run_python(script, "--kernel", "bwd", "--variant", "wide", "--batch", "256", timeout=120)
    assert proc.returncode == 0 and "no CUDA device" in proc.stdout
    proc = run_python(script, "--variant", "no-such-variant", timeout=120)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


def test_kernel_ab_variants_are_runnable_configs():
    """The A/B's variants: each a different config whose programs all fit the SMs, named as documented."""
    import torch

    ab = _perf_script("kernel_ab")
    for kernel in ("fwd", "bwd"):
        got = ab.variants(kernel, 1024, 256, torch.float16, 132, ab.VARIANTS)
        want = {"unsplit", "unsplit-w4", "unsplit-w2", "split", "split4", "split-bh8", "split-bb32", "streamed",
                "wide", "wide-bh32", "wide-bh64"}
        fwd_only = {"merged", "merged-w4", "transposed", "transposed-w8",
                    "transposed-streamed", "transposed-streamed-bb128",
                    "no-prefetch"}  # (the heuristic's pick there, bb128 since v0.38, prefetches)
        # The backward's transposed (reduce-scatter) variants only where every program owns one batch tile.
        assert set(got) == want | (fwd_only if kernel == "fwd" else {"grid-2d", "grid-2d-bb64"}), got
        assert [got[f"wide-bh{bh}"].block_h for bh in (32, 64)] == [32, 64]
        assert len(set(got.values())) == len(got)
        assert all(c.programs(1024) <= 132 for c in got.values())
        assert got["unsplit"].split_k == 1 and got["split"].split_k == 8 and got["split4"].split_k == 4
    assert set(ab.variants("fwd", 256, 16, torch.float32, 132, ["unsplit", "split-bb32"])) == {"unsplit"}
    t = ab.variants("fwd", 1024, 256, torch.float16, 132, ["transposed"])["transposed"]
    assert t.transposed and t.block_h == 16 and t.block_b == 16 and t.programs(1024) <= 132
    t = ab.variants("fwd", 512, 256, torch.float16, 132, ["transposed"])["transposed"]
    assert t.block_b == 64 and t.batch_groups == 4
    assert "transposed" not in ab.variants("fwd", 1024, 16, torch.float32, 132, ["transposed"])  # 256 KB of W^T
    w8 = ab.variants("fwd", 1024, 16, torch.float32, 132, ["transposed-half", "transposed-half-w8"])
    assert w8["transposed-half-w8"] == dataclasses.replace(w8["transposed-half"], num_warps=8)
    assert not ab.variants("fwd", 256, 16, torch.float16, 132, ["transposed-w8"])  # one chunk at 4 warps already
    g = ab.variants("bwd", 1024, 256, torch.float16, 132, ["grid-2d"])["grid-2d"]
    assert g.grid_2d and g.block_h == 128 and g.programs(1024) == 128
    assert not ab.variants("bwd", 1024, 256, torch.float32, 132, ["grid-2d"])  # a 128-unit fp32 block: 256 KB
    t = ab.variants("bwd", 512, 16, torch.float16, 132, ["transposed"])["transposed"]
    assert t.transposed and t.num_warps == 8 and t.batch_groups == 1
    t = ab.variants("fwd", 1024, 256, torch.float32, 132, ["transposed-streamed"])["transposed-streamed"]
    assert t.transposed and not t.w_resident and t.block_b == 64 and t.num_stages == 3 and t.programs(1024) <= 132
    for kernel in ("stack", "stack_bwd"):  # 4 layers share the SMs: 33 each
        got = ab.variants(kernel, 512, 16, torch.float16, 132, ab.VARIANTS, layers=4)
        want = {"unsplit", "unsplit-w4", "unsplit-w2", "split", "split4", "streamed"}  # no BH 8
        stack_fwd = {"transposed", "transposed-streamed"}
        assert set(got) == want | (stack_fwd if kernel == "stack" else set()), got
        assert len(set(got.values())) == len(got)
        assert all(c.programs(512) <= 33 for c in got.values())
        assert got["unsplit"].w_resident and not got["streamed"].w_resident
        assert not any(c.merged_gates for c in got.values())
    assert "transposed" not in ab.variants("stack", 512, 16, torch.float32, 132, ab.VARIANTS, layers=2)  # 256 KB


@pytest.mark.parametrize("layers,bidirectional", [(1, False), (2, False), (2, True)])
def test_cells_warm_up_under_compile_only_without_launching(layers, bidirectional, monkeypatch):
    """The bench compiles every cell's kernels first (warm_cell under compile_in_parallel): the module's forward
    and backward must go through with every launch replaced by a compile, whatever the unwritten outputs hold."""
    from tritonlstm.kernels import lstm as k

    launched = []
    monkeypatch.setattr(k.barrier_errors, "check", lambda *a, **kw: launched.append(1))
    with k.compile_only():
        bench.warm_cell("float32", 8, 2, 3, layers, bidirectional, "fwdbwd", device="cpu")
        bench.warm_cell("float16", 8, 2, 3, layers, bidirectional, "fwd", device="cpu")
    assert not launched  # no launch reached the pre-launch check


@pytest.mark.parametrize("mode", ["barrier", "none", "counter-ld", "cluster"])
def test_floor_probe_computes_its_recurrence(mode):
    """One program (the interpreter runs programs one after another): every exchange's y_t = 0.5 mean(y_{t-1}) +
    u_t against the PyTorch loop, and without the h read y = u."""
    import torch

    probe = _perf_script("floor_probe")
    u = torch.randn(5, 3, 13, dtype=torch.float16)
    y, err = probe.launcher(u, 16, 4, mode, True)()
    assert int(err[0]) == 0
    torch.testing.assert_close(y, probe.reference(u), rtol=2e-3, atol=2e-3)
    assert not torch.equal(y, u)  # the h read reached the output
    y, _ = probe.launcher(u, 16, 4, mode, False)()
    assert torch.equal(y, u)


@pytest.mark.parametrize("mode", ["barrier", "counter-ld", "cluster"])
def test_floor_probe_with_its_programs_at_once(mode, monkeypatch):
    """The probe as it runs on a GPU, 3 programs at once (tests/concurrency.py): each exchange must make every
    program's y_{t-1} visible before any reads it (the slowed program's outputs come late)."""
    import torch

    from concurrency import concurrent_programs
    from tritonlstm.kernels import lstm

    probe = _perf_script("floor_probe")
    u = torch.randn(5, 3, 48, dtype=torch.float16)
    with concurrent_programs(5):
        # The probe's own name for the kernels' cluster barrier, which the harness replaces by a barrier of threads.
        monkeypatch.setattr(probe, "_cluster_barrier", lstm._cluster_barrier)
        y, err = probe.launcher(u, 16, 4, mode, True)()
    assert int(err[0]) == 0
    torch.testing.assert_close(y, probe.reference(u), rtol=2e-3, atol=2e-3)


# A script (argv[1]: perf/floor_probe.py) that compiles the probe's cluster mode for sm_90, fp16, 4 warps.
CLUSTER_PTX = """
import importlib.util, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
spec = importlib.util.spec_from_file_location("floor_probe", sys.argv[1])
probe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(probe)
sig = dict(U="*fp16", Y="*fp16", SYNC="*i32", ERR="*i32", T="i32", B="i32", H="i32", max_spin="i32", BB="constexpr",
           BH="constexpr", BK="constexpr", MODE="constexpr", LOAD_H="constexpr")
consts = dict(BB=16, BH=16, BK=256, MODE=probe.MODES["cluster"], LOAD_H=True)
c = triton.compile(ASTSource(fn=probe.floor_probe_kernel, signature=sig, constexprs=consts),
                   target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
ptx = c.asm["ptx"]
print(c.metadata.num_ctas, len(c.asm["cubin"]) > 0, "barrier.cluster.arrive.release" in ptx,
      "barrier.cluster.wait.acquire" in ptx, "%ctaid.x" in ptx, "%clusterid" in ptx or "%cluster_ctaid" in ptx)
"""


def test_floor_probe_cluster_mode_compiles_for_sm90_with_one_program_a_cta():
    """The cluster exchange (perf/NOTES.md v0.34): ptxas takes the cluster barrier, and the build has num_ctas = 1
    with tl.program_id(0) read from %ctaid.x, which is what launch_as_cluster relies on: launched as a cluster, each
    CTA is still its own program."""
    proc = run_python("-c", CLUSTER_PTX, str(PERF / "floor_probe.py"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["1", "True", "True", "True", "True", "False"], proc.stdout


def test_memory_probe_records_the_tensors_alive_at_a_training_steps_peak():
    """perf/memory_probe.py's recorder, on the CPU interpreter: a training step's peak holds the gates buffer
    (gx, written over) and c_t in float32, and nothing of the inputs that existed before it."""
    import torch

    from tritonlstm import LSTM

    T, B, H = 5, 3, 8
    model = LSTM(H, H, backend="triton")
    x = torch.randn(T, B, H, requires_grad=True)
    before = {t.untyped_storage().data_ptr() for t in (x, *model.parameters())}
    with _perf_script("memory_probe")._recorder()(before, device_type="cpu") as rec:
        y, _ = model(x)
        y.backward(torch.ones_like(y))
    shapes = {(e[1], e[2]) for e in rec.at_peak.values()}
    assert ((T * B, 4 * H), "float32") in shapes and ((T, B, H), "float32") in shapes
    assert rec.peak >= (16 + 4) * T * B * H and not before & set(rec.at_peak)
    assert rec.bytes < rec.peak  # the step's temporaries were freed and counted out


def test_perf_scripts_rows_file_names_the_gpu(tmp_path, monkeypatch):
    """bench.write_rows_json, the --json file of perf/kernel_ab.py and the probes: GPU name and rows so far."""
    import torch

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    path = tmp_path / "rows.json"
    bench.write_rows_json(path, [{"hidden": 512, "ms": 1.5}])
    bench.write_rows_json(path, [{"hidden": 512, "ms": 1.5}, {"hidden": 1024, "ms": 2.5}])
    assert json.loads(path.read_text()) == {"gpu": "NVIDIA H100 80GB HBM3",
                                            "rows": [{"hidden": 512, "ms": 1.5}, {"hidden": 1024, "ms": 2.5}]}


def test_memory_probe_replays_the_allocator_trace_to_its_peak():
    """perf/memory_probe.py's peak_from_trace on a synthetic caching-allocator trace: the peak counts allocs
    until their free_completed (not free_requested), and names each block by its tritonlstm frame and any BLAS or
    workspace C++ frame."""
    ours = [{"filename": "/x/tritonlstm/functional.py", "line": 7, "name": "_backward"}]
    blas = ours + [{"filename": "??", "line": 0, "name": "at::cuda::getCUDABlasLtWorkspace()"}]
    events = [
        {"action": "alloc", "addr": 1, "size": 100, "frames": ours},
        {"action": "alloc", "addr": 2, "size": 50, "frames": blas},
        {"action": "free_requested", "addr": 1, "size": 100},
        {"action": "alloc", "addr": 3, "size": 30, "frames": []},
        {"action": "free_completed", "addr": 1, "size": 100},
        {"action": "free_completed", "addr": 2, "size": 50},
        {"action": "alloc", "addr": 4, "size": 10, "frames": []},
    ]
    peak, blocks = _perf_script("memory_probe").peak_from_trace(events)
    assert peak == 180
    assert blocks == [(100, "functional.py:7 _backward"),
                      (50, "functional.py:7 _backward [at::cuda::getCUDABlasLtWorkspace()]"), (30, "?")]


def test_launch_spread_levels_compute_the_same_layer():
    """Its six levels (the tuner's kernel call on its own random inputs aside) agree with nn.LSTM, on the
    interpreter: the probe's calls are the library's as they are, so a GPU run spends no time on a broken one."""
    import torch

    calls = _perf_script("launch_spread").levels("float32", 8, 2, 3, device="cpu")
    assert list(calls) == ["kernel", "op", "lean", "layer", "module", "cudnn"]
    with torch.no_grad():
        want = calls["cudnn"]()
        for name in ("op", "lean", "layer", "module"):
            torch.testing.assert_close(calls[name](), want, rtol=1e-5, atol=1e-5)
        assert calls["kernel"]().shape == want.shape


def test_launch_spread_cells_and_percentiles():
    spread = _perf_script("launch_spread")
    assert spread.parse_cells("float16:256:16,bfloat16:512:1") == [("float16", 256, 16), ("bfloat16", 512, 1)]
    for bad in ("float64:256:16", "float16:256", "float16:0:16", "float16:a:16"):
        with pytest.raises(argparse.ArgumentTypeError, match="dtype:H:B"):
            spread.parse_cells(bad)
    got = spread.percentiles([float(v) for v in range(10, -1, -1)])
    assert got == {"min": 0.0, "q20": 2.0, "median": 5.0, "q80": 8.0, "max": 10.0}


def test_step_timeline_splits_calls_into_kernels_and_gaps():
    timeline = _perf_script("step_timeline")
    trace = {"traceEvents": [
        {"cat": "user_annotation", "name": "call0", "ts": 0, "dur": 50},
        {"cat": "user_annotation", "name": "call1", "ts": 1000, "dur": 50},
        {"cat": "kernel", "name": "gemm", "ts": 20, "dur": 30},
        {"cat": "gpu_memset", "name": "Memset", "ts": 52, "dur": 1},
        {"cat": "kernel", "name": "lstm_fwd_kernel", "ts": 300, "dur": 600},  # after a 247 us gap
        {"cat": "cpu_op", "name": "aten::mm", "ts": 10, "dur": 5},  # host side: not a device event
        {"cat": "kernel", "name": "lstm_fwd_kernel", "ts": 1010, "dur": 600},
    ]}
    events = timeline.device_events(trace)
    assert [e["name"] for e in events] == ["gemm", "Memset", "lstm_fwd_kernel", "lstm_fwd_kernel"]
    calls = timeline.split_calls(events, [(0.0, 50.0), (1000.0, 50.0)])
    assert [len(c) for c in calls] == [3, 1]
    first = timeline.summarise(calls[0])
    assert first["span_us"] == 880 and first["busy_us"] == 631 and first["gaps_us"] == 247
    assert first["gaps"] == [{"us": 247, "after": "Memset", "before": "lstm_fwd_kernel"}]
    assert timeline.summarise(calls[1])["gaps"] == [] and timeline.summarise([])["span_us"] == 0


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd", "cell"])
def test_step_timeline_calls_run_ours_against_torch(mode):
    """The timeline's calls on the interpreter: ours (the Triton kernels) and torch's module give the same output,
    so a GPU run profiles working calls."""
    import torch

    calls = _perf_script("step_timeline").make_calls("float32", 8, 2, 3, mode, device="cpu")
    assert list(calls) == ["tritonlstm", "cudnn"]
    torch.testing.assert_close(calls["tritonlstm"]().detach(), calls["cudnn"]().detach(), rtol=1e-5, atol=1e-5)


def test_step_timeline_host_profile_writes_where_our_calls_spend_host_time(monkeypatch, tmp_path):
    """--host-profile: the calls of ours run under cProfile behind a sleep kernel (stubbed here, as the sync after
    it), and the functions by own and by cumulative time go to a text file."""
    import torch

    from tritonlstm import functional

    monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: None)
    monkeypatch.setattr(functional, "synchronize", lambda device=None: None)
    timeline = _perf_script("step_timeline")
    calls = timeline.make_calls("float32", 8, 2, 3, "fwd", device="cpu")
    path = tmp_path / "prof" / "hostprof.txt"
    timeline.host_profile(calls["tritonlstm"], path, calls=3)
    text = path.read_text()
    assert text.startswith("3 calls") and "Ordered by: internal time" in text and "Ordered by: cumulative" in text
    assert "lstm_layer" in text


def test_host_time_through_tritons_launch_path_launches_the_kernel_every_call(monkeypatch):
    """perf/host_time.py with LAUNCH=triton times Triton's own launch path (the kernel compiled for sm_90, launched
    onto a stand-in driver), not a stub: one forward launch per LSTMCell step, two for a training step (the
    backward's bias sum is ATen's at these sizes); a float32 stack's forward on float16 operands two (v0.35: the
    operands' kernel, then the wavefront). REF=1 adds torch.nn's time for the same call."""
    monkeypatch.setenv("LAUNCH", "triton")
    monkeypatch.setenv("REF", "1")
    proc = run_python(str(PERF / "host_time.py"), "cell", "cell_train", "stack_fp32", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(line.split(": ", 1) for line in proc.stdout.splitlines() if ": " in line)
    assert "(1 Triton launches a call); torch.nn: " in lines["cell"], proc.stdout
    assert "(2 Triton launches a call); torch.nn: " in lines["cell_train"], proc.stdout
    assert "(2 Triton launches a call); torch.nn: " in lines["stack_fp32"], proc.stdout


def test_merge_tuned_takes_winners_by_the_margin_and_leaves_the_rest(tmp_path, monkeypatch, capsys):
    """perf/merge_tuned.py: a key takes the log's best where it beat the config that ran by more than the margin;
    a key within the margin, and one whose best already ships, keep the shipped config; other keys stay."""
    import torch

    from tritonlstm import configs, tuning

    merge = _perf_script("merge_tuned")
    gpu = "NVIDIA H100 80GB HBM3"
    shipped = tmp_path / "shipped.json"
    monkeypatch.setattr(merge, "shipped_path", lambda name: shipped)
    a, b, c = (configs.heuristic_config(256, 16, torch.float16, 132, kernel="bwd", measured=False),
               configs.named_variants("bwd", 256, 16, torch.float16, 132)["transposed"],
               configs.named_variants("bwd", 256, 16, torch.float16, 132)["split"])
    tuning.write_configs(shipped, gpu, {"k-win": a, "k-close": a, "k-ships": b, "k-other": a}, "3.6.0")

    def entry(key, best, best_ms, current_ms):
        return {"key": key, "best": dataclasses.asdict(best), "best_ms": best_ms, "current_ms": current_ms}

    log = tmp_path / "tune-log.json"
    log.write_text(json.dumps({"gpu": gpu, "triton": "3.6.0", "keys": [
        entry("k-win", b, 0.90, 1.0), entry("k-close", c, 0.99, 1.0), entry("k-ships", b, 0.5, 0.5)]}))
    assert merge.main([str(log)]) == 0
    got = tuning.read_configs(shipped, gpu, None)
    assert got == {"k-win": b, "k-close": a, "k-ships": b, "k-other": a}
    out = capsys.readouterr().out
    assert "k-close" in out and "kept" in out and "already ships" in out and "1 keys written" in out


def test_merge_tuned_gives_a_sibling_gpu_a_file_from_its_siblings_configs(tmp_path, monkeypatch):
    """An H200's tuner log (it ran the H100's shipped configs): its new file holds the H100's keys and the winner,
    and the H100's file is untouched."""
    import torch

    from tritonlstm import configs, tuning

    merge = _perf_script("merge_tuned")
    h100, h200 = "NVIDIA H100 80GB HBM3", "NVIDIA H200"
    path = lambda name: tmp_path / f"{tuning.gpu_slug(name)}.json"  # noqa: E731
    monkeypatch.setattr(merge, "shipped_path", path)
    monkeypatch.setattr(tuning, "shipped_path", path)
    monkeypatch.setattr(tuning, "_loaded", {})
    a, b = (configs.heuristic_config(256, 16, torch.float16, 132, kernel="bwd", measured=False),
            configs.named_variants("bwd", 256, 16, torch.float16, 132)["transposed"])
    tuning.write_configs(path(h100), h100, {"k-win": a, "k-other": a}, "3.6.0")
    log = tmp_path / "tune-log.json"
    log.write_text(json.dumps({"gpu": h200, "triton": "3.6.0", "keys": [
        {"key": "k-win", "best": dataclasses.asdict(b), "best_ms": 0.5, "current_ms": 1.0}]}))
    assert merge.main([str(log)]) == 0
    assert tuning.read_configs(path(h200), h200, None) == {"k-win": b, "k-other": a}
    assert tuning.read_configs(path(h100), h100, None) == {"k-win": a, "k-other": a}


def test_host_time_stub_mode_runs_every_case(monkeypatch):
    """perf/host_time.py's default mode (launches stubbed) runs each case, stack_fp32 included: its H100 config's 8
    programs are not refused by the interpreter's one-program rule, since nothing launches."""
    monkeypatch.delenv("LAUNCH", raising=False)
    proc = run_python(str(PERF / "host_time.py"), "stack_fp32", "cell", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [line.split(":")[0] for line in proc.stdout.splitlines()] == ["stack_fp32", "cell"], proc.stdout


def test_host_time_ab_mode_times_two_checkouts_in_alternating_processes(monkeypatch):
    """perf/host_time.py with AB=<other checkout>: each side in its own processes, the least time of each case,
    and the change (here the checkout against itself, one round, launches stubbed)."""
    monkeypatch.setenv("AB", str(PERF.parent))
    monkeypatch.setenv("ROUNDS", "1")
    monkeypatch.delenv("LAUNCH", raising=False)
    proc = run_python(str(PERF / "host_time.py"), "cell", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    header, row = proc.stdout.strip().splitlines()[-2:]
    assert header.split()[:3] == ["case", "this", "other"] and "least of 1 rounds" in header
    name, this, other, change, percent = row.split()
    assert name == "cell" and float(this) > 0 and float(other) > 0 and percent == "%", row


def test_kernel_ab_switches_name_the_kernels_module_flags():
    """Each A/B of perf/kernel_ab.py sets flags of tritonlstm.kernels.lstm by name (setattr would create a misspelt
    one silently, and the "A/B" would time the same code twice): every switch names an existing flag. --qc-ab times
    the reduce-scatter backward variants again with 16 shares a load across threads, as before v0.67; --prefetch-ab
    the prefetching variants arriving early, and the 16-bit prefetching cluster ones widened at the load (v0.68);
    --bulk-ab the 16-bit transposed cluster forwards with the bulk exchange (v0.69); --bias-ab the one-group persistent
    backwards summing the bias gradients in their loop (v0.73)."""
    import torch

    from tritonlstm.kernels import lstm as k

    ab = _perf_script("kernel_ab")
    bwd = ab.variants("bwd", 256, 16, torch.float16, 132, ["unsplit", "split4", "transposed", "transposed-cluster"])
    runs = ab.timed_runs("bwd", torch.float16, bwd, pairs_ab=True, qc_ab=True)
    names = [name for name, _, _ in runs]
    assert [n for n in names if n.endswith("/qc16")] == [f"{n}/qc16" for n, c in bwd.items() if c.transposed]
    assert any(n.endswith("/qc16") for n in names) and any(n.endswith("/unpaired") for n in names), names
    fwd32 = ab.variants("fwd", 1024, 16, torch.float32, 132, ["transposed-half"])
    bwd32 = ab.variants("bwd", 1024, 256, torch.float32, 132, ["grid-2d-half"])
    runs += ab.timed_runs("fwd", torch.float32, fwd32, half_h_ab=True)
    runs += ab.timed_runs("bwd", torch.float32, bwd32, half_g_ab=True)
    prefetch = ab.timed_runs("bwd", torch.float16, bwd, prefetch_ab=True)
    assert [n for n, _, _ in prefetch if n.endswith("/early")] == [f"{n}/early" for n in bwd], prefetch
    assert "transposed-cluster/widened" in [n for n, _, _ in prefetch], prefetch
    runs += prefetch
    fwd = ab.variants("fwd", 256, 16, torch.float16, 132, ["transposed", "transposed-cluster", "cluster"])
    assert not any(n.endswith("/bulk") for n, _, _ in ab.timed_runs("fwd", torch.float16, fwd, prefetch_ab=True))
    bulk = [n for n, _, _ in ab.timed_runs("fwd", torch.float16, fwd, bulk_ab=True)]
    assert [n for n in bulk if n.endswith("/bulk")] == ["transposed-cluster/bulk"], bulk
    assert not any(n.endswith("/bulk") for n, _, _ in ab.timed_runs("fwd", torch.float32, fwd, bulk_ab=True))
    runs += ab.timed_runs("fwd", torch.float16, fwd, bulk_ab=True)
    bias = [n for n, _, _ in ab.timed_runs("bwd", torch.float16, bwd, bias_ab=True)]
    assert [n for n in bias if n.endswith("/bias")] == [f"{n}/bias" for n, c in bwd.items()
                                                         if c.persistent and c.batch_groups == 1], bias
    assert any(n.endswith("/bias") for n in bias) and not ab.timed_runs("fwd", torch.float16, fwd, bias_ab=True)[3:]
    runs += ab.timed_runs("bwd", torch.float16, bwd, bias_ab=True)
    switches = {flag for _, _, s in runs for flag in s}
    assert switches == {"SPLIT_PAIRS", "REDUCE_SCATTER_IN_REGISTERS", "REDUCE_SCATTER_LOAD", "HALF_H", "HALF_G",
                        "ARRIVE_EARLY", "PREFETCH_AS_LOADED", "BULK_H", "BIAS_IN_KERNEL"}
    assert all(hasattr(k, flag) for flag in switches), switches


def test_host_ops_times_every_case_through_the_kernels(tmp_path, monkeypatch):
    """perf/host_ops.py (the next GPU session's check of v0.70's premise: the host's cost of a launching op) runs
    every case on this CPU, the LSTM ones through the Triton kernels (interpreted), and writes them all."""
    from tritonlstm.kernels import lstm as kernels

    launched = []
    real = kernels._run
    monkeypatch.setattr(kernels, "_run", lambda *a, **k: (launched.append(a[0].fn.__name__), real(*a, **k))[1])
    host_ops = _perf_script("host_ops")
    path = tmp_path / "ops.json"
    rows = host_ops.main(["--hidden", "8", "--batch", "2", "--seq", "2", "--dtype", "float32", "--calls", "2",
                          "--repeats", "1", "--json", str(path), "--cpu"])
    saved = json.loads(path.read_text())
    assert saved["rows"] == rows and saved["device"] == "cpu"
    assert [r["case"] for r in rows] == list(host_ops.cases(8, 2, 2, torch.float32, torch.device("cpu")))
    assert all(0 < r["host_us"] < 1e7 for r in rows), rows
    assert "lstm_fwd_kernel" in launched and "lstm_bwd_kernel" in launched


def test_host_ops_without_a_gpu_says_so_unless_asked_for_the_cpu(capsys):
    """Its default shapes take hours on the CPU interpreter: without a GPU and without --cpu it stops at once."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is there: host_ops times on it")
    assert _perf_script("host_ops").main(["--json", "unused.json"]) == []
    assert "no CUDA device" in capsys.readouterr().out
