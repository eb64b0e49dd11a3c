"""Compile-only resource check of the recurrence kernels for a GPU this machine may not have.

`triton.compile(..., target=GPUTarget("cuda", 90, 32))` builds the sm_90 binary on a CPU-only machine; ptxas
(bundled with triton's wheel) then reports registers and spills. This catches what the interpreter cannot:
type errors, shared-memory overflow, register spills. Run as `python -m tritonlstm.compilecheck` (it must
run without TRITON_INTERPRET: the interpreter does not compile); `--gpu a100` (a10, l4, rtx4090) checks the
configs the heuristic picks on that GPU, cut down to its shared memory (configs.fit_shared_memory), compiled for
its architecture.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile

import torch

from tritonlstm.configs import (
    SM90_SHARED,
    LSTMConfig,
    _pow2,
    fit_shared_memory,
    heuristic_config,
    named_variants,
    stack_backward_config,
)

SM90_SHARED_LIMIT = SM90_SHARED  # bytes of shared memory one block may use on an H100
# Register spills up to this many bytes per thread are allowed: on an H100 several spilling configs measured
# faster than spill-free ones (perf/NOTES.md v0.9: 4 warps doing less duplicated work beat 8 that fit
# registers); beyond it ptxas has given up (one fell back to 32 registers and 30 KB of spills: fp16 backward,
# K = 1024 split 4 ways on 4 warps, at an H that is not a multiple of 16).
SPILL_LIMIT = 2048
H100_SMS = 132


@dataclasses.dataclass(frozen=True)
class Target:
    """A GPU as the configs see it: compute capability (the compile's target), SMs, shared memory per block."""

    arch: int
    sms: int
    smem: int


# The H100 the heuristic was measured on, and GPUs with less shared memory or fewer SMs (CUDA's figures).
GPUS = {"h100": Target(90, H100_SMS, SM90_SHARED_LIMIT), "a100": Target(80, 108, 166912),
        "a10": Target(86, 72, 101376), "l4": Target(89, 58, 101376), "rtx4090": Target(89, 128, 101376)}
H100 = GPUS["h100"]
BACKWARD = ("bwd", "stack_bwd")  # the kernels compiled from lstm_bwd_kernel
_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


@dataclasses.dataclass
class Resources:
    kernel: str
    dtype: str
    hidden: int
    config: LSTMConfig
    shared: int
    registers: int
    spill_bytes: int
    error: str | None = None
    store_gates: bool = True  # the training variant of fwd / stack (False: inference)
    smem_limit: int = SM90_SHARED_LIMIT  # the target GPU's shared memory per block
    # The L2 round trips one after another of the kernel's 16-byte .cg loads (load_rounds): a step's reads of what
    # other programs wrote (h_{t-1}, dG_{t+1}), one batch tile's, in program order; 0 where they are cp.async.
    rounds: int | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.shared <= self.smem_limit and self.spill_bytes <= SPILL_LIMIT


def launch_onto_nothing(on_launch, arch: int = 90) -> None:
    """Makes Triton's active driver one for a GPU that is not there: kernels compile for sm_`arch` (ptxas, as
    check() does) and every launch goes through Triton's own launch path (binding, specialisation, the cache key)
    to `on_launch(*what the launcher gets)` instead of a GPU. For perf/host_time.py (the host's time of a launch)
    and the tests of what reaches the launcher; the process cannot run kernels for real afterwards."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    class Launcher:
        def __init__(self, src, metadata):
            pass

        def __call__(self, *args):
            on_launch(*args)

    class Utils:
        def load_binary(self, name, kernel, shared, device):
            return object(), object(), 128, 0, 1024  # module, function, registers, spills, max threads

        def get_device_properties(self, device):
            return {"max_shared_mem": SM90_SHARED, "multiprocessor_count": 132}

    class NoGPU:
        utils, launcher_cls = Utils(), Launcher

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 7

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

    driver.set_active(NoGPU())


def _signature(kernel: str, dtype: str, half_w: bool = False) -> dict[str, str]:
    p = "*" + dtype
    pw = "*fp16" if half_w else p
    ints = {n: "i32" for n in ("T", "B", "H", "rev0", "S_START", "S_COUNT", "max_spin")}
    if kernel == "bwd_2d":
        ptrs = {"GATES": p, "C_ALL": "*fp32", "C0": "*fp32", "W": p, "DY": p, "DHN": p, "DCN": p, "DG": p,
                "DC_WS": "*fp32", "DH0": p, "DC0": p, "LAST": "*i32", "SYNC": "*i32", "ERR": "*i32", "ERR_HOST": "*i32",
                "PART": "*fp32", "AMAX": "*fp32", "RMAX": "*fp32", "DG16": "*fp16"}
        flags = ()
    elif kernel == "fwd":
        ptrs = {"GX": p, "GATES": p, "W": pw, "W_IH": pw, "DROP": p, "XD": p, "BIAS": p, "BIAS_HH": p, "H0": p,
                "C_WS": "*fp32", "Y": p, "HN": p, "CN": p, "C_ALL": "*fp32", "LAST": "*i32", "SYNC": "*i32",
                "ERR": "*i32", "ERR_HOST": "*i32", "WSCALE": "*fp32", "HB": "*fp16", "CODES": "*i16",
                "RING": "*i32"}
        flags = ("BK", "BH", "BB", "D", "W_RESIDENT", "HAS_BIAS", "TWO_BIASES", "HAS_LENGTHS", "STACK",
                 "HAS_DROPOUT", "STORE_GATES", "PERSISTENT", "DOT_PRECISION", "SK", "MERGED")
    else:
        ptrs = {"GATES": p, "C_ALL": "*fp32", "C0": "*fp32", "W": p, "W_IH": p, "DROP": p, "DY": p, "DHN": p,
                "DCN": p, "DG": p, "DC_WS": "*fp32", "DH0": p, "DC0": p, "LAST": "*i32", "SYNC": "*i32",
                "ERR": "*i32", "ERR_HOST": "*i32", "W_T": p, "PART": "*fp32", "AMAX": "*fp32", "RMAX": "*fp32",
                "DBIAS": p}
        flags = ("BK", "BH", "BB", "D", "W_RESIDENT", "HAS_LENGTHS", "STACK", "HAS_DROPOUT",
                 "PERSISTENT", "DOT_PRECISION", "SK")
    return {**ptrs, **ints, **{f: "constexpr" for f in flags}}


def _launch_attrs(signature: dict[str, str], hidden: int) -> dict:
    """What a real launch tells the compiler: torch's buffers are 16-byte aligned, and H (the one integer the
    kernels specialise on) is a multiple of 16 when it is. Without these the loads are not vectorised and their
    per-element addresses cost registers: a compile-only check without them overstated the spills (fp16 H = 1024
    in a prototype: 4.5 KB without, 0.7 KB with)."""
    names = list(signature)
    return {(names.index(n),): [["tt.divisibility", 16]] for n, t in signature.items()
            if t.startswith("*") or (n == "H" and hidden % 16 == 0)}


def _ptxas_report(ptx: str) -> tuple[int, int]:
    """(registers, spill store + load bytes) from the bundled ptxas."""
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        arch = re.search(r"\.target\s+(sm_\w+)", ptx).group(1)
        out = subprocess.run([ptxas, f"-arch={arch}", "-v", src, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", out).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", out))
    return regs, spills


def sass(cubin: bytes) -> str:
    """The SASS of a compiled kernel's cubin (the bundled cuobjdump)."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run([tool, "-sass", path], capture_output=True, text=True, check=True).stdout


