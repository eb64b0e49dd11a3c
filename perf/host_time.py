"""Host time per call: what a host-bound call (LSTMCell in a Python loop, a short sequence) costs before any GPU
work, on a machine without one. Two modes:

- stub (default): the kernel launches stubbed out, on the CPU interpreter's path (the config from the interpreter's
  heuristic). Python and ATen only.
- LAUNCH=triton: the real launch path too (kernels.launcher's key and the launcher call; Triton's binding and
  specialisation on a first launch, or everywhere with TRITONLSTM_LAUNCH_CACHE=0) through a stand-in driver that
  compiles for sm_90 (ptxas, as compilecheck) and launches nothing; the configs as on an H100 (the shipped table,
  else the device heuristic). What the stub leaves out of a GPU host's
  time, except the CUDA driver's ~3-5 us per launch (ours and ATen's: ATen's ops compute on the CPU here, so use
  small shapes, as the cases do).

    python perf/host_time.py [case ...]          # cases: cell, cell_train, layer, layer_train, stack_fp32,
                                                 # layer16, layer16_train (default: all)
    LAUNCH=triton python perf/host_time.py cell  # with Triton's launch path
    PROFILE=cumulative python perf/host_time.py cell   # and cProfile's top 40 of the first case
    REF=1 python perf/host_time.py cell    # and the same call on torch.nn's module
    TREE=/path/to/other/checkout python perf/host_time.py cell   # time another checkout's code
    AB=/path/to/other/checkout ROUNDS=4 LAUNCH=triton python perf/host_time.py layer16   # an A/B: this checkout and
                                                                  # the other in alternating processes, the least
                                                                  # time of each (git worktree add /tmp/base REV)
"""

import functools
import inspect
import os
import sys
import time

TRITON_LAUNCH = os.environ.get("LAUNCH", "stub") == "triton"
if TRITON_LAUNCH:
    os.environ.pop("TRITON_INTERPRET", None)
else:
    os.environ["TRITON_INTERPRET"] = "1"
if os.environ.get("TREE"):  # another checkout, ahead of this one's editable install
    import importlib.util

    class _TreeKernels:
        """tritonlstm.kernels from the other checkout's kernels/ (the build maps it there; without this finder the
        kernels came from this checkout, whatever TREE said)."""

        @staticmethod
        def find_spec(name, path=None, target=None):
            if name != "tritonlstm.kernels" and not name.startswith("tritonlstm.kernels."):
                return None
            base = os.path.join(os.environ["TREE"], "kernels", *name.split(".")[2:])
            if os.path.isdir(base):
                return importlib.util.spec_from_file_location(name, os.path.join(base, "__init__.py"),
                                                              submodule_search_locations=[base])
            return importlib.util.spec_from_file_location(name, base + ".py")

    sys.meta_path[:] = [_TreeKernels] + [f for f in sys.meta_path if "editable" not in type(f).__name__.lower()]
    sys.path.insert(0, os.environ["TREE"])

import torch  # noqa: E402

import tritonlstm  # noqa: E402
from tritonlstm import functional  # noqa: E402

H100 = "NVIDIA H100 80GB HBM3"
launches = 0


