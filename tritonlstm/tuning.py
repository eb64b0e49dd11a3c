"""Autotuning of the recurrence kernels' launch configs: candidates, filtering, timing, the on-disk cache.

    python -m tritonlstm.tune [--hidden 512 --batch 16 --dtypes float16 --seq 256 --bidirectional]

Cache: one JSON file per (GPU name, triton version) in ~/.cache/tritonlstm/ (TRITONLSTM_CACHE_DIR overrides),
written atomically. A key holds what changes the winner: kernel (fwd, bwd), dtype, H, the batch bucketed to a
power of two, and the direction count. Shipped configs for known GPUs live in the package as
`tritonlstm/kernels/configs/<gpu>.json` (same format, produced by this tuner on that GPU). A corrupt, stale or
foreign file gives one warning and is ignored; a lookup never raises.

Tuning times the kernels themselves (through their launchers, on random inputs of the key's shape) after
checking each candidate's output against a float32 PyTorch reference; candidates that cannot run are dropped
before any timing (too much shared memory, more programs than SMs, register spills in the compile-only check).
Without CUDA there is nothing to tune: the interpreter always uses a single config.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.resources
import json
import os
import re
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from tritonlstm.configs import (
    LSTMConfig,
    _fitted,
    _pow2,
    batch_groups,
    cdiv,
    device_heuristic,
    device_limits,
    grid_2d_config,
    heuristic_config,
    named_variants,
    reduce_scatter_config,
    shared_bytes,
    transposed_config,
    wide_tile_config,
    with_split_k,
)

FORMAT = 1
TUNABLE = ("fwd", "bwd")  # the wavefront stacks' kernels use the heuristic (not tuned yet)
DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}
_loaded: dict[str, dict[str, LSTMConfig]] = {}
_warned: set[str] = set()


# ----------------------------------------------------------------------------------------------------------
# Keys and files
# ----------------------------------------------------------------------------------------------------------


def batch_bucket(batch: int) -> int:
    return _pow2(batch)


def config_key(kernel: str, dtype: torch.dtype, hidden: int, batch: int, directions: int) -> str:
    return f"{kernel}|{DTYPE_NAMES[dtype]}|H{hidden}|B{batch_bucket(batch)}|D{directions}"


def gpu_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def cache_dir() -> Path:
    return Path(os.environ.get("TRITONLSTM_CACHE_DIR") or Path.home() / ".cache" / "tritonlstm")


def _triton_version() -> str:
    import triton

    return triton.__version__


def cache_path(gpu: str, triton_version: str | None = None) -> Path:
    return cache_dir() / f"{gpu_slug(gpu)}-triton{triton_version or _triton_version()}.json"


def shipped_path(gpu: str) -> Path:
    return Path(str(importlib.resources.files("tritonlstm.kernels") / "configs" / f"{gpu_slug(gpu)}.json"))


def _warn_once(path: Path, why: str) -> None:
    if str(path) not in _warned:
        _warned.add(str(path))
        warnings.warn(f"tritonlstm: ignoring config file {path}: {why}", RuntimeWarning, stacklevel=3)


def read_configs(path: Path, gpu: str, triton_version: str | None) -> dict[str, LSTMConfig]:
    """The configs of one file, or {} (with one warning) if it is missing, corrupt, stale or foreign.
    triton_version None accepts any (shipped files)."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"format {data.get('format') if isinstance(data, dict) else '?'} != {FORMAT} (stale)")
        if data.get("gpu") != gpu:
            raise ValueError(f"written for GPU {data.get('gpu')!r}, this is {gpu!r}")
        if triton_version is not None and data.get("triton") != triton_version:
            raise ValueError(f"written for triton {data.get('triton')!r}, this is {triton_version!r}")
        return {k: LSTMConfig(**v) for k, v in dict(data["configs"]).items()}
    except Exception as e:  # a bad file must never break a forward pass
        _warn_once(path, f"{type(e).__name__}: {e}")
        return {}