def instructions(sass_text: str) -> list[tuple[str, str]]:
    """(mnemonic, operands) of each instruction of a SASS listing, in layout order (a predicate dropped)."""
    out = []
    for ins in re.findall(r"/\*[0-9a-f]{4,}\*/\s+([^;]*);", sass_text):
        words = ins.split(None, 2) if ins.startswith("@") else [""] + ins.split(None, 1)
        out.append((words[1], words[2] if len(words) > 2 else ""))
    return out


def _reads(mnemonic: str, operands: str) -> str:
    """The operands an instruction reads: a store reads every operand; anything else writes its first."""
    return operands if mnemonic.startswith("ST") else operands.partition(",")[2]


def _destination(mnemonic: str, operands: str) -> set[str]:
    """The registers a load writes."""
    width = 4 if ".128" in mnemonic else 2 if ".64" in mnemonic else 1
    first = int(re.match(r"R(\d+)", operands).group(1))
    return {f"R{first + k}" for k in range(width)}


def _reads_any(mnemonic: str, operands: str, registers: set[str]) -> bool:
    read = _reads(mnemonic, operands)
    return any(re.search(rf"\b{r}\b", read) for r in registers)


def load_rounds(sass_text: str, opcode: str = "LDG.E.128") -> int:
    """How many memory round trips the loads of `opcode` (a SASS opcode with its modifiers, e.g.
    LDG.E.128.STRONG.GPU) take one after another, in program order: 1, plus one for each such load issued after an
    instruction that reads an earlier one's data (the warp waits there for that load to return). 0 without such
    loads. ptxas decides this, not the source: a tile's tl.sum had each 16-byte load consumed before the next
    issued (perf/NOTES.md "Session 25")."""
    rounds, pending, waited = 0, set(), False
    for mnemonic, operands in instructions(sass_text):
        if pending and _reads_any(mnemonic, operands, pending):
            waited, pending = True, set()
        if mnemonic == opcode:
            if rounds == 0 or waited:
                rounds, waited = rounds + 1, False
            pending |= _destination(mnemonic, operands)
    return rounds


