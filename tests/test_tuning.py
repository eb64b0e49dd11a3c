"""Autotuning without a GPU: the cache (round trip, atomic write, bad files), selection order, bucketing,
candidate filtering with compile-only figures, the CLI."""

from __future__ import annotations

import dataclasses
import json
import os
import warnings

import pytest
import torch

from helpers import run_python
from tritonlstm import configs, tuning
from tritonlstm.configs import LSTMConfig, use_config

GPU = "NVIDIA H100 80GB HBM3"
CFG = LSTMConfig(block_h=16, block_b=32, block_k=512, w_resident=True, batch_groups=2, num_warps=8)
OTHER = LSTMConfig(block_h=8, block_b=16, block_k=512, w_resident=True, batch_groups=4, num_warps=4)


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITONLSTM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(tuning, "_loaded", {})
    monkeypatch.setattr(tuning, "_warned", set())
    monkeypatch.setattr(tuning, "shipped_path", lambda gpu: tmp_path / "shipped" / f"{tuning.gpu_slug(gpu)}.json")
    tuning._lookup_paths.cache_clear()
    yield tmp_path / "cache"
    tuning._lookup_paths.cache_clear()


def test_a_sibling_gpu_runs_the_shipped_configs_until_its_own_file_ships():
    """An H200 has no shipped file of its own: it runs the H100's (same SMs, same shared memory), named as such;
    its own file, once shipped, takes over; a GPU without a sibling stays on the heuristic."""
    key = "fwd|float16|H512|B16|D1"
    h200 = "NVIDIA H200"
    assert tuning.SHIPPED_SIBLINGS[h200] == GPU
    tuning.write_configs(tuning.shipped_path(GPU), GPU, {key: OTHER}, triton_version="3.6.0")
    assert tuning.lookup_in(h200, key) == (OTHER, f"shipped:{GPU}")
    assert tuning.lookup_in("NVIDIA A100-SXM4-80GB", key) == (None, "heuristic")
    tuning.write_configs(tuning.shipped_path(h200), h200, {key: CFG}, triton_version="3.6.0")
    tuning._lookup_paths.cache_clear()
    tuning._loaded.clear()
    assert tuning.lookup_in(h200, key) == (CFG, "shipped")
    tuning.write_configs(tuning.cache_path(h200), h200, {key: OTHER})
    assert tuning.lookup_in(h200, key) == (OTHER, "cache")


def test_key_buckets_batch_to_power_of_two():
    assert tuning.config_key("fwd", torch.float16, 512, 17, 1) == "fwd|float16|H512|B32|D1"
    assert tuning.config_key("bwd", torch.bfloat16, 1000, 16, 2) == "bwd|bfloat16|H1000|B16|D2"
    assert tuning.config_key("fwd", torch.float32, 8, 1, 1).endswith("|B1|D1")
    assert tuning.config_key("fwd", torch.float32, 8, 33, 1) == tuning.config_key("fwd", torch.float32, 8, 64, 1)


def test_cache_path_per_gpu_and_triton_version(cache_dir):
    p = tuning.cache_path(GPU, "3.6.0")
    assert p == cache_dir / "nvidia-h100-80gb-hbm3-triton3.6.0.json"


def test_round_trip_and_merge(cache_dir):
    path = tuning.cache_path(GPU)
    tuning.write_configs(path, GPU, {"fwd|float16|H512|B16|D1": CFG})
    tuning.write_configs(path, GPU, {"bwd|float16|H512|B16|D1": OTHER})
    got = tuning.read_configs(path, GPU, tuning._triton_version())
    assert got == {"fwd|float16|H512|B16|D1": CFG, "bwd|float16|H512|B16|D1": OTHER}
    assert not [f for f in os.listdir(cache_dir) if f.endswith(".tmp")]


def test_write_is_atomic(cache_dir, monkeypatch):
    path = tuning.cache_path(GPU)
    tuning.write_configs(path, GPU, {"fwd|float16|H512|B16|D1": CFG})
    before = path.read_text()

    def crash(obj, f, **kw):
        f.write('{"format": 1, "gpu": "half a fi')
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(tuning.json, "dump", crash)
    with pytest.raises(KeyboardInterrupt):
        tuning.write_configs(path, GPU, {"bwd|float16|H512|B16|D1": OTHER})
    assert path.read_text() == before
    assert os.listdir(cache_dir) == [path.name]