def write_configs(path: Path, gpu: str, configs: dict[str, LSTMConfig], triton_version: str | None = None) -> None:
    """Merges `configs` into the file, atomically: a crash mid-write leaves the old file whole."""
    version = triton_version or _triton_version()
    merged = {**read_configs(path, gpu, version), **configs}
    payload = {"format": FORMAT, "gpu": gpu, "triton": version,
               "configs": {k: dataclasses.asdict(v) for k, v in sorted(merged.items())}}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    _loaded.pop(str(path), None)


def _configs_of(path: Path, gpu: str, triton_version: str | None) -> dict[str, LSTMConfig]:
    key = str(path)
    if key not in _loaded:
        _loaded[key] = read_configs(path, gpu, triton_version)
    return _loaded[key]


# GPUs with no shipped file of their own that run a sibling's shipped configs: same architecture, SM count and
# shared memory per block, so every config fits and was tuned on the same SM (the H200 is an H100 SXM with more
# and faster memory). A GPU's own file, once shipped, takes over.
SHIPPED_SIBLINGS = {"NVIDIA H200": "NVIDIA H100 80GB HBM3"}


def shipped_gpu(gpu: str) -> str:
    """Whose shipped configs this GPU runs: its own file's, else its sibling's (SHIPPED_SIBLINGS), else its own."""
    sibling = SHIPPED_SIBLINGS.get(gpu)
    if sibling is not None and not shipped_path(gpu).exists() and shipped_path(sibling).exists():
        return sibling
    return gpu


@functools.lru_cache(maxsize=64)
def _lookup_paths(gpu: str, cache_dir_env: str | None) -> tuple[Path, Path, str]:
    # Building the paths (pathlib, importlib.resources) cost ~100 us per launch before this memo.
    owner = shipped_gpu(gpu)
    return cache_path(gpu), shipped_path(owner), owner


def lookup_in(gpu: str, key: str) -> tuple[LSTMConfig | None, str]:
    """(config, where it came from): the user's cache first, then the configs shipped for this GPU (or its
    sibling's, "shipped:<sibling>")."""
    user, shipped, owner = _lookup_paths(gpu, os.environ.get("TRITONLSTM_CACHE_DIR"))
    found = _configs_of(user, gpu, _triton_version()).get(key)
    if found is not None:
        return found, "cache"
    found = _configs_of(shipped, owner, None).get(key)
    if found is not None:
        return found, "shipped" if owner == gpu else f"shipped:{owner}"
    return None, "heuristic"


def lookup(kernel: str, hidden: int, batch: int, dtype: torch.dtype, directions: int,
           device: torch.device) -> LSTMConfig | None:
    """The runtime's question: a tuned or shipped config for this launch, or None (then the heuristic).
    With TRITONLSTM_AUTOTUNE=1 a miss is tuned on the spot and cached."""
    gpu = torch.cuda.get_device_name(device)
    key = config_key(kernel, dtype, hidden, batch, directions)
    found, source = lookup_in(gpu, key)
    if found is not None and not found.covers_k(hidden):
        # A hand-edited or foreign file: the launchers refuse it (W resident in one K chunk), so the heuristic runs.
        _warn_once(Path(f"{source}:{key}"), f"w_resident with block_k={found.block_k} < H={hidden}")
        found = None
    if found is None and os.environ.get("TRITONLSTM_AUTOTUNE", "0") not in ("", "0"):
        found = tune_key(kernel, dtype, hidden, batch_bucket(batch), directions, seq=64, device=device).best
        write_configs(cache_path(gpu), gpu, {key: found})
    return found


# ----------------------------------------------------------------------------------------------------------
# Candidates
# ----------------------------------------------------------------------------------------------------------


# Left to the full search: 2 warps (they spill at large K), and the variants that never won a key of the quick
# searches in runs 4-7 (perf/NOTES.md v0.53: "unsplit" and "streamed" in 146 keys, "wide-bh64" in 40, "cluster"
# in 36, and the removed "flags").
QUICK_VARIANTS = ("unsplit-w4", "split", "split4", "merged", "transposed", "transposed-streamed", "wide", "wide-bh32",
                  "grid-2d", "grid-2d-bb64", "grid-2d-half", "grid-2d-half-bb64", "split-half", "no-prefetch",
                  "transposed-cluster", "transposed-streamed-bb128", "transposed-half", "transposed-streamed-half",
                  "transposed-streamed-bb128-half", "cluster-bh64", "transposed-w8", "transposed-half-w8")