def _launch_onto_nothing():
    """Triton's driver for a GPU that is not there: the kernels compile for sm_90 and each launch only counts; the
    configs are chosen as on an H100."""
    from tritonlstm import configs, modules, tuning
    from tritonlstm.compilecheck import launch_onto_nothing
    from tritonlstm.kernels import reduce

    def count(*args):
        global launches
        launches += 1

    launch_onto_nothing(count)

    class Props:
        multi_processor_count, name, major, minor = 132, H100, 9, 0  # clusters launch on sm_90 (shipped configs)

    torch.cuda.get_device_properties = lambda device=None: Props()  # kernels.reduce sizes its grid by the SMs

    class Stream:
        cuda_stream = 0

    torch.cuda.current_stream = lambda device=None: Stream()  # a cluster launch hands Triton's launcher the stream
    configs.device_limits = lambda device: (132, configs.SM90_SHARED)
    # kernels.reduce where CUDA tensors take it (from _STAGED_ROWS rows).
    if hasattr(functional, "_sums_by_kernel"):  # (v0.74: the decision in one place)
        functional._sums_by_kernel = lambda rows, m: rows >= functional._STAGED_ROWS
    else:  # (TREE= before v0.74)
        column_sums = functional._column_sums
        copies = "copies" in inspect.signature(reduce.column_sums).parameters  # (before v0.71: a [C] sum)
        functional._column_sums = lambda m, *args, **kw: (
            column_sums(m, *args, **kw) if m.shape[-2] < functional._STAGED_ROWS else
            reduce.column_sums(m, *args, **kw).unbind(0) if copies else reduce.column_sums(m))
    tuning.lookup = lambda kernel, hidden, batch, dtype, directions, device: tuning.lookup_in(
        H100, tuning.config_key(kernel, dtype, hidden, batch, directions))[0]
    select = configs.select_config
    functional.select_config = lambda *args, **kw: select(args[0], args[1], args[2], torch.device("cuda", 0), False,
                                                          *args[5:], **kw)
    # CPU tensors take the kernels' path (on a GPU: CUDA tensors), and the barrier's error flag is never set.
    functional.resolve_backend = modules.resolve_backend = lambda backend, device, dtype: "triton"
    kernels.barrier_errors.check = lambda device, wait=False: None
    kernels.barrier_errors.launched = lambda device, capturing: None


kernels = functional._kernels()
if TRITON_LAUNCH:
    _launch_onto_nothing()
else:
    kernels._run = lambda *args, **kwargs: None  # every launch
    # No program runs, so none has to be resident: stack_fp32's H100 config has 8, which the interpreter's one-program
    # rule for a persistent launch refuses (and the check costs ~1 us of a call).
    kernels._check_residency = lambda *args, **kwargs: None
    from tritonlstm.kernels import matmul, reduce

    # The other kernels, interpreted, would dominate: the bias sums', and stack_fp32's float16 operands'.
    kernels.launch_or_compile = matmul.launch_or_compile = reduce.launch_or_compile = lambda *args, **kwargs: True

H, B, T = 32, 4, 8
torch.manual_seed(0)
cell = tritonlstm.LSTMCell(H, H, backend="triton")
lstm = tritonlstm.LSTM(H, H, backend="triton")
x, xs = torch.randn(B, H), torch.randn(T, B, H)
hx = (torch.randn(B, H), torch.randn(B, H))


def cell_step(m=cell):
    with torch.no_grad():
        m(x, hx)


def cell_train(m=cell):
    h, c = m(x, hx)
    (h.sum() + c.sum()).backward()


def layer(m=lstm):
    with torch.no_grad():
        m(xs)


xs_grad = xs.clone().requires_grad_()


def layer_train(m=lstm):
    y, _ = m(xs_grad)
    y.backward(torch.ones_like(y))


stack = tritonlstm.LSTM(H, H, num_layers=4, backend="triton")

# The bench's small 16-bit cells (B = 16) in bfloat16 (ATen's float16 matmul on a CPU takes ms) at H = 64, T = 2, so
# that ATen's CPU compute stays small: the host path of the cells whose training steps clustered at 2.2-2.5 ms on
# run 7's H200 whatever their GPU time.
# HT16_H=16 shrinks ATen's share further (the config then differs; the host path does not).
H16 = int(os.environ.get("HT16_H", 64))
lstm16 = tritonlstm.LSTM(H16, H16, backend="triton").bfloat16()
xs16 = torch.randn(2, 16, H16).bfloat16().requires_grad_()


def layer16(m=lstm16):
    with torch.no_grad():
        m(xs16)


def layer16_train(m=lstm16):
    y, _ = m(xs16)
    y.backward(torch.ones_like(y))
    for p in (xs16, *m.parameters()):
        p.grad = None  # as the bench's timer (grad_to_none)