def prefetch_reads_before_the_wait(sass_text: str) -> int:
    """In a cluster kernel's step, how many of the global loads after the step's last CTA barrier (the prefetch of
    the next step's inputs) have their data read before the step's cluster wait (`UCGABAR_WAIT`, the last one): the
    warp waits there for the load, before the barrier, instead of carrying it across (perf/NOTES.md v0.68)."""
    code = instructions(sass_text)
    wait = max(i for i, (m, _) in enumerate(code) if m == "UCGABAR_WAIT")
    start = max(i for i, (m, _) in enumerate(code[:wait]) if m.startswith("BAR.SYNC"))
    count = 0
    for i in range(start, wait):
        mnemonic, operands = code[i]
        if mnemonic.startswith("LDG"):
            dest = _destination(mnemonic, operands)
            count += any(_reads_any(m, o, dest) for m, o in code[i + 1:wait])
    return count


def memory_ops_between_arrive_and_wait(sass_text: str) -> tuple[int, int]:
    """(global stores, global loads) a kernel issues between its first arrival at the step's barrier and the wait:
    the cluster's `UCGABAR_ARV` to its last `UCGABAR_WAIT`, or the counter's atomic add (`REDG` / `ATOMG.E.ADD`) to
    its first poll (`LDG.E.STRONG.GPU`). None where the barrier arrives and waits in one; the step's work that no
    other program needs before the barrier where it arrives early (ARRIVE_EARLY, perf/NOTES.md v0.68)."""
    code = instructions(sass_text)
    arrive = min(i for i, (m, _) in enumerate(code)
                 if m == "UCGABAR_ARV" or m.startswith(("REDG.E.ADD", "ATOMG.E.ADD")))
    waits = [i for i, (m, _) in enumerate(code) if m == "UCGABAR_WAIT"]
    wait = max(waits) if waits else next(i for i, (m, _) in enumerate(code) if i > arrive and m == "LDG.E.STRONG.GPU")
    between = [m for m, _ in code[arrive + 1:wait]]
    return sum(m.startswith("STG") for m in between), sum(m.startswith("LDG") for m in between)