def quick_candidates(hidden: int, batch: int, dtype: torch.dtype, num_sms: int,
                     kernel: str = "fwd") -> dict[LSTMConfig, str]:
    """The quick search (`--quick`): the heuristic's pick and the A/B's named variants of QUICK_VARIANTS that apply
    at this shape (configs.named_variants: about ten configs, one per layout and exchange, instead of the full
    grid's 30-250), each with its name ("heuristic=split" where the heuristic picks a named one)."""
    named = {}
    for name, cfg in named_variants(kernel, hidden, batch, dtype, num_sms, QUICK_VARIANTS).items():
        named.setdefault(cfg, name)
    pick = heuristic_config(hidden, batch, dtype, num_sms, kernel=kernel)
    return {pick: "heuristic" + (f"={named[pick]}" if pick in named else ""), **{c: n for c, n in named.items()
                                                                                  if c != pick}}


def candidates(hidden: int, batch: int, dtype: torch.dtype, num_sms: int, smem_limit: int,
               kernel: str = "fwd") -> list[LSTMConfig]:
    """The full search's configs that can run: every program resident (P * Q <= SMs) and the estimate of its shared
    memory (configs.shared_bytes) under the limit. The heuristic's pick comes first."""
    esize = dtype.itemsize
    hk = max(16, _pow2(hidden))
    out = [heuristic_config(hidden, batch, dtype, num_sms, kernel=kernel)]
    for resident in (True, False):
        if resident and hk > 1024 or not resident and hk <= 64:
            continue
        bk = hk if resident else 64
        for bh in (8, 16, 32, 64):
            for bb in (16, 32, 64):
                if bb > max(16, _pow2(batch)):
                    continue
                tiles = LSTMConfig(block_h=bh, block_b=bb, block_k=bk, w_resident=resident,
                                   batch_groups=batch_groups(hidden, batch, bh, bb, num_sms))
                if cdiv(hidden, bh) > num_sms or shared_bytes(tiles, kernel, hidden, esize) > smem_limit:
                    continue
                for warps in (4, 8):
                    cfg = dataclasses.replace(tiles, num_warps=warps)
                    merged = [dataclasses.replace(cfg, merged_gates=True)] if kernel == "fwd" else []
                    if kernel == "fwd" and bh == 16 and warps == 4:
                        # perf/NOTES.md v0.18; streamed W^T chunks pipelined like the wide tiles' (3 stages).
                        merged.append(dataclasses.replace(cfg, transposed=True, num_stages=1 if resident else 3))
                    if kernel == "bwd" and bh == 16 and bb == 16 and warps == 8 and \
                            cdiv(batch, bb) <= tiles.batch_groups:
                        # The reduce-scatter backward (v0.24), where every program owns one batch tile.
                        merged.append(reduce_scatter_config(hidden, batch, esize, num_sms, streamed=not resident))
                    for c in (cfg, with_split_k(cfg), *merged):
                        if c not in out:
                            out.append(c)
    if batch > 16 and cdiv(hidden, 16) <= num_sms:
        out.append(wide_tile_config(hidden, batch, esize, num_sms, kernel))
    if kernel == "fwd" and esize == 4 and hidden % 16 == 0 and hk <= 1024 and cdiv(hidden, 16) <= num_sms:
        # float32 W^T resident in float16 (perf/NOTES.md v0.29), where the float32 tiles above may not fit.
        out.append(transposed_config(hidden, batch, esize, num_sms, 16, half_w=True))
    if kernel == "bwd" and batch >= 64 and (grid := grid_2d_config(hidden, batch, esize, num_sms)) is not None:
        out.append(grid)  # perf/NOTES.md v0.26
    if kernel == "bwd" and esize == 4:
        # float32's W in float16: the 2-D grid's block (v0.40) and the split tiles (v0.41), as named_variants
        # builds them; where TF32 is not allowed a launch times the stand-in.
        halves = named_variants(kernel, hidden, batch, dtype, num_sms, ("grid-2d-half", "split-half"))
        out += [halves[name] for name in ("grid-2d-half", "split-half") if name in halves]
    # The estimate (configs.shared_bytes) for the layouts the loop above did not size: none is dropped on an H100.
    return [c for c in dict.fromkeys(out) if shared_bytes(c, kernel, hidden, esize) <= smem_limit]