@pytest.mark.parametrize("content,why", [
    ("{not json", "JSONDecodeError"),
    (json.dumps({"format": 0, "gpu": GPU, "triton": "3.6.0", "configs": {}}), "stale"),
    (json.dumps({"format": 1, "gpu": "NVIDIA A100", "triton": "3.6.0", "configs": {}}), "written for GPU"),
    (json.dumps({"format": 1, "gpu": GPU, "triton": "2.0.0", "configs": {}}), "written for triton"),
    (json.dumps({"format": 1, "gpu": GPU, "triton": "3.6.0", "configs": {"k": {"block_h": 3}}}), "TypeError"),
], ids=["corrupt", "stale-format", "foreign-gpu", "foreign-triton", "bad-entry"])
def test_bad_files_warn_once_and_are_ignored(content, why):
    path = tuning.cache_path(GPU, "3.6.0")
    path.parent.mkdir(parents=True)
    path.write_text(content)
    with pytest.warns(RuntimeWarning, match=why):
        assert tuning.read_configs(path, GPU, "3.6.0") == {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tuning.read_configs(path, GPU, "3.6.0") == {}  # once only


def test_selection_order_cache_then_shipped_then_heuristic(monkeypatch):
    key = "fwd|float16|H512|B16|D1"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: GPU)
    assert tuning.lookup_in(GPU, key) == (None, "heuristic")
    assert tuning.lookup("fwd", 512, 16, torch.float16, 1, torch.device("cpu")) is None
    tuning.write_configs(tuning.shipped_path(GPU), GPU, {key: OTHER}, triton_version="3.0.0")
    tuning._loaded.clear()
    assert tuning.lookup_in(GPU, key) == (OTHER, "shipped")  # shipped files hold for any triton version
    tuning.write_configs(tuning.cache_path(GPU), GPU, {key: CFG})
    assert tuning.lookup_in(GPU, key) == (CFG, "cache")
    assert tuning.lookup("fwd", 512, 9, torch.float16, 1, torch.device("cpu")) == CFG  # 9 -> bucket 16
    assert tuning.lookup("fwd", 512, 17, torch.float16, 1, torch.device("cpu")) is None
    with use_config(OTHER, kernel="fwd"):
        assert configs.select_config(512, 16, torch.float16, torch.device("cpu"), True, "fwd") == OTHER
        assert configs.select_config(512, 16, torch.float16, torch.device("cpu"), True, "bwd") != OTHER


def test_corrupt_cache_never_breaks_a_lookup(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: GPU)
    path = tuning.cache_path(GPU)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x00\xff garbage")
    with pytest.warns(RuntimeWarning):
        assert tuning.lookup("bwd", 256, 4, torch.bfloat16, 2, torch.device("cpu")) is None


def test_candidates_respect_residency_and_shared_memory():
    cands = tuning.candidates(1024, 256, torch.float16, num_sms=132, smem_limit=232448)
    assert cands[0] == configs.heuristic_config(1024, 256, torch.float16, 132)
    for c in cands:
        assert c.programs(1024) <= 132
        if c.w_resident:
            assert (4 * c.block_k * c.block_h + c.block_b * c.block_k) * 2 <= 232448
    few = tuning.candidates(1024, 16, torch.float16, num_sms=8, smem_limit=232448)
    assert all(c.programs(1024) <= 8 for c in few[1:]) and all(not c.w_resident for c in few[1:])
    assert all(c.block_b == 16 for c in tuning.candidates(512, 3, torch.float32, 132, 232448))


@pytest.mark.parametrize("kernel", ["fwd", "bwd"])
def test_quick_candidates_are_the_heuristic_and_named_variants(kernel):
    for H, B, dtype in ((256, 16, torch.float16), (1024, 256, torch.float16), (1024, 16, torch.float32)):
        quick = tuning.quick_candidates(H, B, dtype, 132, kernel)
        pick = configs.heuristic_config(H, B, dtype, 132, kernel=kernel)
        assert next(iter(quick)) == pick and next(iter(quick.values())).startswith("heuristic")
        named = configs.named_variants(kernel, H, B, dtype, 132)
        for cfg, name in list(quick.items())[1:]:
            assert name in tuning.QUICK_VARIANTS and named[name] == cfg and cfg.programs(H) <= 132
        assert {c.exchange for c in quick} <= {"barrier", "cluster"}
        # The backward's reduce-scatter (v0.24) only where every program owns one batch tile; 8 warps.
        assert any(c.transposed for c in quick) == (kernel == "fwd" or B <= 16)
        if kernel == "bwd":
            assert all(c.num_warps == 8 and c.block_b == 16 for c in quick if c.transposed)
            fits = dtype.itemsize * 64 * H <= 128 * 1024
            # ... and with the cluster barrier (v0.34) where its 16-unit tiles make at most 16 programs.
            assert {n.removeprefix("heuristic=") for c, n in quick.items() if c.transposed} == (
                set() if B > 16 else {"transposed", "transposed-streamed"} |
                ({"transposed-cluster"} if H <= 256 else set()) if fits else {"transposed-streamed"})
        if kernel == "fwd" and H == 1024 and B == 16:  # v0.64's 8-warp tiles are searched where they apply
            assert ("transposed-half-w8" if dtype == torch.float32 else "transposed-w8") in {
                n.removeprefix("heuristic=") for n in quick.values()}
        assert 5 <= len(quick) <= len(tuning.QUICK_VARIANTS) + 1