def check(kernel: str, dtype: torch.dtype, hidden: int, config: LSTMConfig, *, store_gates: bool = True,
          has_lengths: bool = False, directions: int = 1, prefetch: bool = False, target: Target = H100,
          rounds: bool = False) -> Resources:
    """kernel: "fwd", "bwd", "stack" or "stack_bwd" (the forward or backward kernel in its wavefront-stack
    form). prefetch: a single layer's one-tile-per-program variant (LSTMConfig.prefetches). rounds: fill in
    Resources.rounds (cuobjdump, ~0.4 s a kernel)."""

    from tritonlstm.kernels import lstm as k

    if k.interpreting():
        raise RuntimeError("compilecheck needs the real compiler: unset TRITON_INTERPRET")
    tdt = _TRITON_DTYPE[dtype]
    if kernel == "bwd" and config.grid_2d:
        return _check_2d(dtype, hidden, config, directions, target, rounds)
    consts = dict(BK=config.block_k, BH=config.block_h, BB=config.block_b, W_RESIDENT=config.w_resident,
                  D=directions, HAS_LENGTHS=has_lengths, PERSISTENT=config.persistent,
                  DOT_PRECISION="tf32" if dtype == torch.float32 else "ieee", SK=config.split_k,
                  CLUSTER=config.clustered)
    half_h = k.half_h_applies(config, dtype.itemsize, kernel)
    if kernel in ("fwd", "stack"):
        # A training stack is compiled with dropout between its layers, the heavier of its two variants.
        consts.update(HAS_BIAS=True, TWO_BIASES=True, STACK=kernel == "stack", STORE_GATES=store_gates,
                      HAS_DROPOUT=kernel == "stack" and store_gates,
                      MERGED=kernel == "fwd" and config.merged_gates,
                      TRANSPOSED=config.transposed,
                      KC=k.transposed_chunk(config, dtype.itemsize, stack=kernel == "stack", half_h=half_h),
                      HALF_W=config.half_w, HALF_H=half_h, **_step(config, kernel, dtype, prefetch))
        if kernel == "fwd" and k.BULK_H and k.bulk_applies(config, dtype.itemsize, consts["KC"], consts["PREFETCH"],
                                                          True):
            consts.update(BULK=True, ARRIVE_EARLY=False)
    else:
        consts.update(STACK=kernel == "stack_bwd", HAS_DROPOUT=kernel == "stack_bwd",
                      **_step(config, kernel, dtype, prefetch),
                      HALF_W=kernel == "bwd" and config.half_w and not config.transposed,
                      PAIRED=k.pairs_gates(config, kernel, hidden, dtype.itemsize, target.smem),
                      **(k.reduce_scatter_constexprs(config, hidden) if kernel == "bwd"
                         else k.NO_REDUCE_SCATTER),
                      BIAS_COPIES=2 if k.bias_sums_in_kernel(config, kernel, hidden) else 0)
    backward = kernel in BACKWARD
    fn = k.lstm_bwd_kernel if backward else k.lstm_fwd_kernel
    res = Resources(kernel, tdt, hidden, config, shared=0, registers=0, spill_bytes=0,
                    store_gates=store_gates and not backward, smem_limit=target.smem)
    sig = _signature("bwd" if backward else "fwd", tdt, config.half_w and not backward)
    return _compile(res, fn, sig, consts, target.arch, rounds)


def _step(config: LSTMConfig, kernel: str, dtype: torch.dtype, prefetch: bool) -> dict:
    """The kernel's PREFETCH, CARRY and ARRIVE_EARLY as a single layer's launch with one batch tile a program
    (`prefetch`) has them, with the kernels module's switches (none in a stack)."""
    from tritonlstm.kernels import lstm as k

    if kernel not in ("fwd", "bwd"):
        return dict(PREFETCH=False)
    return k.step_constexprs(config, dtype.itemsize, prefetch, True, k.PREFETCH_AS_LOADED, k.ARRIVE_EARLY)


