"""kernels.launcher (perf/NOTES.md v0.49): its launches hand Triton's launcher what `kernel[grid](...)` hands it,
the same compiled kernel included, for every specialisation Triton distinguishes. Checked through a stand-in driver
that compiles for sm_90 and records each launch instead of running it (no GPU needed)."""

from helpers import run_python

SPECIALISATIONS = """
import torch
from tritonlstm.compilecheck import launch_onto_nothing

calls = []
launch_onto_nothing(lambda *args: calls.append(args))
from tritonlstm.kernels import launcher
from tritonlstm.kernels.reduce import column_sums_kernel as kernel, BLOCK_ROWS, BLOCK_COLS

warmups = []
warmup = kernel.warmup
kernel.warmup = lambda *a, **kw: warmups.append(1) or warmup(*a, **kw)
base = torch.zeros(4096, dtype=torch.float16)
half, single = base[:2048].view(32, 64), torch.zeros(32, 64)
part, out = torch.zeros(128, dtype=torch.float32), torch.zeros(64, dtype=torch.float32)
count = torch.zeros(2, dtype=torch.int32)
meta = dict(BN=BLOCK_ROWS, BC=BLOCK_COLS, FINISH=True, COPIES=1)
cases = [
    (half, part, count, out, 32, 64, 16, 2),             # the first: compiled
    (base[16:2064].view(32, 64), part, count, out, 32, 64, 16, 2),  # another 16-byte aligned tensor: the same entry
    (base[1:2049].view(32, 64), part, count, out, 32, 64, 16, 2),   # misaligned
    (single, part, count, out, 32, 64, 16, 2),           # another dtype
    (half, part, count, out, 1, 64, 16, 2),              # an int of 1 (a constexpr in Triton's specialisation)
    (half, part, count, out, 33, 64, 16, 2),             # not a multiple of 16
    (half, part, count, out, 2 ** 31, 64, 16, 2),        # 64-bit
    (half, part, count, out, 48, 64, 16, 2),             # a multiple of 16 again: the first's entry
]
same = []
for args in cases:
    kernel[(2, 1, 1)](*args, **meta)
    jit = calls.pop()
    launcher.launch(kernel, (2, 1, 1), args, meta)
    ours = calls.pop()
    same.append(ours[:4] == jit[:4] and ours[4] is jit[4] and ours[5] == jit[5] and type(ours[6]) is type(jit[6])
                and ours[7:] == jit[7:])
print(all(same), same.index(False) if False in same else -1, len(warmups),
      len(launcher._kernels[id(kernel)].entries))
"""