def test_cluster_variants_only_at_cluster_sizes_the_launcher_can_launch():
    """Triton 3.6's launcher allows a non-portable cluster (9-16 CTAs) for exactly 16: the cluster variants
    (v0.34) exist only where a barrier's programs number at most 8, or 16."""
    sizes = set()
    for H in range(17, 1100, 7):
        for kernel in ("fwd", "bwd"):
            for name, cfg in configs.named_variants(kernel, H, 16, torch.float16, 132,
                                                    ("cluster", "transposed-cluster")).items():
                p = cfg.programs(H) // cfg.batch_groups
                assert configs.cluster_size_ok(p) and (p <= 8 or p == 16), (kernel, H, name, cfg)
                sizes.add(p)
    assert {16, 8} <= sizes and not sizes & set(range(9, 16))


def test_a_resident_w_whose_block_k_misses_part_of_h_is_refused_at_launch(monkeypatch):
    """Run 7: the tuner ran a forward on a backward key's grid_2d default (fp32 H = 512 B = 256: W resident, block_k
    64, which the 2-D grid reads as its unit block). The forward read W's first 64 columns of 512 and stored wrong
    gates, so every candidate of that key "failed" against the reference. The same from any config that keeps W
    resident with block_k < H (checked on the interpreter: y off by 0.42 at H = 128, block_k = 64). Now every
    launcher refuses it, naming block_k and H; the other kernels run a grid_2d config as its tiles
    (configs.for_kernel); and the tuner's backward problems take the forward's own pick."""
    from tritonlstm.kernels import lstm as k

    grid = configs.grid_2d_config(512, 256, 4, 132)
    assert grid.grid_2d and grid.w_resident and grid.block_k < 512
    assert configs.for_kernel(grid, "bwd") == grid
    assert all(configs.for_kernel(grid, kn) == dataclasses.replace(grid, grid_2d=False)
               for kn in ("fwd", "stack", "stack_bwd"))
    T, B, H = 2, 3, 128
    short = LSTMConfig(block_h=16, block_b=16, block_k=64, w_resident=True, persistent=False)
    gx, w, bias = torch.zeros(T, B, 4 * H), torch.zeros(1, 4 * H, H), torch.zeros(1, 4 * H)
    h0, c0 = torch.zeros(1, B, H), torch.zeros(1, B, H)
    gates, c_all, dy = torch.zeros(T, B, 4 * H), torch.zeros(T, B, H), torch.zeros(T, B, H)
    launches = {
        "fwd": lambda cfg: k.lstm_forward(gx, w, bias, h0, c0, None, reverse=False, store_gates=True, config=cfg),
        "stack": lambda cfg: k.lstm_stack_forward(gx, w[:0], w, bias, h0, c0, None, store_gates=True, config=cfg),
        "bwd": lambda cfg: k.lstm_backward(gates, c_all, c0, w, dy, h0, c0, None, reverse=False, config=cfg),
        "stack_bwd": lambda cfg: k.lstm_stack_backward(gates[None], c_all[None], c0, w[:0], w, dy[None], h0, c0,
                                                      None, config=cfg),
    }
    for kernel, launch in launches.items():
        with pytest.raises(ValueError, match=r"w_resident=True .* block_k must be >= H = 128, got block_k=64"):
            launch(short)
    with pytest.raises(ValueError, match="block_k must be >= H = 128"):  # the tuner's problem, as run 7 built it
        tuning.make_problem("bwd", torch.float32, H, B, T, device="cpu", base=configs.grid_2d_config(H, 64, 4, 132))
    # A cache holding such a config for the key (hand-edited): ignored with a warning, never a failed forward.
    key = tuning.config_key("fwd", torch.float32, H, B, 1)
    tuning.write_configs(tuning.cache_path(GPU), GPU, {key: short})
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: GPU)
    with pytest.warns(RuntimeWarning, match="w_resident with block_k=64 < H=128"):
        assert tuning.lookup("fwd", H, B, torch.float32, 1, torch.device("cpu")) is None