def _compile(res: Resources, fn, sig: dict, consts: dict, arch: int = 90, rounds: bool = False) -> Resources:
    """Compiles fn for sm_`arch` as a launch of res.config would and fills res in: shared memory, registers,
    spills, or the error (a compile failure is a finding, reported with the config that caused it)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    try:
        src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=_launch_attrs(sig, res.hidden))
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options=dict(num_warps=res.config.num_warps, num_stages=res.config.num_stages))
        res.shared = compiled.metadata.shared
        res.registers, res.spill_bytes = _ptxas_report(compiled.asm["ptx"])
        if rounds:
            res.rounds = load_rounds(sass(compiled.asm["cubin"]), "LDG.E.128.STRONG.GPU")
    except Exception as e:
        res.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return res


def _hiddens(min_hidden: int, max_hidden: int) -> list[int]:
    """The H of a sweep: powers of two, one past each (unaligned tiles), and a few in between."""
    return sorted(h for h in {h for p in range(0, 14) for h in (2 ** p, 2 ** p + 1)} | {24, 33, 100, 1000}
                  if min_hidden <= h <= max_hidden)


def _check_2d(dtype: torch.dtype, hidden: int, config: LSTMConfig, directions: int, target: Target,
              rounds: bool = False) -> Resources:
    """check() of a grid_2d backward (lstm_bwd_2d_kernel)."""

    from tritonlstm.configs import grid_2d_blocks
    from tritonlstm.kernels import lstm as k

    res = Resources("bwd", _TRITON_DTYPE[dtype], hidden, config, shared=0, registers=0, spill_bytes=0,
                    store_gates=False, smem_limit=target.smem)
    consts = dict(BU=config.block_h, NB=grid_2d_blocks(hidden, config.block_h), BB=config.block_b, D=directions,
                  HAS_LENGTHS=False, PERSISTENT=config.persistent,
                  DOT_PRECISION="tf32" if dtype == torch.float32 else "ieee", CLUSTER=False, HALF_W=config.half_w,
                  HALF_G=config.half_w and dtype == torch.float32 and k.HALF_G)
    sig = {**_signature("bwd_2d", _TRITON_DTYPE[dtype]), **{n: "constexpr" for n in consts}}
    return _compile(res, k.lstm_bwd_2d_kernel, sig, consts, target.arch, rounds)


def shipped_configs(max_hidden: int = 1024, min_hidden: int = 1, measured: bool = True,
                    target: Target = H100) -> list[tuple[str, torch.dtype, int, LSTMConfig, bool]]:
    """(kernel, dtype, H, config, prefetch) for every distinct config the heuristic can choose on `target` (an
    H100 by default) for H <= max_hidden, any batch: one direction or both in one launch (fwd, bwd), and
    wavefront stacks of 2 to 4 layers (stack, stack_bwd), each cut down to the target's shared memory as at run
    time (configs.fit_shared_memory: no change on an H100); prefetch: a single layer's one-tile-per-program
    variant, where a batch gives it. measured=False: its tiles before the layouts of the H100 A/B."""

    seen, out = set(), []
    hiddens = _hiddens(min_hidden, max_hidden)
    shapes = [(kn, dict(directions=d)) for kn in ("fwd", "bwd") for d in (1, 2)] + \
        [(kn, dict(layers=n)) for kn in ("stack", "stack_bwd") for n in (2, 3, 4)]
    for dtype in _TRITON_DTYPE:
        for hidden in hiddens:
            for batch in (1, 16, 17, 33, 64, 256, 4096):
                for kernel, kw in shapes:
                    if kernel == "stack_bwd":
                        cfg = stack_backward_config(hidden, batch, dtype, target.sms, measured=measured, **kw)
                    else:
                        cfg = heuristic_config(hidden, batch, dtype, target.sms, kernel=kernel, measured=measured,
                                               **kw)
                    cfg = fit_shared_memory(cfg, kernel, hidden, batch, dtype, target.sms, target.smem,
                                            kw.get("directions", 1), kw.get("layers", 1))
                    # The kernels depend on H only through the tile shapes, so one compile covers a shape class.
                    prefetch = kernel in ("fwd", "bwd") and cfg.prefetches(batch, hidden)
                    key = (kernel, dtype, cfg.block_h, cfg.block_b, cfg.block_k, cfg.w_resident, cfg.persistent,
                           cfg.num_warps, cfg.num_stages, cfg.split_k, cfg.merged_gates, cfg.transposed, cfg.half_w,
                           prefetch)
                    if key not in seen:
                        seen.add(key)
                        out.append((kernel, dtype, hidden, cfg, prefetch))
    return out


# Single-layer tuner candidates that are not heuristic picks, as (kernel, named variants, batches): the
# backward's for --reduce-scatter (perf/NOTES.md v0.24: one batch tile per program) and --grid-2d (v0.26: large
# batches), the float32 forward's for --half-w (v0.29: W^T resident in float16).
REDUCE_SCATTER = ("bwd", ("transposed", "transposed-streamed"), (1, 16))
GRID_2D = ("bwd", ("grid-2d", "grid-2d-bb64", "grid-2d-half", "grid-2d-half-bb64"), (64, 256))
HALF_W = ("fwd", ("transposed-half", "transposed-streamed-half", "transposed-streamed-bb128-half"), (1, 16, 256))
HALF_W_BWD = ("bwd", ("split-half",), (1, 16, 64))


def variant_configs(kernel: str, names: tuple[str, ...], batches: tuple[int, ...], max_hidden: int = 1024,
                    min_hidden: int = 1, target: Target = H100) -> list[tuple[str, torch.dtype, int, LSTMConfig, bool]]:
    """A single layer's configs.named_variants `names` of `kernel` at `batches` on `target`'s SMs, as
    shipped_configs lists them: tuner candidates, not yet heuristic picks."""
    seen, out = set(), []
    for dtype in _TRITON_DTYPE:
        for hidden in _hiddens(min_hidden, max_hidden):
            for batch in batches:
                for cfg in named_variants(kernel, hidden, batch, dtype, target.sms, names).values():
                    prefetch = cfg.prefetches(batch, hidden)
                    # A compile depends on the tiles, not the batch groups; H enters through its blocks (QP, NB)
                    # and its alignment (the launch's 16-divisibility).
                    key = (dtype, dataclasses.replace(cfg, batch_groups=1), prefetch, _pow2(-(-hidden // cfg.block_h)),
                           hidden % 16 == 0)
                    if key not in seen:
                        seen.add(key)
                        out.append((kernel, dtype, hidden, cfg, prefetch))
    return out


def _check_job(job) -> Resources:
    """check() of (kernel, dtype, hidden, config, prefetch, store_gates, target[, rounds])."""
    kernel, dtype, hidden, cfg, prefetch, store, target, *rounds = job
    return check(kernel, dtype, hidden, cfg, store_gates=store, prefetch=prefetch, target=target,
                 rounds=bool(rounds and rounds[0]))


def _report(rows: list, r: Resources, kernel: str, hidden: int, cfg: LSTMConfig, store: bool,
            prefetch: bool = False) -> None:
    rows.append(r)
    status = ("ok" if r.spill_bytes == 0 else "ok~") if r.ok else "FAIL"
    variant = "" if kernel in BACKWARD else ("/train" if store else "/infer")
    print(f"{status:4} {kernel + variant:11} {r.dtype} H={hidden:<5} BH={cfg.block_h:<3} BB={cfg.block_b:<3} "
          f"BK={cfg.block_k:<5} resident={int(cfg.w_resident)} warps={cfg.num_warps} shared={r.shared:<7} "
          f"regs={r.registers:<4} spills={r.spill_bytes}" + (f" rounds={r.rounds}" if r.rounds else "")
          + (f" split_k={cfg.split_k}" if cfg.split_k > 1 else "")
          + (" merged" if cfg.merged_gates else "") + (" transposed" if cfg.transposed else "")
          + ("" if cfg.exchange == "barrier" else f" {cfg.exchange}") + (" prefetch" if prefetch else "")
          + (f" {r.error}" if r.error else ""), flush=True)


# The float32 GEMMs' operand layouts (kernels/matmul.py): which strides are 1 in each of the layers' products as
# they come, and in a chunk of K restaged K-major (accumulating into C), as the last two run from v0.37.
MATMUL_LAYOUTS = {"x @ W^T": ("s_ak", "s_bk", "s_cn"), "dG @ W": ("s_ak", "s_bn", "s_cn"),
                  "dG^T @ x": ("s_am", "s_bn", "s_cn"), "restaged": ("s_ak", "s_bk", "s_cn"),
                  # the row-scaled float16 operands (v0.43): both K-major, as half_rows_kernel writes them
                  "half": ("s_ak", "s_bk", "s_cn")}


def _copy_kernel_row(fn, layout: str, sig: dict, consts: dict, aligned: tuple[int, ...], wide_store: str) -> dict:
    """check_matmul's row of a copy kernel (4 warps) compiled for sm_90: its vector loads and stores (16-byte loads,
    stores of the width `wide_store` matches), its 4-byte loads, its spills."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    c = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts,
                                 attrs={(i,): [["tt.divisibility", 16]] for i in aligned}),
                       target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
    ptx = c.asm["ptx"]
    return {"tiles": {"BM": consts["BR"], "BN": consts["BC"], "BK": 0, "num_warps": 4}, "layout": layout,
            "error": None, "shared": c.metadata.shared,
            "wide_loads": len(re.findall(r"ld\.global(?:\.\w+)*\.v4", ptx)),
            "wide_stores": len(re.findall(r"st\.global(?:\.\w+)*\." + wide_store, ptx)),
            "narrow_loads": len(re.findall(r"ld\.global(?:\.(?!v[24]\b)\w+)*\.b32 ", ptx)),
            "spill_bytes": _ptxas_report(ptx)[1]}