def test_launch_cache_picks_the_compiled_kernel_tritons_run_picks():
    """Each case launched by kernel[grid] and by launcher.launch: the same grid, stream, function (the compiled
    kernel's, by identity), metadata, hooks and arguments (the launch metadata is a new object each launch). The
    cases cross every class of Triton's specialisation; a key that left one out (alignment, dtype, 1, divisibility
    by 16, 64-bit) would hand the launcher the compiled kernel of another case. Six entries for eight cases: the
    second and the last reuse the first's, without compiling."""
    proc = run_python("-c", SPECIALISATIONS, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["True", "-1", "6", "6"], proc.stdout


LAYER_LAUNCH = """
import torch
from tritonlstm.compilecheck import launch_onto_nothing

calls = []
launch_onto_nothing(lambda *args: calls.append(args))
from tritonlstm import configs
from tritonlstm.kernels import launcher, lstm as k

configs.device_limits = lambda device: (132, configs.SM90_SHARED)
k.barrier_errors.check = lambda device, wait=False: None
k.barrier_errors.launched = lambda device, capturing: None
k._check_residency = lambda *args: None
T, B, H = 3, 16, 32
gx = torch.randn(T, B, 4 * H, dtype=torch.bfloat16)
w = torch.randn(1, 4 * H, H, dtype=torch.bfloat16)
bias, h0 = torch.randn(1, 4 * H), torch.randn(1, B, H, dtype=torch.bfloat16)
config = configs._device_pick(H, B, torch.bfloat16, 132, configs.SM90_SHARED, "fwd", 1, 1)
def forward():
    k.lstm_forward(gx, w, bias, h0, torch.zeros(1, B, H), None, reverse=False, store_gates=True, config=config)
forward()
launch = launcher.launch
launcher.launch = lambda kernel, grid, args, meta: kernel[grid](*args, **meta)
forward()
launcher.launch = launch
forward()
ours, jit, again = calls
same = lambda a, b: a[:4] == b[:4] and a[4] is b[4] and a[5] == b[5] and a[7:9] == b[7:9] and len(a) == len(b) and all(
    x is y or x == y if not isinstance(x, torch.Tensor) else x.shape == y.shape and x.dtype == y.dtype
    for x, y in zip(a[9:], b[9:]))
print(same(ours, jit), same(again, jit), len(ours) - 9 == len(k.lstm_fwd_kernel.arg_names))
"""


def test_forward_launch_through_the_cache_matches_tritons_own():
    """lstm_forward's launch (25 arguments, 27 keywords) through the cache, before and after a launch by
    kernel[grid]: what reaches the launcher is the same (function, metadata, every parameter in order)."""
    proc = run_python("-c", LAYER_LAUNCH, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["True"] * 3, proc.stdout


def test_launches_the_cache_cannot_key_go_through_tritons_own_path(monkeypatch):
    """Arguments the key does not know (here a string), runtime arguments given as keywords and keyword values that
    cannot be hashed fall back to kernel[grid](...) rather than being refused or keyed wrongly."""
    from tritonlstm.kernels import launcher

    class Kernel(launcher.JITFunction):
        def __init__(self):
            self.pre_run_hooks, self.params, self.arg_names, self.launched = [], [], ["X", "N"], []

        def __getitem__(self, grid):
            return lambda *args, **meta: self.launched.append((grid, args, meta))

    monkeypatch.setattr(Kernel, "warmup", lambda *a, **kw: (_ for _ in ()).throw(AssertionError("keyed")),
                        raising=False)
    monkeypatch.setattr(launcher, "driver", type("Driver", (), {"active": type("GPU", (), {
        "get_current_device": staticmethod(lambda: 0)})}))  # (no GPU here)
    kernel = Kernel()
    launcher.launch(kernel, (1,), ("a string", 3), {})
    launcher.launch(kernel, (1,), (None,), {"N": 3})
    launcher.launch(kernel, (2,), (None, 3), {"num_warps": [4]})
    assert kernel.launched == [((1,), ("a string", 3), {}), ((1,), (None,), {"N": 3}),
                               ((2,), (None, 3), {"num_warps": [4]})]


def test_the_key_never_joins_what_tritons_specialisation_tells_apart():
    """launcher._arg_key against Triton's own specialisation of one argument (native_specialize_impl, what its
    binder calls), over integers around every boundary it draws, tensors of several dtypes at every offset of a
    16-byte line, bools, None and floats: two arguments with one key always have one specialisation."""
    import itertools

    import torch
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    from tritonlstm.kernels import launcher

    ints = {0, 1, 2, 15, 16, 17, 32, 48, 1000, 1024, -1, -15, -16, -17}
    for edge in (2 ** 31, 2 ** 32, 2 ** 63):
        ints |= {edge - 16, edge - 1, edge, edge + 1, edge + 16, -edge - 16, -edge - 1, -edge, -edge + 1}
    ints = [v for v in ints if -2 ** 63 <= v < 2 ** 64]
    tensors = []
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.int32, torch.int64):
        base = torch.zeros(64, dtype=dtype)
        tensors += [base[i:] for i in range(16 // base.element_size() + 1)]
    values = ints + tensors + [True, False, None, 0.5, 3.0]

    def triton_spec(v):
        return native_specialize_impl(BaseBackend, v, False, True, True)

    checked = 0
    for a, b in itertools.combinations(values, 2):
        try:
            same_key = launcher._arg_key(a) == launcher._arg_key(b)
        except TypeError:
            continue
        if same_key:
            assert triton_spec(a) == triton_spec(b), (a, b)
            checked += 1
    assert checked > 100
