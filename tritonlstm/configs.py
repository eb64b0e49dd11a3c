"""Launch configurations of the recurrence kernels: what they hold, how one is chosen.

Selection order (`select_config`): an override set by `use_config` (tests, the tuner); under the CPU
interpreter a single config; then the user's tuning cache, the configs shipped for this GPU, tuning on the spot
when TRITONLSTM_AUTOTUNE=1, and last the heuristic (see tritonlstm/tuning.py for the cache and the tuner). The
heuristic keeps each program's W_hh slice on chip (W_RESIDENT) whenever the four [H, BH] gate tiles fit the
shared-memory budget with no more programs than SMs; otherwise it streams W_hh from L2 in BK chunks every step.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools

import torch

# Shared memory one block may use on an H100 (sm_90), where the heuristic was built and measured; its budgets leave
# room for the compiler's own staging. GPUs with less (sm_80: 166912, sm_86 / sm_89: 101376) get its picks cut
# down to what fits by fit_shared_memory.
SM90_SHARED = 232448
_W_BUDGET = 128 * 1024
_MAX_BLOCK_H = 32
_DEFAULT_MAX_SPIN = 1 << 24
EXCHANGES = ("barrier", "cluster")
# Programs one thread-block cluster holds on an H100 (16 is non-portable; Triton's launcher allows it there).
MAX_CLUSTER = 16
# Clusters of more than 8 CTAs are non-portable: the launch must allow them (CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_
# SIZE_ALLOWED), which Triton 3.6's launcher sets for exactly 16 and no other size, so 9-15 would fail to launch.
MAX_PORTABLE_CLUSTER = 8


def cluster_size_ok(programs: int) -> bool:
    """Whether `programs` CTAs can be launched as one thread-block cluster through Triton's launcher."""
    return 1 <= programs <= MAX_PORTABLE_CLUSTER or programs == MAX_CLUSTER


@dataclasses.dataclass(frozen=True)
class LSTMConfig:
    block_h: int  # BH: hidden units per program
    block_b: int  # BB: batch rows per tile
    block_k: int  # BK: K chunk of the recurrent matmul
    w_resident: bool  # one chunk covers H and W_hh stays on chip for the whole sequence
    batch_groups: int = 1  # Q: programs along the batch; each loops over tiles i_q, i_q + Q, ...
    persistent: bool = True  # one launch for all steps (grid barrier) or one launch per step
    num_warps: int = 4
    num_stages: int = 1
    max_spin: int = _DEFAULT_MAX_SPIN  # barrier spins before it gives up and raises
    # How programs meet between steps to pass h_{t-1} (forward) or dG_{t+1} (backward): "barrier" (store, one
    # grid barrier per step, a counter in memory, load). (Flags, one per program polled without atomics, measured
    # slower than the counter on an H100, never the tuner's pick in 146 keys, and were removed: perf/NOTES.md
    # v0.19-v0.20, v0.52.) "cluster": the
    # P programs of a barrier launched as one thread-block cluster, met by Hopper's hardware cluster barrier
    # instead of a counter in memory (kernels/lstm.py _cluster_barrier; single layer, forward and backward,
    # P <= 8 or 16: cluster_size_ok; perf/NOTES.md v0.34). (Two more were built, measured slower than the cluster
    # barrier on an H200 and removed in v0.59: h_{t-1} through distributed shared memory, "dsmem", and through
    # 8-byte words tagged with their step and no barrier, "tagged"; perf/NOTES.md v0.39, v0.48, v0.55-v0.58.)
    exchange: str = "barrier"
    # Split-K ways of the recurrent dots (a batched dot, one warp per K slice, then a sum): with 16-row batch
    # tiles a plain dot stacks every warp along M, each computing the whole product (kernels/lstm.py
    # _gate_dots). block_k // split_k >= 16.
    split_k: int = 1
    # The forward's four gate dots as one dot over the gates' interleaved columns (kernels/lstm.py
    # _merged_gate_dots): its warps split the columns instead of all computing the same rows. Single-layer
    # forward only (the backward and the stacks ignore it); split_k = 1.
    merged_gates: bool = False
    # The forward's gate dots transposed, gates^T = W^T @ h^T (kernels/lstm.py _transposed_gate_dots): M = the
    # program's 4 * block_h gate rows instead of the batch tile, so that block_h = 16 makes one 64-row Hopper
    # warpgroup MMA (wgmma) at any batch (a single layer's and a stack's forward wavefront; perf/NOTES.md v0.18);
    # the forward takes block_h = 32 too (128 gate rows, half the programs: v0.34's cluster at H = 512).
    # A single layer's backward takes dh by reduce-scatter instead: each program multiplies its own 64 gate rows
    # of dG_t by their rows of W_hh (W^T @ dG^T, M = H, K = 64, on wgmma), stores that share of every unit's dh
    # and, after the barrier, sums the shares of its own units (kernels/lstm.py _scatter_partials, v0.24); the
    # stack's backward ignores it. W resident or streamed in block_k chunks, split_k = 1, block_h = 16.
    transposed: bool = False
    # A persistent single-layer forward whose programs own one batch tile each loads the next step's gx before
    # the barrier's wait and keeps c in registers (kernels/lstm.py PREFETCH; perf/NOTES.md v0.23). False: as
    # before, both loaded after the wait.
    prefetch: bool = True
    # The single-layer backward's recurrent product on a 2-D grid of programs (kernels/lstm.py lstm_bwd_2d_kernel,
    # perf/NOTES.md v0.26): program (a, b) multiplies unit block a's dG columns by W_hh's block to unit block b
    # (block_h units a block, NB = next power of two >= cdiv(H, block_h) blocks a side, NB^2 programs per batch
    # group), then owns block_h / NB units of block b for the gate arithmetic; two barriers per step. For large
    # batches: each program reads dG for its own K block, not all 4H columns. W resident, split_k = 1, not a
    # cluster; the forward kernels and the stacks ignore it.
    grid_2d: bool = False
    # Float32 forward on the transposed dots with W^T held in float16, scaled by a power of two into its range, and
    # h rounded to float16 likewise (kernels/lstm.py _half_weights, perf/NOTES.md v0.29): the same 10-bit mantissas
    # as TF32's operands, half the bytes, so W^T stays on chip where float32's would not (H = 1024, stacks at
    # H = 512) and the MMA runs at float16's rate. Only where PyTorch's RNN precision allows TF32: elsewhere the
    # launcher runs without_half_w(config). A single layer's backward takes it on the 2-D grid and on tiles with W
    # resident (kernels/lstm.py _half_dots, _half_grad_dot; perf/NOTES.md v0.40, v0.41): W in float16, and
    # each row of dG scaled by its own power of two, which keeps TF32's range where one scale for all of dG would
    # not; so float32 takes 16-bit's tiles. Its reduce-scatter (transposed) ignores it.
    half_w: bool = False

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v, kind = getattr(self, f.name), f.type if isinstance(f.type, str) else f.type.__name__
            if kind == "int" and (not isinstance(v, int) or isinstance(v, bool)):
                raise TypeError(f"LSTMConfig.{f.name} must be an int, got {type(v).__name__} {v!r}")
            if kind == "bool" and not isinstance(v, bool):
                raise TypeError(f"LSTMConfig.{f.name} must be a bool, got {type(v).__name__} {v!r}")
        if self.num_warps not in (1, 2, 4, 8, 16, 32):
            raise ValueError(f"LSTMConfig.num_warps must be a power of two up to 32, got {self.num_warps}")
        if self.num_stages < 1 or self.max_spin < 0:
            raise ValueError(f"LSTMConfig: num_stages must be >= 1 and max_spin >= 0, got num_stages="
                             f"{self.num_stages}, max_spin={self.max_spin}")
        if self.exchange not in EXCHANGES:
            raise ValueError(f"LSTMConfig.exchange must be one of {EXCHANGES}, got {self.exchange!r}")
        for name in ("block_h", "block_b", "block_k"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"LSTMConfig.{name} must be a power of two, got {v}")
        if self.block_k < 16:
            raise ValueError(f"LSTMConfig.block_k must be >= 16 (tl.dot's K), got {self.block_k}")
        if self.split_k < 1 or self.split_k & (self.split_k - 1):
            raise ValueError(f"LSTMConfig.split_k must be a power of two, got {self.split_k}")
        if self.block_k // self.split_k < 16:
            raise ValueError(f"LSTMConfig.split_k: block_k // split_k must be >= 16 (tl.dot's K), got block_k="
                             f"{self.block_k}, split_k={self.split_k}")
        if self.merged_gates and self.split_k > 1:
            raise ValueError(f"LSTMConfig.merged_gates needs split_k=1, got split_k={self.split_k}")
        if self.transposed and (self.block_h not in (16, 32) or self.split_k > 1 or self.merged_gates):
            raise ValueError(f"LSTMConfig.transposed needs block_h 16 (32: the forward), split_k=1 and "
                             f"merged_gates=False, got block_h={self.block_h}, split_k={self.split_k}, merged_gates="
                             f"{self.merged_gates}")
        if self.grid_2d and (self.split_k > 1 or self.merged_gates or self.transposed or not self.w_resident
                             or self.block_h < 16):
            raise ValueError(f"LSTMConfig.grid_2d needs block_h >= 16, W resident, split_k=1 and no merged or "
                             f"transposed dots, got block_h={self.block_h}, w_resident={self.w_resident}, split_k="
                             f"{self.split_k}, merged_gates={self.merged_gates}, transposed={self.transposed}")
        if self.half_w and not (self.transposed or self.w_resident):
            raise ValueError(f"LSTMConfig.half_w needs transposed=True (the forward's dots) or W resident (the "
                             f"backward's), got transposed={self.transposed}, w_resident={self.w_resident}")
        if self.clustered and not self.persistent:
            raise ValueError(f"LSTMConfig.exchange={self.exchange!r} is a persistent launch's barrier, got "
                             "persistent=False")
        if self.clustered and self.grid_2d:
            raise ValueError(f"LSTMConfig.exchange={self.exchange!r} is for the one-dimensional grids, got "
                             "grid_2d=True")
        if self.batch_groups < 1:
            raise ValueError(f"LSTMConfig.batch_groups must be >= 1, got {self.batch_groups}")

    @property
    def clustered(self) -> bool:
        """The programs of a barrier launched as one thread-block cluster (exchange "cluster")."""
        return self.exchange == "cluster"

    def prefetches(self, batch: int, hidden: int) -> bool:
        """Whether a single-layer launch loads each step's own inputs before the barrier (the kernels' PREFETCH:
        the forward its gx, the backward its saved gates, c_t, c_{t-1} and dy): asked for (prefetch),
        persistent (a stepwise launch runs one step), every program owning one batch tile, not on the 2-D grid,
        and H a multiple of 16 (unaligned tiles at the register limit
        spill: 8 bytes in the 16-bit backward at H = 1025, compile-only)."""
        return (self.prefetch and self.persistent and not self.grid_2d and hidden % 16 == 0
                and cdiv(batch, self.block_b) <= self.batch_groups)

    def covers_k(self, hidden: int) -> bool:
        """Whether the kernels read all of W's K: a resident W is read as one [.., block_k] chunk, so block_k must
        reach H (a grid_2d config's block_k is its unit block, not a K chunk)."""
        return not self.w_resident or self.grid_2d or self.block_k >= hidden

    def programs(self, hidden: int) -> int:
        if self.grid_2d:
            return grid_2d_blocks(hidden, self.block_h) ** 2 * self.batch_groups
        return cdiv(hidden, self.block_h) * self.batch_groups