def test_config_refuses_what_the_kernels_cannot_run():
    for kw, what in ((dict(split_k=3), "power of two"), (dict(block_k=32, split_k=4), "block_k // split_k"),
                     (dict(merged_gates=True, split_k=2), "merged_gates"),
                     (dict(transposed=True, block_h=64), "transposed"),
                     (dict(transposed=True, block_h=8), "transposed"),
                     (dict(transposed=True, split_k=2), "transposed"),
                     (dict(exchange="flags"), "exchange must be one of")):
        with pytest.raises(ValueError, match=what):
            LSTMConfig(**{"block_h": 16, "block_b": 16, "block_k": 64, "w_resident": True, **kw})
    # 16 or 32 units a program (the forward's 128-gate-row tiles, v0.34; the backward's reduce-scatter refuses 32).
    assert LSTMConfig(block_h=32, block_b=16, block_k=64, w_resident=True, transposed=True).block_h == 32
    merged = LSTMConfig(block_h=16, block_b=16, block_k=256, w_resident=True, num_warps=8, merged_gates=True)
    assert configs.with_split_k(merged) == merged
    assert configs.with_split_k(dataclasses.replace(merged, merged_gates=False)).split_k == 8
    transposed = dataclasses.replace(merged, merged_gates=False, transposed=True, num_warps=4)
    assert configs.with_split_k(transposed) == transposed


def test_fits_uses_compile_only_figures():
    class Res:
        def __init__(self, shared, spills, error=None):
            self.shared, self.spill_bytes, self.error = shared, spills, error

    assert tuning.fits("fwd", torch.float16, 64, CFG, 232448, check=lambda *a, **k: Res(1000, 0))
    assert tuning.fits("fwd", torch.float16, 64, CFG, 232448, check=lambda *a, **k: Res(1000, 8))  # timing decides
    assert not tuning.fits("fwd", torch.float16, 64, CFG, 232448, check=lambda *a, **k: Res(1000, 4096))
    assert not tuning.fits("fwd", torch.float16, 64, CFG, 232448, check=lambda *a, **k: Res(300000, 0))
    assert not tuning.fits("fwd", torch.float16, 64, CFG, 232448, check=lambda *a, **k: Res(0, 0, "error"))
    # Compiled for the tuning GPU's architecture, judged by its shared memory (an RTX 4090: sm_89, 99 KB).
    targets = []
    assert not tuning.fits("fwd", torch.float16, 64, CFG, 101376, arch=89,
                           check=lambda *a, target: targets.append(target) or Res(135168, 0))
    assert (targets[0].arch, targets[0].smem) == (89, 101376)


def test_fits_with_the_real_compile_check():
    """A config on which ptxas gives up (fp16 backward, K = 1024 split 4 ways on 4 warps at H = 1000: 32
    registers, 30 KB of spills; at H = 1024 a launch's specialisation on H % 16 leaves 540 B) is dropped; the
    heuristic's is kept."""
    code = ("import torch\nfrom tritonlstm import tuning, configs\n"
            "bad = configs.LSTMConfig(block_h=16, block_b=16, block_k=1024, w_resident=True, num_warps=4, "
            "split_k=4)\n"
            "good = configs.heuristic_config(64, 16, torch.float16, 132)\n"
            "print(tuning.fits('bwd', torch.float16, 1000, bad, 232448), "
            "tuning.fits('fwd', torch.float16, 64, good, 232448))\n")
    out = run_python("-c", code, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "True"]


def test_cli_arguments_and_no_gpu_message(capsys):
    a = tuning.parse_args(["--hidden", "128", "--batch", "1,16", "--dtypes", "bfloat16", "--seq", "64",
                           "--bidirectional", "--kernels", "bwd", "--dry-run", "--quick", "--log", "t.json"])
    assert (a.hidden, a.batch, a.dtypes, a.seq, a.bidirectional, a.kernels, a.dry_run, a.quick, a.log) == \
        ([128], [1, 16], ["bfloat16"], 64, True, ["bwd"], True, True, "t.json")
    assert not tuning.parse_args([]).quick
    for bad in (["--hidden", "x"], ["--batch", "16,0"], ["--dtypes", "int8"], ["--dtypes", ""], ["--kernels", "step"],
                ["--seq", "0"]):
        with pytest.raises(SystemExit) as e:
            tuning.parse_args(bad)
        assert e.value.code == 2 and bad[0] in capsys.readouterr().err, bad
    out = run_python("-m", "tritonlstm.tune", timeout=300)
    assert out.returncode == 0 and "no CUDA device, nothing to tune" in out.stdout
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        tuning.tune(hidden=[64], batch=[1])


@pytest.mark.parametrize("kw,match", [
    (dict(hidden=256), "hidden must be a sequence of positive integers, got 256"),
    (dict(hidden=None), "hidden must be a sequence of positive integers, got None"),
    (dict(batch=[16, 0]), r"batch must be a sequence of positive integers, got \[16, 0\]"),
    (dict(seq=2.5), "seq must be a positive integer, got 2.5"),
    (dict(dtypes="float16"), "dtypes must be a sequence of .'float16', 'bfloat16', 'float32'., got 'float16'"),
    (dict(dtypes=[torch.float16]), "dtypes must be a sequence of"),
    (dict(dtypes=None), "dtypes must be a sequence of"),
    (dict(kernels=["stack"]), r"kernels must be a sequence of \('fwd', 'bwd'\), got \['stack'\]"),
])
def test_tune_names_a_bad_argument_before_it_asks_for_a_gpu(kw, match):
    """The Python API checks what the CLI's parser checks, before anything runs (here: before the GPU check)."""
    with pytest.raises(ValueError, match=match):
        tuning.tune(**kw)