def key_candidates(kernel: str, dtype: torch.dtype, hidden: int, batch: int, num_sms: int, smem_limit: int,
                   default: LSTMConfig, current: tuple[LSTMConfig, str] | None = None,
                   quick: bool = False) -> tuple[list[LSTMConfig], dict[LSTMConfig, str]]:
    """The candidates of one key, in order, and the names the log gives them: the quick or the full search, with
    the heuristic's pick (default) first, and the config that runs for the key now (current: (config, "cache" or
    "shipped")), which neither search need contain: without it a re-tune's winner, written to the user's cache and
    read before the shipped configs, could be slower than the shipped config it replaces."""
    names = quick_candidates(hidden, batch, dtype, num_sms, kernel) if quick else {}
    cands = list(names) if quick else candidates(hidden, batch, dtype, num_sms, smem_limit, kernel)
    if default not in cands:  # the heuristic's pick cut down to this GPU's shared memory
        cands.insert(0, default)
        names[default] = "heuristic-fitted"
    if current is not None:
        cfg, source = current
        if cfg not in cands:
            cands.insert(1, cfg)
        names[cfg] = f"{source}={names[cfg]}" if names.get(cfg) else source
    return cands, names


def launchable(cfg: LSTMConfig, hidden: int, directions: int, num_sms: int, clusters: bool) -> bool:
    """Whether the tuner times cfg on this GPU: resident (below), and the cluster exchange only where the GPU has
    thread-block clusters (sm_90 on). Elsewhere a cluster config runs as the counter barrier (kernels.lstm._run):
    a copy of another candidate, which could win and be cached as a config that warns in every process."""
    return resident(cfg, hidden, directions, num_sms) and (clusters or not cfg.clustered)


def resident(cfg: LSTMConfig, hidden: int, directions: int, num_sms: int) -> bool:
    """Whether every program of a launch of cfg can be resident at once, as a persistent launch needs (a named
    variant's tiles on a GPU with fewer SMs than the H100 they were named on may not be; a stepwise one always
    is)."""
    return not cfg.persistent or cfg.programs(hidden) * directions <= num_sms


def fits(kernel: str, dtype: torch.dtype, hidden: int, cfg: LSTMConfig, smem_limit: int, check=None,
         arch: int = 90) -> bool:
    """The compile-only verdict (compilecheck.check, compiled for sm_`arch`): compiles, shared memory under the
    limit, register spills at most compilecheck.SPILL_LIMIT bytes (small spills can still win: the timing
    decides)."""
    from tritonlstm.compilecheck import SPILL_LIMIT, Target

    if check is None:
        from tritonlstm.compilecheck import check
    res = check(kernel, dtype, hidden, cfg, target=Target(arch, 0, smem_limit))
    return res.error is None and res.shared <= smem_limit and res.spill_bytes <= SPILL_LIMIT


# ----------------------------------------------------------------------------------------------------------
# Timing one key
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TuneResult:
    key: str
    best: LSTMConfig
    best_ms: float
    default: LSTMConfig
    default_ms: float
    tried: int
    rejected: int  # candidates whose output disagreed with the reference
    # Every candidate: its config (dataclasses.asdict), name (quick search) or "", median ms (None if rejected)
    # and relative error against the reference; `python -m tritonlstm.tune --log FILE` writes them.
    log: list[dict] = dataclasses.field(default_factory=list)
    # What ran for the key before (the user's cache or the shipped config, by that name) and its time; None where
    # the heuristic's pick (default) ran.
    current_source: str | None = None
    current_ms: float | None = None

    @property
    def speedup(self) -> float:
        return self.default_ms / self.best_ms