def grid_2d_blocks(hidden: int, block_h: int) -> int:
    """NB of a grid_2d backward: unit blocks a side, a power of two (each program owns block_h / NB units of its
    block in the gate phase); blocks past H are empty. block_h must be at least NB."""
    nb = _pow2(cdiv(hidden, block_h))
    if block_h < nb:
        raise ValueError(f"LSTMConfig.grid_2d: block_h={block_h} is below the {nb} blocks H={hidden} makes (each "
                         "program owns block_h / blocks units)")
    return nb


def with_split_k(config: LSTMConfig) -> LSTMConfig:
    """One warp per K slice where the chunk gives 4 or more slices of >= 16 (LSTMConfig.split_k says why)."""
    ways = min(8, config.block_k // 16)
    if ways < 4 or config.merged_gates or config.transposed:
        return config
    return dataclasses.replace(config, split_k=ways, num_warps=ways)


def measured_split(kernel: str, hk: int, esize: int) -> int:
    """split_k of the heuristic's resident single-layer configs, from an H100 A/B of the recurrence kernels
    alone (perf/kernel_ab.py, 2026-11-26; perf/NOTES.md v0.9; num_warps = split_k when split, else 4). The
    fewer warps the better while the 16-row tile leaves warps computing copies of each other's work: the
    forward is fastest unsplit on 4 warps up to K = 512 (0.70-0.85x the 8-warp step) and split at K = 1024
    (4 ways in 16-bit, 8 in fp32); the backward split 4 ways (0.44-0.67x the unsplit step at B = 16), 8 at
    K = 1024 (fp32: 0.59x against 4 ways' 0.91x; 16-bit: as fast as 4 ways, for which a compile-only check
    without a launch's specialisation showed 28 KB of spills; with it, 540 B at H = 1024: NOTES v0.18).
    Several of these spill registers (compilecheck lists them; measured faster all the same). The stacks'
    wavefronts (two dots per step) were not measured split and stay as they were."""
    if kernel == "fwd":
        return (4 if esize < 4 else 8) if hk >= 1024 else 1
    if kernel == "bwd":
        return 8 if hk >= 1024 else 4 if hk >= 64 else 1
    return 1


# stack, stack_bwd: the forward and backward wavefronts of a unidirectional multi-layer LSTM
KERNELS = ("fwd", "bwd", "stack", "stack_bwd")
_override: contextvars.ContextVar[dict | None] = contextvars.ContextVar("tritonlstm_config", default=None)


def for_kernel(config: LSTMConfig, kernel: str) -> LSTMConfig:
    """`config` as `kernel` runs it: grid_2d is the single-layer backward's layout alone, and every other kernel
    runs the config's tiles without it (its programs counted as the tiles', not as the 2-D grid's NB^2 * Q; where
    its block_k, the grid's unit block, is below H with W resident, the launchers refuse it)."""
    return dataclasses.replace(config, grid_2d=False) if config.grid_2d and kernel != "bwd" else config


@contextlib.contextmanager
def use_config(config: LSTMConfig | None, kernel: str | None = None):
    """Forces the recurrence launches inside the block to use `config`: every kernel, or only `kernel` ("fwd",
    "bwd", "stack" or "stack_bwd"). None restores the normal choice."""
    if config is not None and not isinstance(config, LSTMConfig):
        raise TypeError(f"config must be an LSTMConfig or None, got {type(config).__name__} {config!r}")
    if kernel is not None and kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS} or None, got {kernel!r}")
    current = dict(_override.get() or {})
    for k in ((kernel,) if kernel else KERNELS):
        current[k] = config
    token = _override.set(current)
    try:
        yield
    finally:
        _override.reset(token)