def check_matmul() -> list[dict]:
    """Compiles kernels.matmul for sm_90 in each of its tile configs and operand layouts, specialised as a
    launch would be (unit strides constant, the rest and the pointers 16-aligned): shared memory, registers,
    spills, and whether the dot became a warpgroup MMA."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from tritonlstm.kernels import matmul as mm

    base = {n: "*fp32" for n in ("A", "B", "C")} | {"EA": "*i32", "EB": "*i32"} | {
        n: "i32" for n in ("M", "N", "K", "s_am", "s_ak", "s_bk", "s_bn", "s_cm", "s_cn")}
    names = list(base)
    rows = []
    for shape in ((4096, 4096), (2048, 512), (64, 64)):
        for layout, unit in MATMUL_LAYOUTS.items():
            half = layout == "half"
            tiles = mm._config(*shape, False, esize=2 if half else 4)
            sig = dict(base) | ({"A": "*fp16", "B": "*fp16"} if half else {})
            consts = dict(PRECISION="tf32", ACCUMULATE=layout == "restaged", SCALED=half,
                          **{k: tiles[k] for k in ("BM", "BN", "BK", "GROUP_M")})
            for n in unit:
                sig[n], consts[n] = "constexpr", 1
            attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if n not in unit}
            row = {"tiles": tiles, "layout": layout, "error": None}
            try:
                c = triton.compile(ASTSource(fn=mm.matmul_kernel, signature=sig, constexprs=consts, attrs=attrs),
                                   target=GPUTarget("cuda", 90, 32),
                                   options=dict(num_warps=tiles["num_warps"], num_stages=tiles["num_stages"]))
                row["shared"] = c.metadata.shared
                row["registers"], row["spill_bytes"] = _ptxas_report(c.asm["ptx"])
                row["wgmma"] = "wgmma.mma_async" in c.asm["ptx"]
                # 4-byte cp.async: an operand gathered one element a thread (what restaging avoids)
                row["narrow_copies"] = len(re.findall(r"cp\.async\.c[ag]\.shared\.global \[[^]]*\], \[[^]]*\], 0x4",
                                                      c.asm["ptx"]))
                row["wide_loads"] = len(re.findall(r"ld\.global(\.[a-z0-9]+)*\.v4", c.asm["ptx"]))  # into registers
            except Exception as e:  # a compile failure is a finding
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            rows.append(row)
    # The restaging copy, from an M-major [M, K] chunk into K-major staging: 16-byte loads and stores both sides.
    rows.append(_copy_kernel_row(mm.restage_kernel, "restage", {
        "X": "*fp32", "Y": "*fp32", "R": "i32", "C": "i32", "s_xr": "constexpr", "s_xc": "i32", "s_yr": "i32",
        "s_yc": "constexpr"}, dict(s_xr=1, s_yc=1, BR=64, BC=64), (0, 1, 2, 3, 5, 6), r"v4"))
    # Both operands of a weight gradient's chunk in one launch: dG^T's M-major chunk and x's N-major one, each
    # branch 16 bytes wide both sides.
    rows.append(_copy_kernel_row(mm.restage_pair_kernel, "restage pair", {
        "X1": "*fp32", "Y1": "*fp32", "R1": "i32", "C1": "i32", "s_x1r": "constexpr", "s_x1c": "i32", "s_y1r": "i32",
        "s_y1c": "constexpr", "X2": "*fp32", "Y2": "*fp32", "R2": "i32", "C2": "i32", "s_x2r": "i32",
        "s_x2c": "constexpr", "s_y2r": "constexpr", "s_y2c": "i32"},
        dict(s_x1r=1, s_y1c=1, s_x2c=1, s_y2r=1, BR=64, BC=64), (0, 1, 2, 3, 5, 6, 8, 9, 10, 11, 12, 15), r"v4"))
    # The float16 rows of a K-major float32 operand (x, dG): 16-byte loads, stores of 8 bytes or more.
    rows.append(_copy_kernel_row(mm.half_rows_kernel, "half rows", {
        "X": "*fp32", "Y": "*fp16", "E": "*i32", "R": "i32", "C": "i32", "s_xr": "i32", "s_xc": "constexpr"},
        dict(s_xc=1, BR=16, BC=128), (0, 1, 2, 4, 5), r"v[24]"))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tritonlstm.compilecheck", description=__doc__.splitlines()[0])
    ap.add_argument("--min-hidden", type=int, default=1, help="only configs for H >= this (default 1)")
    ap.add_argument("--max-hidden", type=int, default=1024,
                    help="check every config the H100 heuristic picks for H up to this (default 1024; 4096 "
                         "adds the streamed-W configs)")
    ap.add_argument("--json", metavar="FILE", help="write the results as JSON")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiles in parallel (default: CPUs)")
    ap.add_argument("--reduce-scatter", action="store_true",
                    help="check the backward's reduce-scatter configs instead (tuner candidates, at B = 1 and 16)")
    ap.add_argument("--grid-2d", action="store_true",
                    help="check the backward's 2-D grid configs instead (tuner candidates, at B = 64 and 256)")
    ap.add_argument("--half-w", action="store_true",
                    help="check the float32 configs with W in float16 instead (tuner candidates: the forward's at "
                         "B = 1, 16 and 256, the backward's tiles at B = 1, 16 and 64)")
    ap.add_argument("--matmul", action="store_true", help="check the float32 TF32 GEMM kernel instead")
    ap.add_argument("--rounds", action="store_true",
                    help="also count each kernel's L2 round trips in series of its 16-byte .cg loads (load_rounds, "
                         "from SASS; ~0.4 s a kernel)")
    ap.add_argument("--gpu", choices=sorted(GPUS), default="h100",
                    help="the GPU whose heuristic picks to check, compiled for its architecture within its shared "
                         "memory (default h100)")
    args = ap.parse_args(argv)
    target = GPUS[args.gpu]
    if args.matmul:
        rows = check_matmul()
        for r in rows:
            t = r["tiles"]
            if r["layout"] in ("restage", "restage pair", "half rows"):
                print(f"{r['layout']} {t['BM']}x{t['BN']} warps={t['num_warps']} shared={r['shared']} 16-byte loads "
                      f"{r['wide_loads']} stores {r['wide_stores']}, 4-byte loads {r['narrow_loads']}")
                continue
            print(f"matmul {t['BM']}x{t['BN']}x{t['BK']} warps={t['num_warps']} {r['layout']:9} "
                  + (r["error"] or f"shared={r['shared']} regs={r['registers']} spills={r['spill_bytes']} "
                                   f"wgmma={r['wgmma']} 4-byte cp.async={r['narrow_copies']} "
                                   f"16-byte loads into registers={r['wide_loads']}"))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
        bad = [r for r in rows if r["error"] or r["spill_bytes"] or r["shared"] > SM90_SHARED_LIMIT]
        return 1 if bad else 0
    rows = []
    if args.reduce_scatter or args.grid_2d or args.half_w:
        which = GRID_2D if args.grid_2d else HALF_W if args.half_w else REDUCE_SCATTER
        configs = variant_configs(*which, args.max_hidden, args.min_hidden, target)
        if args.half_w:
            configs += variant_configs(*HALF_W_BWD, args.max_hidden, args.min_hidden, target)
    else:
        configs = shipped_configs(args.max_hidden, args.min_hidden, target=target)
    # The single-layer forward in its training and inference variants; a stack only in its training one (with
    # dropout, the heavier of the two: compiling both doubled the sweep's time for nothing it found).
    jobs = [(kernel, dtype, hidden, cfg, prefetch, store, target, args.rounds)
            for kernel, dtype, hidden, cfg, prefetch in configs
            for store in ((True, False) if kernel == "fwd" else (True,))]
    with concurrent.futures.ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = pool.map(_check_job, jobs)
        for (kernel, dtype, hidden, cfg, prefetch, store, _, _), r in zip(jobs, results):
            _report(rows, r, kernel, hidden, cfg, store, prefetch)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{**dataclasses.asdict(r), "config": dataclasses.asdict(r.config), "ok": r.ok} for r in rows],
                      f, indent=1)
    bad = [r for r in rows if not r.ok]
    print(f"{len(rows) - len(bad)} of {len(rows)} kernel configs within {args.gpu}'s limits (sm_{target.arch}, "
          f"{target.smem} bytes of shared memory)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