class TuneKeyError(RuntimeError):
    """A key that could not be tuned: the heuristic's pick, the reference every winner must beat, failed. `tune`
    reports it and goes on to the next key."""

    def __init__(self, message: str, key: str, log: list[dict]):
        super().__init__(message)
        self.key, self.log = key, log


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


# Relative error allowed between a candidate's output and the reference: T steps of 16-bit rounding in a
# different order of accumulation.
LIMITS = {torch.float32: 5e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}


@dataclasses.dataclass
class Problem:
    """Random inputs of one recurrence kernel ("fwd", "bwd": D directions; "stack", "stack_bwd": L layers of a
    wavefront) at one shape, and its launches: `launch(cfg)` is a call that runs the kernel with cfg and returns
    y (forward kernels) or dG (backward kernels). The tuner and perf/kernel_ab.py time these same calls."""

    kernel: str
    gx: torch.Tensor  # [T, B, D*4H]
    w_hh: torch.Tensor  # [D or L, 4H, H]
    w_ih: torch.Tensor  # [L-1, 4H, H] (stacks)
    bias: torch.Tensor  # [D or L, 4H] float32
    h0: torch.Tensor
    c0: torch.Tensor  # float32
    dy: torch.Tensor  # [T, B, D*H], or [L, T, B, H] for a stack
    saved: tuple = ()  # the backward's gates and c_all, from a forward with the base config

    def launch(self, cfg: LSTMConfig):
        from tritonlstm.kernels import lstm as k

        p, zeros = self, torch.zeros_like(self.c0, dtype=self.h0.dtype)
        if self.kernel == "fwd":
            return lambda: k.lstm_forward(p.gx, p.w_hh, p.bias, p.h0, p.c0.clone(), None, reverse=False,
                                          store_gates=False, config=cfg)[0]
        if self.kernel == "stack":
            return lambda: k.lstm_stack_forward(p.gx, p.w_ih, p.w_hh, p.bias, p.h0, p.c0.clone(), None,
                                                store_gates=False, config=cfg)[0]
        gates, c_all = self.saved
        if self.kernel == "bwd":
            # (bias_sums as a training step asks: where BIAS_IN_KERNEL lets the launch sum them, it is timed so.)
            return lambda: k.lstm_backward(gates, c_all, p.c0, p.w_hh, p.dy, zeros, zeros, None, reverse=False,
                                           config=cfg, bias_sums=(gates.dtype, 2, False))[0]
        return lambda: k.lstm_stack_backward(gates, c_all, p.c0, p.w_ih, p.w_hh, p.dy, zeros, zeros, None,
                                             config=cfg)[0]


def make_problem(kernel: str, dtype: torch.dtype, hidden: int, batch: int, seq: int, directions: int = 1,
                 layers: int = 1, device: torch.device | str = "cuda", base: LSTMConfig | None = None,
                 seed: int = 0) -> Problem:
    """Weights uniform in +-1/sqrt(H) (nn.LSTM's init), gx and dy standard normal, zero initial states; the
    backward kernels' saved gates come from a forward launch with `base` (the heuristic's when None)."""
    from tritonlstm.kernels import lstm as k

    H, B, T = hidden, batch, seq
    stack = kernel in ("stack", "stack_bwd")
    n = layers if stack else directions
    g = torch.Generator(device="cpu").manual_seed(seed)
    scale = H ** -0.5

    def uniform(*shape):
        return ((torch.rand(*shape, generator=g) * 2 - 1) * scale).to(device, dtype)

    gx = torch.randn(T, B, (1 if stack else n) * 4 * H, generator=g).to(device, dtype)
    w_hh = uniform(n, 4 * H, H)
    w_ih = uniform(max(n - 1, 0), 4 * H, H) if stack else w_hh[:0]
    bias = uniform(n, 4 * H).float()
    h0 = torch.zeros(n, B, H, device=device, dtype=dtype)
    c0 = torch.zeros(n, B, H, device=device)
    dy = torch.randn(*((n, T, B, H) if stack else (T, B, n * H)), generator=g).to(device, dtype)
    problem = Problem(kernel, gx, w_hh, w_ih, bias, h0, c0, dy)
    if kernel in ("bwd", "stack_bwd"):
        if base is None:
            base = device_heuristic(H, B, dtype, device, "stack" if stack else "fwd", directions=1 if stack else n,
                                    layers=n if stack else 1)
        if stack:
            _, _, _, gates, c_all, _ = k.lstm_stack_forward(gx, w_ih, w_hh, bias, h0, c0.clone(), None,
                                                           store_gates=True, config=base)
        else:
            _, _, _, gates, c_all = k.lstm_forward(gx, w_hh, bias, h0, c0.clone(), None, reverse=False,
                                                   store_gates=True, config=base)
        problem.saved = (gates, c_all)
    return problem