def stack_fp32(m=stack):
    """A float32 4-layer stack's forward on the float16 operands (LSTMConfig.half_w, TF32 allowed), as the heuristic
    picks it at H = 512: the operands' preparation (_half_weights) is part of every call."""
    from tritonlstm.configs import named_variants, use_config

    half = named_variants("fwd", H, B, torch.float32, 132, names=("transposed-half",))["transposed-half"]
    with torch.no_grad(), use_config(half, "stack"), torch.backends.cudnn.flags(enabled=True, allow_tf32=True):
        m(xs)


CASES = {"cell": cell_step, "cell_train": cell_train, "layer": layer, "layer_train": layer_train,
         "stack_fp32": stack_fp32, "layer16": layer16, "layer16_train": layer16_train}

# REF=1: the same calls on torch.nn's modules (ATen on this CPU, its compute included: a few us at these sizes), for
# what a host-bound loop of them costs against ours.
NN = {"cell": torch.nn.LSTMCell(H, H), "layer": torch.nn.LSTM(H, H), "stack": torch.nn.LSTM(H, H, num_layers=4)}
NN["cell_train"], NN["layer_train"], NN["stack_fp32"] = NN["cell"], NN["layer"], NN["stack"]
NN["layer16"] = NN["layer16_train"] = torch.nn.LSTM(H16, H16).bfloat16()

WARM, BLOCKS, BLOCK = 100, 60, 40


def best_of(fn) -> float:
    """Seconds a call: the least of BLOCKS blocks of BLOCK calls in this thread's CPU time (another process taking
    one of a 2-core machine's cores moves wall-clock times by +-30 %; this minimum reproduces to ~3 %)."""
    for _ in range(WARM):
        fn()
    best = float("inf")
    for _ in range(BLOCKS):
        start = time.thread_time()
        for _ in range(BLOCK):
            fn()
        best = min(best, (time.thread_time() - start) / BLOCK)
    return best


def ab(names: list[str], other: str, rounds: int) -> None:
    """This checkout against another (TREE=other), in alternating processes pinned to one core where taskset
    exists, each case's least time over the rounds: what perf/NOTES.md v0.49 / v0.50's tables were measured with."""
    import re
    import shutil
    import subprocess

    pin = ["taskset", "-c", "1"] if shutil.which("taskset") and (os.cpu_count() or 1) > 1 else []
    best: dict[tuple[str, str], float] = {}
    for _ in range(rounds):
        for side, tree in (("this", None), ("other", other)):
            env = {k: v for k, v in os.environ.items() if k not in ("AB", "TREE", "PROFILE", "REF")}
            if tree:
                env["TREE"] = tree
            out = subprocess.run([*pin, sys.executable, __file__, *names], env=env, capture_output=True, text=True,
                                 check=True).stdout
            for name, us in re.findall(r"^(\w+): ([0-9.]+) us", out, re.M):
                best[side, name] = min(best.get((side, name), float("inf")), float(us))
    print(f"{'case':<16}{'this':>10}{'other':>10}  (us, least of {rounds} rounds; other = {other})")
    for name in names:
        this, that = best.get(("this", name)), best.get(("other", name))
        change = f"  {100 * (this / that - 1):+.1f} %" if this and that else ""
        print(f"{name:<16}{this or float('nan'):10.1f}{that or float('nan'):10.1f}{change}")


if __name__ == "__main__":
    names = sys.argv[1:] or list(CASES)
    if os.environ.get("AB"):
        ab(names, os.environ["AB"], int(os.environ.get("ROUNDS", 4)))
        sys.exit(0)

    for name in names:
        before = launches
        best = best_of(CASES[name])
        calls = WARM + BLOCKS * BLOCK
        per_call = f" ({(launches - before) / calls:g} Triton launches a call)" if TRITON_LAUNCH else ""
        ref = ""
        if os.environ.get("REF"):
            ref = f"; torch.nn: {best_of(functools.partial(CASES[name], NN[name])) * 1e6:.0f} us"
        print(f"{name}: {best * 1e6:.1f} us{per_call}{ref}")
    if os.environ.get("PROFILE"):
        import cProfile
        import pstats

        profile = cProfile.Profile()
        profile.enable()
        for _ in range(500):
            CASES[names[0]]()
        profile.disable()
        pstats.Stats(profile).sort_stats(os.environ["PROFILE"]).print_stats(40)