def _pow2(n: int) -> int:
    """Smallest power of two >= n (and >= 1)."""
    return 1 << max(int(n) - 1, 0).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def batch_groups(hidden: int, batch: int, block_h: int, block_b: int, num_sms: int, group: int | None = None) -> int:
    """Q, the programs along the batch: one per batch tile, as many as the SMs left by a group's programs (the
    cdiv(hidden, block_h) along the hidden units, or `group`) allow, at least one."""
    return max(1, min(cdiv(batch, block_b), num_sms // (group or cdiv(hidden, block_h))))


def heuristic_config(hidden: int, batch: int, dtype: torch.dtype, num_sms: int | None,
                     interpreter: bool = False, directions: int = 1, layers: int = 1,
                     kernel: str = "fwd", measured: bool = True) -> LSTMConfig:
    """A config that compiles within shared memory and keeps every program of `directions` concurrent
    directions (or `layers` concurrent layers of a wavefront stack) resident: each gets its share of the SMs,
    and a stack's programs hold two weight slices (W_ih and W_hh) in the shared-memory budget. A resident
    single-layer config splits K as `measured_split` says, at BH <= 16 when split (BH = 32 spills registers
    there: the reduced tile is replicated in every warp). With `measured`, the forward kernels ("fwd", "stack")
    then take the layout that won the H100 A/B (`measured_forward_layout`); without it, these tiles alone (the
    A/B's "unsplit" baseline, configs.named_variants).

    num_sms None (or interpreter=True) means the CPU interpreter: one program where the shape allows,
    stepwise launches otherwise."""
    hk = max(16, _pow2(hidden))
    if measured and kernel in ("fwd", "stack") and not interpreter and num_sms is not None:
        return measured_forward_layout(hidden, batch, dtype, num_sms, directions, layers)
    if measured and kernel == "bwd" and directions == 1 and layers == 1 and not interpreter and num_sms is not None:
        return measured_backward_layout(hidden, batch, dtype, num_sms)
    if interpreter or num_sms is None:
        bh = min(_pow2(hidden), _MAX_BLOCK_H)
        bb = min(_pow2(batch), 32)
        single = cdiv(hidden, bh) == 1 and directions == 1 and layers == 1
        sk = measured_split(kernel, hk, dtype.itemsize) if layers == 1 else 1
        return LSTMConfig(block_h=bh, block_b=bb, block_k=hk, w_resident=True, batch_groups=1, persistent=single,
                          split_k=sk, num_warps=max(4, sk))

    num_sms //= directions * layers
    w_budget = _W_BUDGET // (2 if layers > 1 else 1)
    esize = dtype.itemsize
    # 16 batch rows per tile (the MMA's M): larger tiles spill registers on sm_90 (compilecheck sweeps,
    # 2026-11-26); more rows go to more batch groups or more tiles per program.
    bb = 16
    # Largest BH in [8, 32] (8 is the MMA's N) whose four gate tiles fit the budget; fp32 at H >= 256 spills
    # registers above 16.
    bh = max(8, min(_pow2(hidden), _MAX_BLOCK_H if esize < 4 or hk < 256 else 16))
    if layers > 1 and hk >= 512:
        # A stack's two in-loop dots spill at BH = 32 there; BH = 16 only where 8 would give a layer more
        # programs than its share of the SMs (4 layers at H = 512: resident at 16, 48-64 bytes of spills,
        # instead of W streamed from L2 in 32-wide chunks, 32 dependent loads per step; perf/NOTES.md v0.13).
        bh = 8 if cdiv(hidden, 8) <= num_sms else 16
    while bh > 8 and 4 * hk * bh * esize > w_budget:
        bh //= 2
    resident = hk <= 1024 and 4 * hk * bh * esize <= w_budget and cdiv(hidden, bh) <= num_sms
    sk = measured_split(kernel, hk, esize) if resident and layers == 1 else 1
    if sk > 1 and cdiv(hidden, min(bh, 16)) > num_sms:
        sk = 1  # split tiles are 16 units wide: their programs would not all be resident (GPUs below 64 SMs)
    if sk > 1:
        bh = min(bh, 16)
    if resident:
        bk = hk
        if layers == 1:
            warps = max(4, sk)  # measured (measured_split), though 4 unsplit warps spill from K = 128 on
        else:
            # The whole-K dot holds its operands in registers: a stack's two dots spill on 4 warps (compilecheck).
            warps = 4 if hk <= 16 else 8
    else:
        # W_hh streamed from L2 in K chunks (compilecheck: fp32 spills at 64, and a stack's two dots with
        # dropout at 64 for 16-bit, 32 for fp32).
        bh, bk, warps = 16, (64 if layers == 1 else 32) if esize < 4 else (32 if layers == 1 else 16), 4
        if cdiv(hidden, bh) > num_sms:
            # Wider blocks spill registers (compilecheck, BH = 64 at H = 4096): one launch per step instead,
            # where the programs need not be resident together.
            return LSTMConfig(block_h=bh, block_b=bb, block_k=bk, w_resident=False, batch_groups=cdiv(batch, bb),
                              persistent=False, num_warps=warps)
    groups = batch_groups(hidden, batch, bh, bb, num_sms)
    # The 16-bit backward is faster on the split tiles than on wide ones even where they walk 4-8 tiles (0.72-0.85x
    # at B = 256, H = 512 and 1024, run 4's tuner log); fp32's is not (1.0-3.1x).
    wide_kernels = ("fwd", "bwd") if esize == 4 or not measured else ("fwd",)
    if layers == 1 and kernel in wide_kernels and cdiv(cdiv(batch, bb), groups) >= WIDE_TILE_WALKS \
            and cdiv(hidden, 16) <= num_sms:
        return wide_tile_config(hidden, batch, esize, num_sms, kernel)
    return LSTMConfig(block_h=bh, block_b=bb, block_k=bk, w_resident=resident, batch_groups=groups, persistent=True,
                      num_warps=warps, split_k=sk)


# A program that would walk this many 16-row tiles per step takes 64-row tiles with W streamed instead.
WIDE_TILE_WALKS = 4


@functools.lru_cache(maxsize=256)  # an LSTMCell step asks each call; configs are frozen
def without_half_w(config: LSTMConfig, backward_standin: LSTMConfig | None = None) -> LSTMConfig:
    """A half_w config's stand-in where the dots must keep float32 operands (TF32 not allowed), or where W is
    16-bit already: the transposed dots' tiles with W^T streamed in float32 from L2 (32-wide K chunks, 3 stages),
    which fits at any H; a backward's (2-D grid or tiles), whose W must stay on chip, as backward_standin (float32:
    the layout the heuristic picks without half_w) or, without one (16-bit), as it is without the flag."""
    if not config.half_w:
        return config
    if not config.transposed:  # a backward's
        return backward_standin if backward_standin is not None else dataclasses.replace(config, half_w=False)
    return dataclasses.replace(config, half_w=False, w_resident=False, block_k=32, num_stages=3)


def transposed_fits(hidden: int, esize: int, layers: int = 1) -> bool:
    """Whether a transposed config can keep its W^T slices resident: 64 gate rows over the whole K (a stack's
    programs hold W_ih^T too) within the shared-memory budget."""
    return (2 if layers > 1 else 1) * 64 * max(16, _pow2(hidden)) * esize <= _W_BUDGET


def measured_forward_layout(hidden: int, batch: int, dtype: torch.dtype, num_sms: int, directions: int = 1,
                            layers: int = 1) -> LSTMConfig:
    """The forward kernels' layout from the H100 A/B (perf/NOTES.md v0.20: run 4's tuner log over every
    named variant of the single-layer matrix, run 5's stack A/B), as a rule of the shape:

    - a stack's wavefront: the transposed gate dots where W^T and W_ih^T stay resident (16-bit up to K = 512:
      3.6 us per step against 6.6 at 2 layers and 9.5 at 4, H = 512, B = 16); otherwise the tiles.
    - one batch tile (B <= 16): the transposed dots, W^T resident (0.48-0.59x the old heuristic's step at every
      H and dtype where they fit); otherwise (fp32 K = 1024) the merged gate dot (0.82x).
    - up to 64 rows with a short K (K * element size <= 1 KB), and more rows with <= 512 B: the merged gate dot on
      16-row tiles (0.52-0.67x; the transposed dots' 64-row tiles 0.83-1.13x there).
    - otherwise the transposed dots: W^T resident on 16-row tiles up to 64 rows (0.45-0.48x), streamed on
      64-row tiles beyond, or where W^T does not fit (0.47-0.56x, against the wide tiles' 1.0).
    The transposed dots only where H is a multiple of 16, like every measured shape: elsewhere their unaligned
    tiles spill registers in the compile-only check (536-1268 bytes at H = 129, 257, 513), and the merged dot or
    the tiles stand in; the merged dot only on resident tiles, where it was measured. Shapes whose programs would
    not fit the SMs keep the tiles of `heuristic_config(measured=False)`."""
    share = num_sms // (directions * layers)
    kernel = "stack" if layers > 1 else "fwd"
    tiles = heuristic_config(hidden, batch, dtype, num_sms, directions=directions, layers=layers, kernel=kernel,
                             measured=False)
    esize = dtype.itemsize
    kbytes = max(16, _pow2(hidden)) * esize
    if cdiv(hidden, 16) > share or not tiles.persistent:
        return tiles
    aligned = hidden % 16 == 0
    resident = transposed_fits(hidden, esize, layers) and aligned
    if layers > 1:
        # float32 W^T and W_ih^T that do not fit, held in float16 instead (LSTMConfig.half_w; the launcher keeps
        # float32 operands where TF32 is not allowed), resident as 16-bit layers' are: every float32 variant of
        # run 5's stack A/B streamed or split its tiles (7.3-45 us per step against 16-bit's transposed 3.6;
        # perf/NOTES.md v0.29). Single float32 layers take it below, since run 6 measured it (v0.38).
        half = esize == 4 and aligned and not resident and transposed_fits(hidden, 2, layers)
        return transposed_config(hidden, batch, esize, share, 16, half_w=half) if resident or half else tiles
    if esize == 4 and aligned and directions == 1 and transposed_fits(hidden, 2) and (batch <= 64 or hidden <= 256):
        # Run 6's float32 re-tune (v0.38): W^T in float16 won 9 of the 12 keys (0.65-0.93x the shipped step), and
        # at H = 256, B <= 16 it came second only to the cluster barrier, which is Hopper's alone.
        return transposed_config(hidden, batch, esize, share, 16, half_w=True)
    if batch >= 128 and hidden >= 1024 and aligned and directions == 1:
        # 128-row tiles with W^T streamed once for them (v0.36): 0.69-0.75x the 64-row tiles' step in run 6 at
        # H = 1024, B = 256, every dtype; at H = 512 they lost (fp32: 1.28x).
        return dataclasses.replace(transposed_config(hidden, batch, esize, share, 128, streamed=True), num_warps=8)
    plain = heuristic_config(hidden, batch, dtype, num_sms, directions=directions, kernel="none", measured=False)
    # Measured on resident tiles only (streamed, untimed, it spills 16 bytes at 8 warps): the tiles elsewhere.
    merged = dataclasses.replace(plain, merged_gates=True, num_warps=8) if plain.w_resident else tiles
    if batch <= 16:
        return transposed_config(hidden, batch, esize, share, 16) if resident else merged
    if kbytes <= (1024 if batch <= 64 else 512):
        return merged
    if not aligned:
        return tiles
    if batch <= 64 and resident:
        return transposed_config(hidden, batch, esize, share, 16)
    return transposed_config(hidden, batch, esize, share, 64 if batch >= 64 else 16, streamed=True)


def measured_backward_layout(hidden: int, batch: int, dtype: torch.dtype, num_sms: int,
                             half_w: bool = True) -> LSTMConfig:
    """A single direction's backward layout from run 6's tuner log (H100, every named variant at the 36 keys of
    the single-layer matrix; perf/NOTES.md v0.38), as a rule of the shape:

    - the 2-D grid in 16-bit at H = 512 from 128 rows and at H >= 1024 from 64 (0.44-0.55x the split tiles' time;
      at H = 512, B = 64 it took 1.39x), and in fp32 at H = 512 from 128 rows (0.62x); fp32 at H = 1024 kept the
      split or wide tiles.
    - the reduce-scatter tiles up to 64 rows at H <= 256, and in fp32 at H = 512 (0.78-0.98x). Their cluster
      barrier was faster still at H = 256 (0.68-0.78x), but clusters launch on Hopper alone: the tuner, or the
      shipped configs of an H100, pick it.
    - unsplit tiles on 4 warps at H <= 256 in 16-bit from 128 rows (0.75x).
    - otherwise the tiles of `heuristic_config(measured=False)` (16-bit H = 512 up to 64 rows and H = 1024 up to
      16: the split tiles stayed best).
    Only where H is a multiple of 16, like every measured shape.

    And from run 7's (H200, perf/NOTES.md v0.44): float32 above H = 512 from 64 rows on the 2-D grid with float16
    operands (v0.40: 0.25x and 0.51x the shipped split / wide tiles' time at H = 1024, B = 64 and 256; at H = 512,
    B = 64 it took 1.65x the shipped config's). With half_w=False (TF32 not allowed: W must stay float32) the layout
    without it."""
    tiles = heuristic_config(hidden, batch, dtype, num_sms, kernel="bwd", measured=False)
    esize = dtype.itemsize
    if hidden % 16 or not tiles.persistent or cdiv(hidden, 16) > num_sms:
        return tiles
    if half_w and esize == 4 and hidden > 512 and batch >= 64:
        grid = grid_2d_config(hidden, batch, esize, num_sms, half_w=True)
        if grid is not None:
            return grid
    if hidden >= 512 and batch >= (64 if esize < 4 and hidden >= 1024 else 128) and (esize < 4 or hidden <= 512):
        grid = grid_2d_config(hidden, batch, esize, num_sms)
        if grid is not None:
            return grid
    if batch <= 64 and (hidden <= 256 or esize == 4 and hidden <= 512) and hidden > 16 \
            and transposed_fits(hidden, esize) \
            and cdiv(batch, 16) <= batch_groups(hidden, batch, 16, 16, num_sms):
        return reduce_scatter_config(hidden, batch, esize, num_sms)
    if esize < 4 and hidden <= 256 and batch >= 128 and tiles.w_resident:
        return heuristic_config(hidden, batch, dtype, num_sms, kernel="none")  # (named_variants' "unsplit-w4")
    return tiles


def wide_tile_config(hidden: int, batch: int, esize: int, num_sms: int, kernel: str) -> LSTMConfig:
    """64-row batch tiles, W streamed from L2 in K chunks (pipelined, 3 stages), 8 warps: a 64-row dot puts 4
    warps along M and 2 along N, so no warp repeats another's work, where a 16-row tile stacks all warps on the
    same 16 rows and a program pays that replicated chain once per 16 rows (run 1: +9-10 us per extra tile at
    H = 1024; run 3: fp16 H = 1024 B = 256 at 56.8 us per step, 8 tiles per program). Resident W cannot take
    64-row tiles: the whole-K x tile then needs 128 KB of shared memory and spills 3-10 KB (compile-only,
    2026-11-27). Compile-only: no spills at 8 warps with these K chunks (the backward spills 244 B at 64).
    Measured in run 4 (perf/NOTES.md v0.15): fp16 H = 1024 B = 256 forward 56.8 -> 27 us per step; the transposed
    streamed dots beat it since (v0.20), and it stays the fp32 backward's pick at large batches."""
    bk = 64 if esize < 4 and kernel == "fwd" else 32
    groups = batch_groups(hidden, batch, 16, 64, num_sms)
    return LSTMConfig(block_h=16, block_b=64, block_k=bk, w_resident=False, batch_groups=groups, persistent=True,
                      num_warps=8, num_stages=3)


def transposed_config(hidden: int, batch: int, esize: int, num_sms: int, block_b: int,
                      streamed: bool = False, half_w: bool = False) -> LSTMConfig:
    """The transposed gate dots' tiles (LSTMConfig.transposed, perf/NOTES.md v0.18): 16 units per program (64
    gate rows, one warpgroup MMA), 4 warps, block_b batch rows per tile, as many batch groups as the num_sms
    allow; W^T resident over the whole K, or streamed from L2 in K chunks of 64 (16-bit) or 32 (fp32) over a
    3-stage pipeline. half_w: W^T resident in float16 (float32 layers; LSTMConfig.half_w)."""
    groups = batch_groups(hidden, batch, 16, block_b, num_sms)
    if streamed:
        return LSTMConfig(block_h=16, block_b=block_b, block_k=64 if esize < 4 else 32, w_resident=False,
                          batch_groups=groups, num_warps=4, num_stages=3, transposed=True)
    return LSTMConfig(block_h=16, block_b=block_b, block_k=max(16, _pow2(hidden)), w_resident=True,
                      batch_groups=groups, num_warps=4, transposed=True, half_w=half_w)


def reduce_scatter_config(hidden: int, batch: int, esize: int, num_sms: int, streamed: bool = False) -> LSTMConfig:
    """The single-layer backward's reduce-scatter tiles (LSTMConfig.transposed, perf/NOTES.md v0.24): 16 units per
    program (its 64 gate rows are the K of the W^T @ dG^T product), 16-row batch tiles, 8 warps (two warpgroups
    over each 128-unit chunk of the product), W^T resident over the whole H, or streamed from L2 in 64-unit
    chunks over a 3-stage pipeline. Compile-only (sm_90, B = 16, prefetch): no spills at H 256-1024 in any
    dtype, resident where W^T fits (transposed_fits) and streamed; 4 warps spill 40-800 bytes from H = 512."""
    groups = batch_groups(hidden, batch, 16, 16, num_sms)
    if streamed:
        return LSTMConfig(block_h=16, block_b=16, block_k=64, w_resident=False, batch_groups=groups, num_warps=8,
                          num_stages=3, transposed=True)
    return LSTMConfig(block_h=16, block_b=16, block_k=max(16, _pow2(hidden)), w_resident=True, batch_groups=groups,
                      num_warps=8, transposed=True)


def grid_2d_config(hidden: int, batch: int, esize: int, num_sms: int, block_b: int | None = None,
                   half_w: bool = False) -> LSTMConfig | None:
    """The single-layer backward on a 2-D grid (LSTMConfig.grid_2d, perf/NOTES.md v0.26): the widest unit block
    (128, 64 or 32) whose four [block, block] W_hh tiles fit the shared-memory budget and whose NB^2 programs fit
    the SMs; block_b rows per tile, by default 32 at 128-unit blocks (64 rows there spill 144-212 bytes,
    compile-only sm_90, but run the product on wgmma, which 32 rows do not), else 64; 8 warps. half_w: float32's
    W block in float16 (LSTMConfig.half_w, v0.40), sized as 16-bit's. None where no block fits."""
    wsize = 2 if half_w else esize
    for bu in (128, 64, 32):
        nb = _pow2(cdiv(hidden, bu))
        if 4 * bu * bu * wsize <= _W_BUDGET and nb * nb <= num_sms and bu >= nb:
            bb = block_b or (32 if bu == 128 else 64)
            groups = batch_groups(hidden, batch, bu, bb, num_sms, group=nb * nb)
            return LSTMConfig(block_h=bu, block_b=bb, block_k=bu, w_resident=True, batch_groups=groups, num_warps=8,
                              grid_2d=True, half_w=half_w)
    return None


def stack_backward_config(hidden: int, batch: int, dtype: torch.dtype, num_sms: int | None, layers: int,
                          interpreter: bool = False, measured: bool = True) -> LSTMConfig:
    """The reverse wavefront of a stack: the forward stack's choice, except where its two sets of four gate dots
    per step (dG_{t+1} @ W_hh and the layer above's dG_t @ W_ih) spill registers (compile-only sweeps,
    2026-11-26/27, dropout included): whole-K resident tiles up to K = 512 in fp32 (492 bytes of spills at
    K = 512, against W streamed in 16-wide chunks: 64 dependent loads per step, 2 layers' training at 0.98x
    cuDNN in run 1; perf/NOTES.md v0.13), K = 512 in 16-bit; 4 warps at K = 64 (16-bit); otherwise streamed,
    32-wide K chunks (16-bit) and 8 warps (fp32) where the programs fit, else one launch per step."""
    cfg = heuristic_config(hidden, batch, dtype, num_sms, interpreter=interpreter, layers=layers, kernel="stack_bwd")
    if interpreter or num_sms is None:
        return cfg
    hk = max(16, _pow2(hidden))
    esize = dtype.itemsize
    if cfg.w_resident and hk * esize <= 2048 and hk <= 512:
        cfg = dataclasses.replace(cfg, num_warps=4) if hk == 64 and esize == 2 else cfg
        bh = min(cfg.block_h, 16)
        # Split 4 ways over 4 warps, BH <= 16: 0.40-0.74x the step of these tiles in every resident row of run 5's
        # stack A/B (2 and 4 layers, H = 512, B = 16, each dtype; perf/NOTES.md v0.20). Not at unaligned H (880
        # bytes of spills at fp32 H = 257), nor where 16-unit programs would not all be resident (small GPUs).
        if measured and hk >= 64 and hidden % 16 == 0 and cdiv(hidden, bh) <= num_sms // layers:
            cfg = dataclasses.replace(cfg, block_h=bh, split_k=4, num_warps=4,
                                      batch_groups=batch_groups(hidden, batch, bh, cfg.block_b, num_sms // layers))
        return cfg
    bh, bk = 16, 32 if esize < 4 else 16
    if cdiv(hidden, bh) > num_sms // layers:
        return LSTMConfig(block_h=bh, block_b=16, block_k=bk, w_resident=False, batch_groups=cdiv(batch, 16),
                          persistent=False, num_warps=8)
    groups = batch_groups(hidden, batch, bh, 16, num_sms // layers)
    return LSTMConfig(block_h=bh, block_b=16, block_k=bk, w_resident=False, batch_groups=groups, persistent=True,
                      num_warps=4 if esize < 4 else 8)


def stack_layers_per_launch(hidden: int, batch: int, dtype: torch.dtype, num_sms: int, layers: int,
                            smem_limit: int = SM90_SHARED, training: bool = True) -> int:
    """How many layers of a unidirectional stack one wavefront launch runs: all of them, unless their weights
    cannot stay on chip together while fewer layers' can; then the stack runs as consecutive wavefronts of that
    many layers. fp32 at H = 512: 4 layers stream W from L2 at 40-45 us per step in every variant of run 5's
    stack A/B, where a 2-layer wavefront keeps W resident at 10-11 us (perf/NOTES.md v0.22). Without training
    (no backward to follow) only the forward's weights count: with W^T in float16 (LSTMConfig.half_w) a float32
    forward keeps 4 layers at H = 512 on chip, where its backward keeps 2 (perf/NOTES.md v0.29)."""
    def resident(n: int) -> bool:
        fwd = heuristic_config(hidden, batch, dtype, num_sms, layers=n, kernel="stack")
        if not fit_shared_memory(fwd, "stack", hidden, batch, dtype, num_sms, smem_limit, layers=n).w_resident:
            return False
        if not training:
            return True
        bwd = stack_backward_config(hidden, batch, dtype, num_sms, n)
        return fit_shared_memory(bwd, "stack_bwd", hidden, batch, dtype, num_sms, smem_limit, layers=n).w_resident
    if layers <= 2 or resident(layers):
        return layers
    return next((n for n in range(layers - 1, 1, -1) if resident(n)), layers)


# Shared memory the compiler adds to the estimate's terms (2 KB seen at H = 33: scratch of a layout conversion).
_SHARED_MARGIN = 2048


def shared_bytes(config: LSTMConfig, kernel: str, hidden: int, esize: int, paired: bool = False) -> int:
    """Shared memory of one program of `config`, an upper estimate from the compile-only sweeps (sm_90 and sm_89
    compile to the same figures; tests/test_compilecheck.py keeps it at or above the compiled one for every config
    the heuristic picks and the named variants): the weight slices it keeps resident (a stack's two: W_ih and W_hh),
    or num_stages K chunks of them when streamed, and the h_{t-1} tile the dot reads (the backward's dG_{t+1}
    chunk spans four gates' columns, 4 KB more), or a transposed dot's chunk of it (at least 8 KB; 12 KB for the
    backward's reduce-scatter) or its product's layout change, whichever is larger. paired: a split-K backward that
    loads dG_{t+1}'s gates two at a time (kernels.lstm.pairs_gates) holds a second gate's operand, block_b x K."""
    hk = max(16, _pow2(hidden))
    slices = 2 if kernel in ("stack", "stack_bwd") else 1
    backward = kernel in ("bwd", "stack_bwd")
    bh, bb, bk, stages = config.block_h, config.block_b, config.block_k, config.num_stages
    # W's width: float16 where half_w applies (the forward kernels' transposed dots, a single layer's backward but
    # its reduce-scatter; kernels/lstm.py _half_w).
    wsize = 2 if config.half_w and config.transposed == (kernel in ("fwd", "stack")) and kernel != "stack_bwd" \
        else esize
    if config.grid_2d and kernel == "bwd":
        return 4 * bh * bh * wsize + 2 * bb * bh * esize + _SHARED_MARGIN
    if config.transposed and kernel != "stack_bwd":  # the stack's backward ignores `transposed`
        rows = 4 * bh  # the program's gate rows of W^T
        if config.w_resident:
            if backward:
                return slices * rows * hk * wsize + 12288 + _SHARED_MARGIN
            from tritonlstm.kernels import lstm  # h's chunk, as the launch sizes it

            half_h = lstm.half_h_applies(config, esize, kernel)
            kc = lstm.transposed_chunk(config, esize, stack=kernel == "stack", half_h=half_h)
            # h's chunk, or the [4 * BH, BB] float32 product's layout change after the dot where that is larger
            # (16-32 KB at BB = 64); with h in several chunks, 8 warps keep 4 KB more live (compile-only sm_90).
            scratch = max(bb * kc * (2 if half_h else esize), rows * bb * 4, 8192) + (4096 if kc < hk else 0)
            return slices * rows * hk * wsize + scratch + _SHARED_MARGIN
        return stages * (slices * rows * bk * wsize + bb * bk * esize) + _SHARED_MARGIN
    if config.w_resident:
        # At K <= 32 the scratch outgrows the tile: 4 KB in all (a merged dot's at H = 17-32: 12288 bytes).
        return slices * 4 * hk * bh * wsize + max(bb * hk * esize + _SHARED_MARGIN, 4096) + \
            (bb * hk * esize if paired else 0)
    if backward:
        return stages * (slices * 4 * bk * bh + bb * 4 * bk) * esize + 4096 + _SHARED_MARGIN
    return stages * (slices * 4 * bk * bh + bb * bk) * esize + _SHARED_MARGIN


def fit_shared_memory(config: LSTMConfig, kernel: str, hidden: int, batch: int, dtype: torch.dtype, num_sms: int,
                      smem_limit: int, directions: int = 1, layers: int = 1) -> LSTMConfig:
    """`config` if it fits `smem_limit` bytes of shared memory per block (shared_bytes), else the nearest config
    that does, first of: the transposed dots with W^T streamed; the same tiles with half the units per program (down
    to 8, while the programs fit the SMs); W streamed in 32-wide K chunks (16 in float32); one launch per step.
    Every pick of the H100 heuristic fits an H100 (232448 bytes) unchanged; on an sm_86 / sm_89 GPU (101376 bytes)
    a launch of the unfitted pick fails with Triton's OutOfResources (fp16 H >= 512, fp32 H >= 256)."""
    esize = dtype.itemsize

    def fits(cfg):
        return shared_bytes(cfg, kernel, hidden, esize) <= smem_limit

    if fits(config):
        return config
    share = max(1, num_sms // (directions * layers))
    tries = []
    if config.transposed and config.w_resident and kernel != "stack_bwd":
        tries.append(reduce_scatter_config(hidden, batch, esize, share, streamed=True) if kernel == "bwd" else
                     transposed_config(hidden, batch, esize, share, config.block_b, streamed=True))
    if config.w_resident and not config.transposed and not config.grid_2d:
        bh = config.block_h // 2
        while bh >= 8 and cdiv(hidden, bh) <= share:
            tries.append(dataclasses.replace(config, block_h=bh, batch_groups=batch_groups(
                hidden, batch, bh, config.block_b, share) if config.persistent else config.batch_groups))
            bh //= 2
    last = last_resort_config(kernel, batch, dtype)
    if cdiv(hidden, 16) <= share:
        tries.append(dataclasses.replace(last, block_k=32 if esize < 4 else 16, persistent=True,
                                         batch_groups=batch_groups(hidden, batch, 16, 16, share)))
    tries.append(last)
    return next((c for c in tries if fits(c)), last)


def last_resort_config(kernel: str, batch: int, dtype: torch.dtype) -> LSTMConfig:
    """The config that needs least of a GPU: W streamed in 16-wide K chunks, one launch per step (no residency),
    16 x 16 tiles: 5 KB of shared memory in every kernel (compile-only sm_90); 4 warps (8 for a float32 stack's
    reverse wavefront, as the heuristic streams it: no spills)."""
    return LSTMConfig(block_h=16, block_b=16, block_k=16, w_resident=False, batch_groups=cdiv(batch, 16),
                      persistent=False, num_warps=8 if kernel == "stack_bwd" and dtype.itemsize == 4 else 4)


def forced_config(kernel: str) -> LSTMConfig | None:
    """The config use_config forces on `kernel` here, or None."""
    return (_override.get() or {}).get(kernel)


@functools.lru_cache(maxsize=16)
def _limits_of(index: int) -> tuple[int, int]:
    props = torch.cuda.get_device_properties(index)
    return props.multi_processor_count, getattr(props, "shared_memory_per_block_optin", SM90_SHARED)


def device_limits(device: torch.device | str | int) -> tuple[int, int]:
    """(SMs, bytes of shared memory one block may use) of a CUDA device."""
    device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    return _limits_of(torch.cuda.current_device() if device.index is None else device.index)


def device_heuristic(hidden: int, batch: int, dtype: torch.dtype, device: torch.device | str | int,
                     kernel: str = "fwd", directions: int = 1, layers: int = 1) -> LSTMConfig:
    """The heuristic's pick for `kernel` on a CUDA device: heuristic_config (stack_backward_config for a stack's
    backward) with its SMs, cut down to its shared memory (fit_shared_memory)."""
    return _device_pick(hidden, batch, dtype, *device_limits(device), kernel, directions, layers)


# The picks are pure functions of their arguments, and a host-bound step (LSTMCell in a Python loop) asked for one
# on every launch: ~100 us of this machine's host time where no tuned config matched (perf/NOTES.md v0.33).
@functools.lru_cache(maxsize=4096)
def _device_pick(hidden: int, batch: int, dtype: torch.dtype, sms: int, smem: int, kernel: str, directions: int,
                 layers: int) -> LSTMConfig:
    if kernel == "stack_bwd":
        cfg = stack_backward_config(hidden, batch, dtype, sms, layers)
    else:
        cfg = heuristic_config(hidden, batch, dtype, sms, directions=directions, layers=layers, kernel=kernel)
    return fit_shared_memory(cfg, kernel, hidden, batch, dtype, sms, smem, directions, layers)


@functools.lru_cache(maxsize=4096)
def _interpreter_pick(hidden: int, batch: int, dtype: torch.dtype, kernel: str, directions: int,
                      layers: int) -> LSTMConfig:
    return heuristic_config(hidden, batch, dtype, None, interpreter=True, directions=directions, layers=layers,
                            kernel=kernel)


@functools.lru_cache(maxsize=4096)
def _fitted(config: LSTMConfig, kernel: str, hidden: int, batch: int, dtype: torch.dtype, sms: int, smem: int,
            directions: int) -> LSTMConfig:
    return fit_shared_memory(config, kernel, hidden, batch, dtype, sms, smem, directions)


def full_precision_backward(hidden: int, batch: int, dtype: torch.dtype, device: torch.device, interpreter: bool,
                            directions: int = 1) -> LSTMConfig:
    """The heuristic's backward pick where W must stay float32 (TF32 not allowed): its pick, or where that is a
    half_w one, the measured layout without it, cut down to the device's shared memory."""
    pick = heuristic_pick(hidden, batch, dtype, device, interpreter, "bwd", directions)
    if not pick.half_w:
        return pick
    sms, smem = device_limits(device)
    return fit_shared_memory(measured_backward_layout(hidden, batch, dtype, sms, half_w=False), "bwd", hidden, batch,
                             dtype, sms, smem, directions)


def heuristic_pick(hidden: int, batch: int, dtype: torch.dtype, device: torch.device, interpreter: bool,
                   kernel: str = "fwd", directions: int = 1, layers: int = 1) -> LSTMConfig:
    """select_config's last resort alone: the heuristic's pick for this device (or the interpreter), without the
    overrides, the caches and the shipped configs."""
    if interpreter or device.type != "cuda":
        return _interpreter_pick(hidden, batch, dtype, kernel, directions, layers)
    return device_heuristic(hidden, batch, dtype, device, kernel, directions, layers)


def select_config(hidden: int, batch: int, dtype: torch.dtype, device: torch.device, interpreter: bool,
                  kernel: str = "fwd", directions: int = 1, layers: int = 1) -> LSTMConfig:
    forced = forced_config(kernel)
    if forced is not None:
        return forced
    if interpreter or device.type != "cuda" or kernel in ("stack", "stack_bwd"):  # stacks: not tuned yet
        return heuristic_pick(hidden, batch, dtype, device, interpreter, kernel, directions, layers)
    from tritonlstm.tuning import lookup  # the cache and the tuner; imported here to keep this module light

    found = lookup(kernel, hidden, batch, dtype, directions, device)
    if found is None:
        return device_heuristic(hidden, batch, dtype, device, kernel, directions)
    # A config tuned or shipped for this GPU fits it; a cache copied from a larger one may not.
    return _fitted(found, kernel, hidden, batch, dtype, *device_limits(device), directions)


VARIANTS = ("unsplit", "unsplit-w4", "unsplit-w2", "split", "split4", "split-bh8", "split-bb32", "merged",
            "merged-w4", "transposed", "transposed-streamed", "streamed", "wide",
            "wide-bh32", "wide-bh64", "grid-2d", "grid-2d-bb64", "grid-2d-half", "grid-2d-half-bb64", "split-half",
            "no-prefetch", "transposed-half", "transposed-streamed-half", "transposed-streamed-bb128-half", "cluster",
            "transposed-cluster", "transposed-streamed-bb128", "cluster-bh64", "transposed-w8", "transposed-half-w8")


def named_variants(kernel: str, H: int, B: int, dtype: torch.dtype, sms: int, names=VARIANTS,
                   layers: int = 1) -> dict[str, LSTMConfig]:
    """The A/B's named configs of one (kernel, H, B, dtype) that apply there, restricted to `names` (perf/kernel_ab.py
    times them; the tuner's --quick search takes them as its candidates):

      unsplit      the heuristic before v0.9 (perf/NOTES.md): BH up to 32, 8 warps, one 2-D dot per gate
      unsplit-w4   the same with 4 warps (the 2-D dot stacks every warp along M, so fewer warps do less twice);
                   unsplit-w2: 2 warps (least duplication, least parallelism; spills at large K)
      split        split-K over 8 warps, BH <= 16
      split4       split-K over 4 warps
      split-bh8    split-K, BH = 8 (more programs, half the W slice each)
      split-bb32   split-K, 32-row batch tiles (B >= 32: half the tile iterations per step)
      merged       forward only: the four gate dots as one over interleaved columns, warps along N (8 warps;
                   merged-w4: 4), on the unsplit tiles (perf/NOTES.md v0.11)
      transposed   forward kernels: gates^T = W^T @ h^T, M = a program's 64 gate rows (BH = 16) on Hopper's
                   warpgroup MMA, 4 warps, 16-row batch tiles (single layer: 64 at B >= 64 where K * element size
                   <= 1 KB) (v0.18); the single-layer backward: dh by reduce-scatter (reduce_scatter_config,
                   v0.24) where every program owns one batch tile
      transposed-streamed   the same with W^T streamed from L2 in pipelined K chunks (3 stages): any H, 64-row
                   batch tiles at B >= 64 (single-layer forward)
      transposed-streamed-bb128   single-layer forward, B >= 128: the same with 128-row batch tiles, so that a
                   program streams its W^T chunk once for 128 rows where the 64-row tiles stream it once per tile
                   (H = 1024, B = 256: 48 MB of L2 reads a step instead of 64; v0.36)
      streamed     W_hh (and a stack's W_ih) streamed from L2 in 32-wide K chunks (16 in fp32), BH = 16, 4 warps
      wide         B >= 32, single layer: 64-row tiles, W streamed, 8 warps, 3 stages (configs.wide_tile_config;
                   the heuristic's pick where 16-row tiles would walk >= 4 tiles per program, v0.15)
      wide-bh32, wide-bh64   B >= 64: the wide tiles with 32 or 64 units per program (32-wide K chunks): fewer
                   programs, each reading its rows' h_{t-1} (dG_{t+1}: 4H wide) once for more units, so less L2
                   traffic per step (16-bit backward, H = 1024, B = 256: 96 or 64 MB against the split tiles' 128;
                   v0.25)
      grid-2d      single-layer backward, B >= 64: the recurrent product on a 2-D grid of unit blocks, two barriers
                   per step (grid_2d_config, v0.26); grid-2d-bb64: with 64-row tiles where it has 32 (wgmma)
      grid-2d-half float32 single-layer backward, B >= 64, H a multiple of 16 (unaligned, the per-column scales
                   spill 272 bytes at H = 1000): the 2-D grid with W's block in float16 and dG's rows
                   scaled into float16 (LSTMConfig.half_w, v0.40), so the 16-bit layers' 128-unit blocks;
                   grid-2d-half-bb64: with 64-row tiles
      split-half   float32 single-layer backward, H a multiple of 16: 16-bit's split tiles (16 units a program,
                   split-K over 8 warps), W resident in float16 and dG's rows scaled into float16 (LSTMConfig.half_w,
                   v0.41)
      no-prefetch  the single-layer forward's heuristic pick with its gx loaded after the barrier (v0.23), where
                   the pick prefetches
      transposed-half   float32 forward kernels: the transposed dots, 16-row batch tiles, W^T resident in float16
                   (LSTMConfig.half_w, v0.29) wherever float16's W^T fits; transposed-streamed-half and
                   transposed-streamed-bb128-half (single layer, H a multiple of 16): those two streamed in float16,
                   in 16-bit's 64-wide K chunks (v0.42)
      cluster      single layer: the unsplit tiles with the barrier as Hopper's cluster barrier, the P <= 8 or 16
                   programs of a barrier launched as one thread-block cluster (v0.34); transposed-cluster: the
                   transposed tiles with it (BH = 16 up to H = 256; the forward at H = 512 with BH = 32)
      cluster-bh64 single-layer forward, B <= 32: the unsplit tiles with 64 units a program (W resident where 4 x 64
                   rows of it fit 128 KB: 16-bit H <= 256) and the cluster barrier, a quarter of the 16-row tiles'
                   programs to meet at each step (session 18)
      transposed-w8, transposed-half-w8   single-layer forward, H >= 512: transposed or transposed-half where it has
                   16-row tiles, on 8 warps, which take the whole h_{t-1} tile in one load up to 32 KB (16-bit H = 1024;
                   float32 with HALF_H) where 4 warps take four (v0.64)

    The stacks' wavefront kernels (layers > 1): "unsplit" is the heuristic's pick (heuristic_config /
    stack_backward_config), the others as above where they apply (no merged; transposed for the forward
    wavefront)."""
    stack, forward = kernel in ("stack", "stack_bwd"), kernel in ("fwd", "stack")
    share = sms // layers if stack else sms

    def regroup(cfg, **kw):
        cfg = dataclasses.replace(cfg, **kw)
        return dataclasses.replace(cfg, batch_groups=batch_groups(H, B, cfg.block_h, cfg.block_b, share))

    if stack:
        unsplit = stack_backward_config(H, B, dtype, sms, layers, measured=False) if kernel == "stack_bwd" else \
            heuristic_config(H, B, dtype, sms, layers=layers, kernel="stack", measured=False)
        w4 = dataclasses.replace(unsplit, num_warps=4)
    else:
        w4 = heuristic_config(H, B, dtype, sms, kernel="none")  # tiles as chosen before v0.9, never split, 4 warps
        unsplit = dataclasses.replace(w4, num_warps=8) if w4.w_resident and w4.block_k >= 128 else w4
    out = {"unsplit": unsplit, "unsplit-w4": w4, "unsplit-w2": dataclasses.replace(w4, num_warps=2)}
    fp32 = dtype.itemsize == 4
    if H > 32 and cdiv(H, 16) <= share:
        out["streamed"] = regroup(LSTMConfig(block_h=16, block_b=16, block_k=16 if fp32 else 32, w_resident=False,
                                             num_warps=4))
        if not stack and B >= 32:
            out["wide"] = wide_tile_config(H, B, dtype.itemsize, sms, kernel)
            for bh in (32, 64):
                if H >= 2 * bh and B >= 64:
                    out[f"wide-bh{bh}"] = regroup(out["wide"], block_h=bh, block_k=32)
    if unsplit.w_resident and unsplit.block_k >= 64:
        split = with_split_k(regroup(unsplit, block_h=min(unsplit.block_h, 16)))
        out["split"] = split
        if split.block_k // 4 >= 16 and split.split_k != 4:
            out["split4"] = dataclasses.replace(split, split_k=4, num_warps=4)
        if split.block_h > 8 and cdiv(H, 8) <= share:
            out["split-bh8"] = regroup(split, block_h=8)
        if B >= 32:
            out["split-bb32"] = regroup(split, block_b=32)
    if kernel == "fwd":
        out["merged"] = dataclasses.replace(unsplit, merged_gates=True, num_warps=8)
        out["merged-w4"] = dataclasses.replace(unsplit, merged_gates=True, num_warps=4)
    hk, esize = max(16, _pow2(H)), dtype.itemsize
    if forward and H > 16 and transposed_fits(H, esize, 2 if stack else 1) and cdiv(H, 16) <= share:
        # 64-row batch tiles where their h chunks leave registers (compile-only: K * esize <= 1 KB), else 16.
        bb = 64 if B >= 64 and hk * esize <= 1024 and not stack else 16
        out["transposed"] = transposed_config(H, B, esize, share, bb)
    if forward and H > 32 and cdiv(H, 16) <= share:
        # W^T streamed from L2 in pipelined K chunks: any H, and 64-row batch tiles at any K (compile-only: no
        # spills at BB = 64 up to K = 1024 in both widths).
        out["transposed-streamed"] = transposed_config(H, B, esize, share, 64 if B >= 64 and not stack else 16,
                                                       streamed=True)
    if kernel == "fwd" and B >= 128 and H > 32 and cdiv(H, 16) <= share:
        # 8 warps (two warpgroups over the tile's columns): compile-only sm_90, no spills in any dtype with the
        # gates stored (4 warps spill 64-152 bytes there), 72 KB of shared memory, the product on wgmma.
        out["transposed-streamed-bb128"] = dataclasses.replace(
            transposed_config(H, B, esize, share, 128, streamed=True), num_warps=8)
    if kernel == "bwd" and H > 16 and cdiv(H, 16) <= share and cdiv(B, 16) <= batch_groups(H, B, 16, 16, share):
        # The reduce-scatter backward where every program owns one batch tile (its shares are H * 16 float32 a
        # tile, stored and summed each step: the small-batch regime it is for).
        if transposed_fits(H, esize):
            out["transposed"] = reduce_scatter_config(H, B, esize, share)
        out["transposed-streamed"] = reduce_scatter_config(H, B, esize, share, streamed=True)
    if kernel == "bwd" and B >= 64 and H >= 128:
        grid = grid_2d_config(H, B, esize, share)
        if grid is not None:
            out["grid-2d"] = grid
            if grid.block_b < 64:
                # 64-row tiles: the product on wgmma (32 rows run it as mma.sync), at 144-212 bytes of spills.
                out["grid-2d-bb64"] = grid_2d_config(H, B, esize, share, block_b=64)
        half = grid_2d_config(H, B, esize, share, half_w=True) if fp32 and H % 16 == 0 else None
        if half is not None:
            out["grid-2d-half"] = half
            if half.block_b < 64:
                out["grid-2d-half-bb64"] = grid_2d_config(H, B, esize, share, block_b=64, half_w=True)
    if kernel == "bwd" and fp32 and H % 16 == 0:
        # 16-bit's resident split tiles, which float32's W fits in float16 (v0.41): split-K over 8 warps from
        # H = 128, where its float32 dG tiles take twice 16-bit's registers (compile-only sm_90, H = 1024: 372-412 bytes
        # of spills; split4's 4 warps: 1404).
        tiles = named_variants("bwd", H, B, torch.float16, sms, ("split",)).get("split")
        if tiles is not None and tiles.w_resident and tiles.persistent:
            out["split-half"] = dataclasses.replace(tiles, half_w=True)
    if not stack:
        transposed = out.get("transposed")
        if kernel == "fwd" and transposed is not None and not cluster_size_ok(cdiv(H, 16)) \
                and cluster_size_ok(cdiv(H, 32)) and 2 * 64 * hk * esize <= _W_BUDGET:
            # 32 units a program (128 gate rows: 8 warps, no spills at H = 512, compile-only) to fit the cluster.
            transposed = regroup(transposed, block_h=32, num_warps=8)
        for name, tiles in (("cluster", unsplit), ("transposed-cluster", transposed)):
            if tiles is not None and tiles.persistent and not tiles.grid_2d and cluster_size_ok(cdiv(H, tiles.block_h)):
                out[name] = dataclasses.replace(tiles, exchange="cluster")
        if kernel == "fwd" and unsplit.persistent and unsplit.w_resident and H > 64 \
                and 4 * 64 * hk * esize <= _W_BUDGET and B <= 32:
            # 64 units a program: 4 programs at H = 256 meet at the cluster barrier (session 18, for fp16 B = 16).
            out["cluster-bh64"] = dataclasses.replace(regroup(unsplit, block_h=64, num_warps=8), exchange="cluster")
    if forward and fp32 and H > 16 and H % 16 == 0 and transposed_fits(H, 2, 2 if stack else 1) \
            and cdiv(H, 16) <= share:
        out["transposed-half"] = transposed_config(H, B, esize, share, 16, half_w=True)
    if kernel == "fwd" and H >= 512:
        # 8 warps, whose registers take a 16-row tile's whole h_{t-1} in one load up to 32 KB (16-bit, or float32's
        # with HALF_H, at H = 1024; kernels/lstm.py transposed_chunk, v0.64): one L2 round trip a step, not four.
        for name in ("transposed", "transposed-half"):
            if out.get(name) is not None and out[name].block_b == 16:
                out[f"{name}-w8"] = dataclasses.replace(out[name], num_warps=8)
    if kernel == "fwd" and fp32 and H % 16 == 0:
        # The streamed tiles with W^T's chunks in float16 (v0.42): half the bytes from L2, 16-bit's chunks.
        for name in ("transposed-streamed", "transposed-streamed-bb128"):
            if name in out:
                out[f"{name}-half"] = dataclasses.replace(out[name], half_w=True, block_k=64)
    if kernel == "fwd":
        pick = heuristic_config(H, B, dtype, sms, kernel="fwd")
        if pick.prefetches(B, H):
            out["no-prefetch"] = dataclasses.replace(pick, prefetch=False)
    return {n: c for n, c in out.items() if n in names}