def tune_key(kernel: str, dtype: torch.dtype, hidden: int, batch: int, directions: int, seq: int,
             device: torch.device | str = "cuda", check=None, timer=None, quick: bool = False) -> TuneResult:
    """Times every runnable candidate of one key on random inputs (the full grid, or with quick the named
    variants) and returns the fastest that is correct."""
    from tritonlstm.kernels import lstm as k
    from tritonlstm.naive import lstm_layer_reference

    if timer is None:
        from triton.testing import do_bench as timer
    device = torch.device(device)
    num_sms, smem = device_limits(device)
    props = torch.cuda.get_device_properties(device)
    arch = props.major * 10 + props.minor  # compile-only checks for this GPU's architecture
    H, B, T, D = hidden, batch, seq, directions
    default = device_heuristic(H, B, dtype, device, kernel, directions=D)
    # A backward key's saved gates come from the forward's own heuristic pick (make_problem's base=None): run 7
    # ran them on the backward's default, a grid_2d config (W resident, block_k its unit block, below H) of which
    # the forward read W's first block_k columns alone, and every candidate "failed" at fp32 H 512 B 256.
    problem = make_problem(kernel, dtype, H, B, T, directions=D, device=device)
    run = problem.launch

    # float32 reference of the recurrence over gx (x = gx, W_ih = identity, direction 1 reversed), and its
    # gradient w.r.t. gx, which is dG.
    gx_ref = problem.gx.float().requires_grad_()
    eye = torch.eye(4 * H, device=device)
    y_ref = torch.cat([lstm_layer_reference(gx_ref[..., d * 4 * H:(d + 1) * 4 * H], eye, problem.w_hh[d].float(),
                                            problem.bias[d], None, problem.c0[d], problem.c0[d], reverse=d == 1)[0]
                       for d in range(D)], dim=2)
    y_ref.backward(problem.dy.float())
    limit = LIMITS[dtype]
    expected = y_ref if kernel == "fwd" else gx_ref.grad
    times, rejected, log = {}, 0, []
    sms = num_sms // D
    # What runs for this key now, as select_config finds it (not `lookup`, which may tune: this is the tuner).
    key = config_key(kernel, dtype, H, B, D)
    found, source = lookup_in(props.name, key)
    current = None if found is None else (_fitted(found, kernel, H, B, dtype, num_sms, smem, D), source)
    cands, names = key_candidates(kernel, dtype, H, B, sms, smem, default, current, quick)
    cands = [c for c in cands if c == default or launchable(c, H, D, num_sms, clusters=props.major >= 9)]
    with ThreadPoolExecutor(_compile_workers()) as pool:  # compile-only checks: independent compiles
        keep = list(pool.map(lambda c: c == default or fits(kernel, dtype, H, c, smem, check, arch), cands))
    cands = [c for c, ok in zip(cands, keep) if ok]
    compile_in_parallel([run(cfg) for cfg in cands])
    for cfg in cands:
        entry = {"name": names.get(cfg, ""), "config": dataclasses.asdict(cfg), "ms": None}
        log.append(entry)
        try:
            err = _rel(run(cfg)(), expected)
            ms = timer(run(cfg), warmup=10, rep=40, quantiles=[0.5])
            k.barrier_errors.check(device, wait=True)  # a barrier that failed while timed disqualifies
        except Exception as e:  # a candidate that fails to launch is simply not a winner
            err = float("inf")
            entry["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        entry["rel_err"] = err if err != float("inf") else None
        if not err <= limit:
            rejected += 1
            continue
        times[cfg] = entry["ms"] = ms[0] if isinstance(ms, (list, tuple)) else ms
    if default not in times:
        why = next((e.get("error") or f"relative error {e['rel_err']:.2e} > {limit:g}" for e, c in zip(log, cands)
                    if c == default), "not run")
        raise TuneKeyError(f"tritonlstm.tune: the default config of {key} failed its correctness check ({why})",
                           key, log)
    best = min(times, key=times.get)
    return TuneResult(key, best, times[best], default, times[default],
                      len(cands), rejected, log, None if current is None else current[1],
                      None if current is None else times.get(current[0]))


def _compile_workers() -> int:
    return max(1, min(16, os.cpu_count() or 1))


def compile_in_parallel(calls) -> None:
    """Compiles the kernels that each of `calls` would launch, on a thread pool, before anything is timed:
    serially, compiling dominates a tuning run (seconds per candidate). Triton's compiles release the GIL for
    most of their time (two threads ran four sm_90 compiles in 0.52x the serial time on the 2-core CI
    machine). Best effort: a candidate whose compile fails here fails again at its launch and is rejected
    there; if the parallel machinery itself fails, each kernel compiles at its first launch as before."""
    from tritonlstm.kernels import lstm as k

    try:
        from triton.runtime._async_compile import AsyncCompileMode
    except ImportError:  # a triton without it: compile at first launch
        return
    try:
        with ThreadPoolExecutor(_compile_workers()) as pool, AsyncCompileMode(pool, ignore_errors=True), \
                k.compile_only():
            for call in calls:
                try:
                    call()
                except Exception:  # the same error surfaces at the candidate's launch, which rejects it
                    continue
    except Exception as e:
        warnings.warn(f"tritonlstm.tune: parallel compile failed ({type(e).__name__}: {e}); kernels compile at "
                      "their first launch instead", RuntimeWarning, stacklevel=2)


def _check_tune_args(hidden, batch, dtypes, seq, kernels) -> None:
    def positive(v):
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1

    def sequence(values):
        return not isinstance(values, str) and hasattr(values, "__iter__")

    for name, values in (("hidden", hidden), ("batch", batch)):
        if not sequence(values) or not all(positive(v) for v in values):
            raise ValueError(f"tritonlstm.tune: {name} must be a sequence of positive integers, got {values!r}")
    if not positive(seq):
        raise ValueError(f"tritonlstm.tune: seq must be a positive integer, got {seq!r}")
    for name, values, allowed in (("dtypes", dtypes, tuple(DTYPE_NAMES.values())), ("kernels", kernels, TUNABLE)):
        if not sequence(values) or any(v not in allowed for v in values):
            raise ValueError(f"tritonlstm.tune: {name} must be a sequence of {allowed}, got {values!r}")


def tune(hidden=(256, 512, 1024), batch=(1, 16, 64, 256), dtypes=("float16", "bfloat16", "float32"), seq=256,
         bidirectional: bool = False, kernels=TUNABLE, write: bool = True, progress=None, quick: bool = False,
         log_path: str | os.PathLike | None = None, failed: list[str] | None = None) -> list[TuneResult]:
    """Tunes every (kernel, dtype, H, batch bucket) and, with write, merges the winners into the user's cache;
    with log_path, writes every candidate's time there (JSON, rewritten after each key). A key whose default config
    fails is warned about, logged under "failed", appended to `failed`, and left out of the results."""
    _check_tune_args(hidden, batch, dtypes, seq, kernels)
    if not torch.cuda.is_available():
        raise RuntimeError("tritonlstm.tune needs a CUDA GPU: there is nothing to tune on the CPU interpreter, "
                           "which always runs a single config")
    gpu = torch.cuda.get_device_name()
    directions = 2 if bidirectional else 1
    jobs = [(kn, getattr(torch, d), h, batch_bucket(b)) for kn in kernels for d in dtypes for h in hidden
            for b in sorted({batch_bucket(b) for b in batch})]
    results, errors = [], []
    for i, (kn, dt, h, b) in enumerate(jobs):
        if progress:
            progress(i, len(jobs), (kn, DTYPE_NAMES[dt], h, b))
        try:
            results.append(tune_key(kn, dt, h, b, directions, seq, quick=quick))
        except TuneKeyError as e:  # one key's failure must not cost the others: reported, logged, not written
            warnings.warn(str(e), RuntimeWarning, stacklevel=2)
            errors.append(e)
            if failed is not None:
                failed.append(e.key)
        else:
            if write:  # key by key: a run cut short keeps what it finished
                write_configs(cache_path(gpu), gpu, {results[-1].key: results[-1].best})
        if log_path:
            Path(log_path).write_text(json.dumps({"gpu": gpu, "triton": _triton_version(), "seq": seq, "keys": [
                {"key": r.key, "default": dataclasses.asdict(r.default), "default_ms": r.default_ms,
                 "best": dataclasses.asdict(r.best), "best_ms": r.best_ms, "current_source": r.current_source,
                 "current_ms": r.current_ms, "candidates": r.log}
                for r in results], "failed": [{"key": e.key, "error": str(e), "candidates": e.log} for e in errors]},
                indent=1))
    if progress:
        progress(len(jobs), len(jobs), None)
    return results


# ----------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from tritonlstm import bench

    ap = argparse.ArgumentParser(prog="python -m tritonlstm.tune", description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", default="256,512,1024")
    ap.add_argument("--batch", default="1,16,64,256")
    ap.add_argument("--dtypes", default=",".join(bench.DTYPES))
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--bidirectional", action="store_true", help="tune for layers run in both directions")
    ap.add_argument("--kernels", default="fwd,bwd")
    ap.add_argument("--dry-run", action="store_true", help="do not write the cache")
    ap.add_argument("--quick", action="store_true",
                    help="search only the heuristic's pick and the named variants (a dozen per key, not the grid)")
    ap.add_argument("--log", help="write every candidate's time to this JSON file")
    args = ap.parse_args(argv)
    args.hidden = bench.csv_ints(ap, "hidden", args.hidden)
    args.batch = bench.csv_ints(ap, "batch", args.batch)
    if args.seq < 1:
        ap.error(f"--seq must be >= 1, got {args.seq}")
    args.dtypes = bench.csv_choices(ap, "dtypes", args.dtypes, bench.DTYPES)
    args.kernels = bench.csv_choices(ap, "kernels", args.kernels, TUNABLE)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("tritonlstm.tune: no CUDA device, nothing to tune (the CPU interpreter always uses one config).")
        return 0
    from tritonlstm.bench import progress

    failed: list[str] = []
    results = tune(args.hidden, args.batch, args.dtypes, args.seq, args.bidirectional, args.kernels,
                   write=not args.dry_run, quick=args.quick, log_path=args.log, failed=failed,
                   progress=lambda i, n, job: progress(i, n, None if job is None else
                                                       (job[1], job[2], job[3], args.seq, 1, False, job[0])))
    # "default": the heuristic's pick; "before": what ran for the key until now where that was a cached or shipped
    # config (its time in this run; "-" where the heuristic's pick ran, or the config failed here).
    print(f"{'key':<34} {'default ms':>10} {'before ms':>9} {'tuned ms':>9} {'speed-up':>8}  tuned config")
    for r in results:
        c = r.best
        before = "-" if r.current_ms is None else f"{r.current_ms:.3f}"
        print(f"{r.key:<34} {r.default_ms:>10.3f} {before:>9} {r.best_ms:>9.3f} {r.speedup:>7.2f}x  BH={c.block_h} "
              f"BB={c.block_b} BK={c.block_k} resident={c.w_resident} Q={c.batch_groups} warps={c.num_warps}")
    if not args.dry_run:
        print(f"written to {cache_path(torch.cuda.get_device_name())}")
    if failed:
        print(f"not tuned (the default config failed; see the warnings): {', '.join(failed)}")
    return 1 if failed else 0