def test_cli_prints_each_winner_against_the_heuristic_and_what_ran_before(monkeypatch, capsys):
    cfg = configs.heuristic_config(512, 16, torch.float16, 132)
    results = [tuning.TuneResult("fwd|float16|H512|B16|D1", cfg, 0.5, cfg, 1.0, 9, 0, [], "shipped", 0.8),
               tuning.TuneResult("bwd|float16|H512|B16|D1", cfg, 0.9, cfg, 1.8, 9, 1, [])]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(tuning, "tune", lambda *a, **k: results)
    assert tuning.main(["--hidden", "512", "--batch", "16", "--dtypes", "float16", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:6] == ["key", "default", "ms", "before", "ms", "tuned"]
    assert lines[1].split()[:5] == ["fwd|float16|H512|B16|D1", "1.000", "0.800", "0.500", "2.00x"]
    assert lines[2].split()[:5] == ["bwd|float16|H512|B16|D1", "1.800", "-", "0.900", "2.00x"]


def test_full_search_meets_at_the_counter_barrier():
    """The full search's candidates are tiles and layouts on the counter barrier (the cluster ones are the quick
    search's named variants); the exchanges that measured slower are gone: the flags barrier (perf/NOTES.md v0.52),
    v0.8's tagged exchange (v0.51), and the dsmem and tagged exchanges of v0.48-v0.58 (v0.59)."""
    for kernel in ("fwd", "bwd"):
        found = tuning.candidates(512, 16, torch.float16, 132, 232448, kernel=kernel)
        assert found and {c.exchange for c in found} == {"barrier"}
    with pytest.raises(ValueError, match="exchange must be one of"):
        LSTMConfig(block_h=16, block_b=16, block_k=64, w_resident=True, exchange="flags")
    for gone in ("tagged", "dsmem"):
        with pytest.raises(ValueError, match="exchange must be one of"):
            LSTMConfig(block_h=16, block_b=16, block_k=64, w_resident=True, transposed=True, exchange=gone)


def test_compile_in_parallel_launches_nothing_and_survives_failing_candidates():
    """The tuner's parallel warm-up: under compile_only the launchers compile (on the interpreter: nothing to
    compile) and launch nothing, so outputs stay unwritten (NaN-poisoned by conftest); a candidate that raises
    does not stop the others."""
    from tritonlstm.kernels import lstm as k

    H, B, T = 8, 2, 3
    outs = []

    def launch():
        gx = torch.randn(T, B, 4 * H)
        w = torch.randn(1, 4 * H, H) * 0.1
        outs.append(k.lstm_forward(gx, w, None, torch.zeros(1, B, H), torch.zeros(1, B, H), None, reverse=False,
                                   store_gates=False, config=configs.heuristic_config(H, B, torch.float32, None))[0])

    def broken():
        raise ValueError("a candidate that cannot launch")

    tuning.compile_in_parallel([broken, launch, broken])
    assert len(outs) == 1 and torch.isnan(outs[0]).all()
    launch()  # outside compile_only, the same launcher runs the kernel
    assert torch.isfinite(outs[1]).all()


@pytest.mark.parametrize("kernel,layers", [("fwd", 1), ("bwd", 1), ("stack", 3), ("stack_bwd", 3)])
def test_problem_launches_its_kernel_and_matches_a_reference(kernel, layers):
    """tuning.make_problem / Problem.launch, which the tuner and perf/kernel_ab.py time: each kernel's launch
    (under the interpreter) against the float64 reference, y for the forward kernels and dG for the backward
    ones (the gradient of each layer's gate pre-activations, through a zero tensor added to them)."""
    from tritonlstm.naive import lstm_layer_reference

    H, B, T = 8, 3, 5
    stack = kernel.startswith("stack")
    base = configs.heuristic_config(H, B, torch.float32, None, interpreter=True, layers=layers)
    p = tuning.make_problem(kernel, torch.float32, H, B, T, layers=layers, device="cpu", base=base)
    out = p.launch(base)()

    eye = torch.eye(4 * H, dtype=torch.float64)
    x, ys, pre = p.gx.double(), [], []
    for l in range(layers):
        z = torch.zeros(T, B, 4 * H, dtype=torch.float64, requires_grad=True)
        gx = x + z if l == 0 else x @ p.w_ih[l - 1].double().t() + z
        y, _ = lstm_layer_reference(gx, eye, p.w_hh[l].double(), p.bias[l].double(), None,
                                    p.h0[l].double(), p.c0[l].double())
        ys.append(y)
        pre.append(z)
        x = y
    if kernel in ("fwd", "stack"):
        expected = torch.stack(ys) if stack else ys[0]
    else:
        dy = p.dy.double()
        sum(((y * (dy[l] if stack else dy)).sum() for l, y in enumerate(ys))).backward()
        expected = torch.stack([z.grad for z in pre]) if stack else pre[0].grad
    assert out.shape == expected.shape
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("gpu", [GPU, "NVIDIA H200"])
def test_shipped_configs_cover_the_bench_matrix_and_can_run(gpu):
    """The configs tuned on an H100 (kernels/configs/nvidia-h100-80gb-hbm3.json, issue 6) and on an H200 (run 7):
    read as shipped files are (any triton version), without a warning; a config for every fwd and bwd key of the
    bench's single-layer matrix; each one a valid config whose programs all fit the 132 SMs both have."""
    from pathlib import Path

    path = Path(configs.__file__).parents[1] / "kernels" / "configs" / f"{tuning.gpu_slug(gpu)}.json"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        shipped = tuning.read_configs(path, gpu, None)
    want = {tuning.config_key(kn, getattr(torch, d), h, b, 1) for kn in ("fwd", "bwd")
            for d in ("float16", "bfloat16", "float32") for h in (256, 512, 1024) for b in (1, 16, 64, 256)}
    assert set(shipped) == want
    for key, cfg in shipped.items():
        hidden = int(key.split("|")[2][1:])
        assert cfg.programs(hidden) <= 132, key
        # Within the H100's shared memory by the estimate, so select_config runs it as shipped.
        kernel, dtype = key.split("|")[:2]
        assert configs.shared_bytes(cfg, kernel, hidden, getattr(torch, dtype).itemsize) <= 232448, key
        # A barrier's programs (those of one batch group) are launched as one thread-block cluster: 8, or 16 on an
        # H100.
        assert cfg.exchange != "cluster" or configs.cluster_size_ok(configs.cdiv(hidden, cfg.block_h)), key


def test_select_config_fits_what_it_finds_to_the_gpus_shared_memory(monkeypatch):
    """A config from the cache or the shipped file that needs more shared memory than this GPU has (a cache
    copied from an H100 to a 99 KB GPU) is cut down as the heuristic's picks are; one that fits is kept."""
    big = configs.heuristic_config(1024, 16, torch.float16, 128, kernel="bwd")  # 160 KB: split, resident
    monkeypatch.setattr(configs, "device_limits", lambda device: (128, 101376))
    monkeypatch.setattr(tuning, "lookup", lambda *a: big)
    cuda = torch.device("cuda", 0)
    got = configs.select_config(1024, 16, torch.float16, cuda, False, "bwd")
    assert got == configs.fit_shared_memory(big, "bwd", 1024, 16, torch.float16, 128, 101376) != big
    assert configs.shared_bytes(got, "bwd", 1024, 2) <= 101376
    monkeypatch.setattr(tuning, "lookup", lambda *a: OTHER)  # 64 KB + 16 KB
    assert configs.select_config(1024, 16, torch.float16, cuda, False, "fwd") == OTHER
    monkeypatch.setattr(tuning, "lookup", lambda *a: None)  # the heuristic, fitted
    assert configs.select_config(1024, 16, torch.float16, cuda, False, "fwd") == configs.fit_shared_memory(
        configs.heuristic_config(1024, 16, torch.float16, 128), "fwd", 1024, 16, torch.float16, 128, 101376)
    with use_config(big, kernel="bwd"):  # forced: as given, for the tuner and the tests
        assert configs.select_config(1024, 16, torch.float16, cuda, False, "bwd") == big
    # The picks are memoised (perf/NOTES.md v0.33) with the GPU's limits in the key: the same shapes on an H100
    # get the H100's.
    monkeypatch.setattr(configs, "device_limits", lambda device: (132, configs.SM90_SHARED))
    h100 = configs.select_config(1024, 16, torch.float16, cuda, False, "fwd")
    assert h100 == configs.heuristic_config(1024, 16, torch.float16, 132) != configs.fit_shared_memory(
        h100, "fwd", 1024, 16, torch.float16, 128, 101376)
    monkeypatch.setattr(tuning, "lookup", lambda *a: big)
    assert configs.select_config(1024, 16, torch.float16, cuda, False, "bwd") == big


@pytest.mark.parametrize("kernel,layers", [("fwd", 1), ("bwd", 1), ("stack", 4), ("stack_bwd", 2), ("stack_bwd", 4)])
def test_device_picks_fit_each_gpus_shared_memory(kernel, layers):
    """What a CUDA device gets where no tuned config matches (configs._device_pick: the heuristic, or the stack
    backward's own, fitted to the GPU), over shapes and three GPUs' limits: a valid config within the shared memory."""
    gpus = ((132, configs.SM90_SHARED), (108, 166912), (58, 101376))  # H100, A100, an sm_89 card
    for hidden in (16, 100, 256, 512, 1024, 2048):
        for batch in (1, 16, 256, 1024):
            for dtype in (torch.float16, torch.bfloat16, torch.float32):
                for sms, smem in gpus:
                    cfg = configs._device_pick(hidden, batch, dtype, sms, smem, kernel, 1, layers)
                    assert isinstance(cfg, LSTMConfig)
                    assert configs.shared_bytes(cfg, kernel, hidden, dtype.itemsize) <= smem, \
                        (kernel, layers, hidden, batch, dtype, sms, cfg)


def test_candidates_fit_a_smaller_gpu_and_the_2d_grid_meets_at_the_counter_barrier():
    """The full search's candidates on a 99 KB GPU all fit it by the estimate (configs.shared_bytes). The
    backward's at B >= 64 hold the 2-D grid (v0.26) with the counter barrier only: a copy of it with another
    exchange (once the tagged one) raised ValueError, so `python -m tritonlstm.tune` failed at every such key
    before any timing."""
    for kernel in ("fwd", "bwd"):
        for dtype in (torch.float16, torch.float32):
            for hidden in (256, 512, 1024):
                for batch in (16, 256):
                    small = tuning.candidates(hidden, batch, dtype, 128, 101376, kernel)
                    assert small, (kernel, dtype, hidden, batch)
                    assert all(configs.shared_bytes(c, kernel, hidden, dtype.itemsize) <= 101376 for c in small)
    grids = [c for c in tuning.candidates(1024, 256, torch.float16, 132, 232448, "bwd") if c.grid_2d]
    assert grids and all(c.exchange == "barrier" for c in grids)


def test_quick_search_times_the_float32_half_w_forward():
    """v0.29's float32 forward on float16 operands is in the quick search, which the next GPU session's forward
    re-tune runs (it was only in the full search), and so are v0.40-v0.41's backward ones; 16-bit layers have no such
    variant."""
    for H, B in ((1024, 16), (512, 1), (256, 64)):
        quick = tuning.quick_candidates(H, B, torch.float32, 132, "fwd")
        half = [c for c, name in quick.items() if name.removeprefix("heuristic=") == "transposed-half"]
        assert len(half) == 1 and half[0].half_w and half[0].transposed, (H, B, quick)
        assert not any(c.half_w for c in tuning.quick_candidates(H, B, torch.float16, 132, "fwd"))
        # The backward's (v0.40, v0.41): its split tiles, and the 2-D grid from 64 rows; never the reduce-scatter.
        bwd = tuning.quick_candidates(H, B, torch.float32, 132, "bwd")
        assert sorted(n for c, n in bwd.items() if c.half_w) == (["grid-2d-half", "grid-2d-half-bb64", "split-half"]
                                                                  if B >= 64 else ["split-half"]), (H, B, bwd)
        assert not any(c.half_w and c.transposed for c in bwd)
        assert not any(c.half_w for c in tuning.quick_candidates(H, B, torch.float16, 132, "bwd"))


@pytest.mark.parametrize("quick", [True, False], ids=["quick", "full"])
def test_a_retune_times_the_config_that_runs_now(quick):
    """The config a key runs now (the user's cache, else the shipped one) is a candidate of its re-tune, named by
    where it came from, even where neither search holds it: the winner goes to the user's cache, which is read
    first, so it must not be slower than what it replaces."""
    H, B, dt = 1024, 256, torch.float16
    default = configs.heuristic_config(H, B, dt, 132, kernel="bwd")
    plain, plain_names = tuning.key_candidates("bwd", dt, H, B, 132, 232448, default, None, quick)
    assert plain[0] == default
    odd = dataclasses.replace(default, block_h=32, block_b=32, num_warps=2, split_k=1)  # in neither search
    assert odd not in plain
    cands, names = tuning.key_candidates("bwd", dt, H, B, 132, 232448, default, (odd, "shipped"), quick)
    assert cands[0] == default and cands[1] == odd and names[odd] == "shipped"
    assert cands[2:] == plain[1:] and all(names.get(c) == plain_names.get(c) for c in plain)
    if quick:  # a named variant that is also what runs now keeps both names
        split4 = configs.named_variants("bwd", H, B, dt, 132)["split4"]
        cands, names = tuning.key_candidates("bwd", dt, H, B, 132, 232448, default, (split4, "cache"), quick)
        assert cands == plain and names[split4] == "cache=split4"


def test_cluster_candidates_are_timed_only_on_gpus_with_clusters():
    quick = tuning.quick_candidates(256, 16, torch.float16, 132, "fwd")
    assert {c.exchange for c in quick if c.clustered} == {"cluster"}
    assert all(tuning.launchable(c, 256, 1, 132, clusters=True) for c in quick)
    assert [c for c in quick if tuning.launchable(c, 256, 1, 132, clusters=False)] == \
        [c for c in quick if not c.clustered]


def test_quick_candidates_a_small_gpu_cannot_keep_resident_are_left_out_before_timing():
    """On 20 SMs the A/B's split tiles (16 units a program) at H = 512 need 32 programs: tuning.resident drops them
    before any compile or timing (tune_key filters with it), and keeps the stepwise and resident ones."""
    quick = tuning.quick_candidates(512, 16, torch.float16, 20, "bwd")
    dropped = [c for c in quick if not tuning.resident(c, 512, 1, 20)]
    assert dropped and all(c.persistent and c.programs(512) > 20 for c in dropped)
    assert any(tuning.resident(c, 512, 1, 20) for c in quick)
    stepwise = dataclasses.replace(dropped[0], persistent=False)
    assert tuning.resident(stepwise, 512, 1, 20)
    assert not tuning.resident(CFG, 1024, 2, 132) and tuning.resident(CFG, 1024, 1, 132)  # 128 programs a direction


def test_a_key_whose_default_fails_is_reported_and_the_run_goes_on(monkeypatch, tmp_path):
    """Run 7 (H200): one key's default config failed its check and the exception ended the whole run, losing the
    keys after it. Now the key is warned about, logged under "failed" with its candidates, not written, and the
    other keys are tuned; the CLI exits 1 after naming it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: GPU)

    def fake_tune_key(kernel, dtype, H, B, D, seq, quick=False):
        key = tuning.config_key(kernel, dtype, H, B, D)
        if H == 512:
            raise tuning.TuneKeyError(f"tritonlstm.tune: the default config of {key} failed its correctness check "
                                      "(RuntimeError: barrier)", key, [{"name": "heuristic", "error": "barrier"}])
        return tuning.TuneResult(key, CFG, 1.0, CFG, 2.0, 3, 0)

    monkeypatch.setattr(tuning, "tune_key", fake_tune_key)
    log = tmp_path / "log.json"
    failed = []
    with pytest.warns(RuntimeWarning, match=r"fwd\|float16\|H512\|B16\|D1 failed its correctness check"):
        results = tuning.tune((256, 512, 1024), (16,), ("float16",), kernels=("fwd",), log_path=log, failed=failed)
    assert [r.key for r in results] == ["fwd|float16|H256|B16|D1", "fwd|float16|H1024|B16|D1"]
    assert failed == ["fwd|float16|H512|B16|D1"]
    written = tuning.read_configs(tuning.cache_path(GPU), GPU, tuning._triton_version())
    assert sorted(written) == ["fwd|float16|H1024|B16|D1", "fwd|float16|H256|B16|D1"]
    data = json.loads(log.read_text())
    assert [k["key"] for k in data["keys"]] == [r.key for r in results]
    assert data["failed"][0]["key"] == "fwd|float16|H512|B16|D1" and "barrier" in data["failed"][0]["error"]
    assert data["failed"][0]["candidates"] == [{"name": "heuristic", "error": "barrier"}]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert tuning.main(["--hidden", "512,1024", "--batch", "16", "--dtypes", "float16", "--kernels", "fwd"]) == 1


def test_the_float32_backward_heuristic_takes_the_half_grid_where_run_7_measured_it(monkeypatch):
    """v0.44: float32 above H = 512 from 64 rows on the 2-D grid with float16 operands (run 7, H200: 0.25x and 0.51x
    the shipped tiles' time at H = 1024); not at H = 512 (1.65x there), below 64 rows, or in 16-bit. Where TF32 is
    not allowed, functional._launch runs full_precision_backward: the layout without half_w."""
    monkeypatch.setattr(configs, "device_limits", lambda device: (132, 232448))
    cuda = torch.device("cuda", 0)
    for H, B in ((1024, 64), (1024, 256), (768, 128)):
        pick = configs.heuristic_pick(H, B, torch.float32, cuda, False, "bwd")
        assert pick == configs.grid_2d_config(H, B, 4, 132, half_w=True) and pick.half_w, (H, B, pick)
        full = configs.full_precision_backward(H, B, torch.float32, cuda, False)
        assert not full.half_w and full == configs.fit_shared_memory(
            configs.measured_backward_layout(H, B, torch.float32, 132, half_w=False), "bwd", H, B, torch.float32, 132,
            232448), (H, B, full)
    for H, B, dt in ((512, 256, torch.float32), (1024, 16, torch.float32), (1024, 256, torch.float16),
                     (1024, 256, torch.bfloat16)):
        pick = configs.heuristic_pick(H, B, dt, cuda, False, "bwd")
        assert not pick.half_w, (H, B, dt, pick)
        assert configs.full_precision_backward(H, B, dt, cuda, False) == pick
