"""`fused_lstm`: one LSTM layer in one direction, as a differentiable op.

Forward: one GEMM for the input projection of all steps (cuBLAS through torch), then the recurrence kernel.
Backward: the reverse recurrence kernel gives dG (the gate pre-activation gradients of every step, which is
the gradient of the projection's output), then plain GEMMs give the weight, bias and input gradients:
deterministic, no atomics. In float32 on CUDA these GEMMs run on TF32 tensor cores (kernels/matmul.py) where
PyTorch's RNN precision allows it, as nn.LSTM's cuDNN path runs them (`_tf32_gemms`).

The recurrence, forward and backward, is a pair of `torch.library` custom ops with fake-tensor and autograd
registrations, so `torch.compile` sees one opaque op per layer and direction instead of a graph break; the input
projection around it is ordinary autograd. Eager calls skip the custom-op dispatch (15-20 % of a call's host
time) and run the same functions under a plain autograd.Function (`_call`).
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
import warnings

import torch
from torch import Tensor

from tritonlstm.configs import (
    device_limits,
    forced_config,
    full_precision_backward,
    last_resort_config,
    select_config,
    stack_layers_per_launch,
    without_half_w,
)
from tritonlstm.naive import lstm_layer_reference

BACKENDS = ("auto", "triton", "torch")
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _kernel_module(name: str):
    """tritonlstm.kernels.<name>: imported on first use, so that `python -m tritonlstm` can set TRITON_INTERPRET
    before triton loads; then found in sys.modules (import_module's own lookup costs a few us on every launch of a
    host-bound step)."""
    full = f"tritonlstm.kernels.{name}"
    return sys.modules.get(full) or importlib.import_module(full)


def _kernels():
    return _kernel_module("lstm")


def interpreter_active() -> bool:
    """True when the Triton kernels run (or, not yet loaded, will run) on the CPU interpreter. Reads only the
    environment and sys.modules, so torch.compile can trace it."""
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return False
    loaded = sys.modules.get("tritonlstm.kernels.lstm")
    return True if loaded is None else loaded.interpreting()


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """"triton" or "torch" for this call; raises if "triton" was asked for and cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    triton_dtype = dtype in TRITON_DTYPES
    runnable = device.type == "cuda" or (device.type == "cpu" and interpreter_active())
    if backend == "auto":
        return "triton" if runnable and triton_dtype else "torch"
    if backend == "triton":
        if not triton_dtype:
            raise TypeError(f"backend='triton' supports dtypes {[str(d) for d in TRITON_DTYPES]}, got {dtype}")
        if not runnable:
            why = ("TRITON_INTERPRET=1 was set after triton was imported; set it before importing triton"
                   if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") else
                   "set TRITON_INTERPRET=1 before triton is imported to run the kernels on the CPU interpreter")
            raise RuntimeError(f"backend='triton' cannot run on device '{device}': the Triton kernels need CUDA "
                               f"tensors, or the CPU interpreter ({why})")
    return backend


# ----------------------------------------------------------------------------------------------------------
# The float32 GEMMs
# ----------------------------------------------------------------------------------------------------------

# Tests set this to run the TF32 GEMM path on the CPU interpreter's float32 tensors too.
_TF32_GEMMS_ON_CPU = False


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype torch.lstm runs in under autocast on this device (a lower-precision op on CUDA and on the CPU),
    or None where autocast is off."""
    if device.type in ("cuda", "cpu") and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def _cast_floating(dtype: torch.dtype, obj):
    """obj with every float16/32 and bfloat16 tensor in it (through tuples and lists) cast to dtype, as autocast
    casts an op's inputs (float64 and non-floating tensors stay)."""
    if isinstance(obj, Tensor):
        return obj.to(dtype) if obj.is_floating_point() and obj.dtype != torch.float64 else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_cast_floating(dtype, t) for t in obj)
    return obj


def _in_autocast_dtype(fn):
    """fn(x, ...) as torch.lstm runs under autocast: every floating argument (float64 aside) in the autocast dtype
    of x's device, and autocast off inside (its matmuls must keep the dtype of the states the kernels get)."""
    @functools.wraps(fn)
    def wrapper(x, *args, **kwargs):
        cast = autocast_dtype(x.device) if isinstance(x, Tensor) else None
        if cast is None:
            return fn(x, *args, **kwargs)
        with torch.autocast(x.device.type, enabled=False):
            return fn(*_cast_floating(cast, (x, *args)), **{k: _cast_floating(cast, v) for k, v in kwargs.items()})
    return wrapper


def _without_autocast(fn):
    """fn with autocast off: its matmuls must run in the dtype of the tensors it hands the kernels (under
    autocast a gx of another dtype than the states reaches the kernel as mismatched pointers)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not (torch.is_autocast_enabled("cuda") or torch.is_autocast_enabled("cpu")):
            return fn(*args, **kwargs)  # (two autocast contexts cost ~10 us of a host-bound step's backward)
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return fn(*args, **kwargs)
    return wrapper


def _tf32_gemms(*tensors: Tensor) -> bool:
    """Whether a layer's float32 GEMMs (input projection, input and weight gradients, the projection of
    proj_size) run on kernels.matmul with TF32, as nn.LSTM's cuDNN path runs them: float32 CUDA tensors and
    PyTorch's RNN precision allowing TF32 (its default), eagerly on plain tensors. torch.mm would follow the
    matmul precision instead, full float32 by default and 5-8x slower on an H100. Under torch.compile and
    tensor subclasses the GEMMs stay torch's."""
    t = tensors[0]
    return (t.dtype == torch.float32 and (t.device.type == "cuda" or _TF32_GEMMS_ON_CPU and interpreter_active())
            and not torch.compiler.is_compiling() and _plain(*tensors)
            and _kernels()._rnn_allows_tf32())


# ATen splits a row sum over blocks, and stages their partials, once a thread would add 256 values: from 4096 rows
# at 16 rows a block (what it takes for 4H >= 128 outputs), from 1024 at 4. Below, its one launch costs less host
# time than a Triton launch.
_STAGED_ROWS = 1024


def _sums_by_kernel(rows: int, m: Tensor) -> bool:
    """Whether _column_sums sums `rows` rows of m (or of a tensor on its device) on kernels.reduce."""
    return (m.device.type == "cuda" and rows >= _STAGED_ROWS or interpreter_active()) \
        and not torch.compiler.is_compiling() and _plain(m)


def _column_sums(m: Tensor, dtype: torch.dtype = torch.float32, copies: int = 1) -> tuple[Tensor, ...]:
    """m [N, C] or [L, N, C] summed over its rows in float32 (the bias gradient, N = T*B), as `copies` separate
    [(L,) C] tensors in `dtype`: kernels.reduce on the GPU from _STAGED_ROWS rows (and at any size on the interpreter,
    which the tests run), one launch for the sums, their cast and both biases' copies; eagerly on plain tensors.
    ATen's sum over the rows of a tall CUDA tensor staged 30-140 MB of partial sums, the excess of run 5's training
    peaks over the counted tensors (perf/NOTES.md v0.30). Under torch.compile the compiler generates its own
    reduction."""
    if _sums_by_kernel(m.shape[-2], m):
        return _kernel_module("reduce").column_sums(m, dtype, copies).unbind(0)
    sums = m.sum(-2, dtype=torch.float32).to(dtype)
    return (sums,) if copies == 1 else (sums, sums.clone())


def _tf32_matmul(a: Tensor, b: Tensor, half: bool = False, row_chunk: int | None = None,
                 cublas: bool = False) -> Tensor:
    return _kernel_module("matmul").matmul(a, b, half=half, row_chunk=row_chunk, cublas=cublas)


def _mm(a: Tensor, b: Tensor) -> Tensor:
    """a @ b, on TF32 where `_tf32_gemms` says so."""
    return _tf32_matmul(a, b) if _tf32_gemms(a, b) else a @ b


class _TF32Projection(torch.autograd.Function):
    """x [N, I] @ w [G, I]^T with both gradients on kernels.matmul (TF32). The product on row-scaled float16
    operands where it is large (kernels/matmul.py, perf/NOTES.md v0.43), x's rows converted at once (the forward's
    peak is far below the backward's). Not the input gradient (grad @ w): its float16 path, grad's rows converted in
    chunks, took 1.2-5.8x TF32's time at every measured shape (run 7, H200), unless kernels.matmul.HALF_GRADS puts
    its product on cuBLAS (v0.62, not yet timed)."""

    @staticmethod
    def forward(ctx, x, w):  # only ever applied where _project found _tf32_gemms
        ctx.save_for_backward(x, w)
        return _tf32_matmul(x, w.t(), half=True, row_chunk=x.shape[0])

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx = None
        if need[0]:
            dx = _tf32_matmul(grad, w, half=True, cublas=True) if _kernel_module("matmul").HALF_GRADS else _mm(grad, w)
        return dx, _mm(grad.t(), x) if need[1] else None


def _project(x: Tensor, w: Tensor) -> Tensor:
    """x [N, I] @ w [G, I]^T: the input projection (and proj_size's output projection), differentiable."""
    if _tf32_gemms(x, w) and not torch.jit.is_tracing():
        return _TF32Projection.apply(x, w)
    return torch.mm(x, w.t())


# ----------------------------------------------------------------------------------------------------------
# The custom ops
# ----------------------------------------------------------------------------------------------------------


def _last_steps(lengths: Tensor | None, device: torch.device) -> Tensor | None:
    return None if lengths is None else (lengths.to(device=device, dtype=torch.int32) - 1).contiguous()


def _custom_op(name: str):
    """torch.library.custom_op, keeping the plain function as `.eager` for `_call`."""
    def wrap(fn):
        op = torch.library.custom_op(f"tritonlstm::{name}", fn, mutates_args=())
        op.eager = op.pure = fn
        return op
    return wrap


def _no_forward_ad(ctx, *tangents):
    raise NotImplementedError(
        "tritonlstm: forward-mode AD (torch.func.jvp, torch.autograd.forward_ad) is not supported by the Triton "
        "kernels (nor by nn.LSTM's cuDNN and oneDNN paths). fused_lstm(..., backend='torch'), a loop of plain "
        "PyTorch ops, supports it.")


def _register_autograd(op, backward, setup_context) -> None:
    """The op's autograd formula, for the custom op and for its eager paths alike: `eager_autograd` for plain
    tensors, `transformable` under torch.func (grad, vjp, vmap of them), where the custom op's own autograd
    fails (PyTorch #168393: the Function it generates has no setup_context). The latter runs the op's function
    without writing over its inputs (a separate setup_context may not save an input returned as an output)
    and, under vmap, once per sample."""
    op.register_autograd(backward, setup_context=setup_context)

    class Eager(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            out = op.eager(*args)
            setup_context(ctx, args, out)
            # Its callers (lstm_layer, lstm_stack) drop the saved outputs (gates, c_all), so nobody but the
            # backward sees them and it may reuse their memory (_graph_released_after_this_backward). Through the
            # custom op they are the caller's outputs and stay as they are.
            ctx.outputs_private = True
            return out

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)

        jvp = staticmethod(_no_forward_ad)

    class Transformable(torch.autograd.Function):
        @staticmethod
        def forward(*args):
            return op.pure(*args)

        @staticmethod
        def setup_context(ctx, inputs, output):
            setup_context(ctx, inputs, output)

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)

        jvp = staticmethod(_no_forward_ad)

        @staticmethod
        def vmap(info, in_dims, *args):
            outs = [Transformable.apply(*(a.select(d, i) if d is not None else a for a, d in zip(args, in_dims)))
                    for i in range(info.batch_size)]
            return tuple(torch.stack(column) for column in zip(*outs)), (0,) * len(outs[0])

    op.eager_autograd, op.transformable = Eager, Transformable


_is_wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", lambda t: False)
# functionalize has no rule for an autograd.Function (custom_function_call); the custom op it functionalizes.
_is_functional = getattr(torch._C._functorch, "is_functionaltensor", lambda t: False)
# How many TorchDispatchModes are active, and the kinds that trace a graph (make_fx's proxy mode, fake and functional
# tensors' modes) rather than watch ops run (FlopCounterMode, memory trackers, which keep the eager paths).
_dispatch_modes = getattr(torch._C, "_len_torch_dispatch_stack", lambda: 0)
_TRACING_MODES = tuple(key for key in (getattr(getattr(torch._C, "_TorchDispatchModeKey", None), name, None)
                                        for name in ("PROXY", "FAKE", "FUNCTIONAL")) if key is not None)


def _tracing_mode() -> bool:
    """Whether a dispatch mode that builds a graph is active (~0.06 us where no mode is)."""
    return _dispatch_modes() > 0 and any(torch._C._get_dispatch_mode(key) is not None for key in _TRACING_MODES)


def _plain(*tensors) -> bool:
    """Whether the kernels may take these as they are: each not a tensor, or a plain one (no subclass, no torch.func
    wrapper), and no graph-building dispatch mode active. Under one (make_fx's) a launch would be invisible to it,
    the graph missing the LSTM: each eager path asks this, and the calls go through the custom ops, which it sees."""
    return not _tracing_mode() and all(
        not isinstance(t, Tensor) or (type(t) in (Tensor, torch.nn.Parameter) and not _is_wrapped(t)) for t in tensors)


def _records_grad(*tensors: Tensor | None) -> bool:
    """Whether a call must keep what its backward needs (the gates, the cells). Under torch.jit.trace it does
    not follow grad mode, so that a trace is the same graph with or without it (trace's own check re-runs
    under no_grad) and a traced module still trains."""
    return (torch.is_grad_enabled() or torch.jit.is_tracing()) and any(
        t is not None and t.requires_grad for t in tensors)


def _call(op, *args):
    """Runs one of the ops. Eagerly, on plain tensors: its function directly, under the autograd.Function of
    its formula when gradients are recorded (the custom-op dispatch cost 25-45 us of host time per forward
    call on the CI machine, perf/NOTES.md v0.7). Under torch.func transforms: that autograd.Function too (see
    _register_autograd). Otherwise (torch.compile, torch.jit.trace, fake or functional tensors while a graph is
    traced, tensor subclasses, a graph-building dispatch mode such as make_fx's, torch.func.functionalize): the
    custom op, which a trace records as one node. The backward ops' formula refuses double backward with a clear
    error."""
    if _runs_op_eager(args):
        return op.eager(*args)
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return op(*args)
    if not _plain(*args):
        wrapped = [a for a in args if isinstance(a, Tensor) and _is_wrapped(a)]
        if wrapped and not any(_is_functional(a) for a in wrapped):  # torch.func, less functionalize
            return op.transformable.apply(*args)
        return op(*args)
    return op.eager_autograd.apply(*args)


def _runs_op_eager(args: tuple) -> bool:
    """Whether _call runs an op's function directly: eagerly, on plain tensors, no gradient recorded."""
    return not (torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.is_grad_enabled()) \
        and _plain(*args)


def _graph_released_after_this_backward(ctx, *saved: Tensor) -> bool:
    """Whether a backward may write dG over the gates it was saved (the training step's largest buffers, 8 bytes
    per T*B*H in 16-bit: perf/NOTES.md, peak memory), as cuDNN's backward writes over its reserve space: only in
    the backward of an eager call (not the custom op's, whose outputs the caller holds) whose graph is freed
    when it returns (no retain_graph, no create_graph), on plain tensors. Otherwise, e.g. a second backward
    through a retained graph, the gates must stay as saved."""
    if not getattr(ctx, "outputs_private", False) or torch.compiler.is_compiling() or torch.is_grad_enabled() \
            or not _plain(*saved):
        return False
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    try:
        return keep_graph is not None and not keep_graph()
    except RuntimeError:  # not inside an autograd graph task
        return False


def _launch(kernel: str, H: int, B: int, dtype: torch.dtype, device: torch.device, launch, directions: int = 1,
            layers: int = 1, steps: int | None = None):
    """launch(config) with the config select_config picks. Where Triton finds that config needs more shared memory
    than this GPU has (configs.fit_shared_memory sizes every pick from an estimate checked on sm_80 / sm_86 /
    sm_89 / sm_90; this is for the GPUs it was not checked on), once more with configs.last_resort_config, and a
    warning that says so. The kernel has not started when Triton raises that, so nothing was written."""
    k = _kernels()
    config = select_config(H, B, dtype, device, k.interpreting(), kernel, directions, layers)
    # half_w where allowed (a cache may hold others), and not for one step (an LSTMCell's): it reads W once, so
    # converting W to float16 first would cost a launch and save nothing.
    if config.half_w and kernel in ("fwd", "stack") and (steps == 1 or not k.half_w_allowed(dtype)):
        config = without_half_w(config)
    if config.half_w and kernel == "bwd" and not config.transposed and not k.half_w_allowed(dtype):
        # float32 W does not fit where float16's did: the layout the heuristic picks without half_w.
        standin = full_precision_backward(H, B, dtype, device, k.interpreting(), directions) \
            if dtype.itemsize == 4 else None
        config = without_half_w(config, standin)
    from triton.runtime.errors import OutOfResources

    try:
        return launch(config)
    except OutOfResources as e:
        if forced_config(kernel) is not None:
            raise
        fallback = last_resort_config(kernel, B, dtype)
        warnings.warn(f"tritonlstm: the {kernel} kernel's config {config} does not fit this GPU ({e}); running "
                      f"{fallback} instead, which is slower. `python -m tritonlstm.tune` finds the fastest that fits.",
                      RuntimeWarning, stacklevel=2)
        return launch(fallback)


def _recurrence_forward(gx: Tensor, weight_hh: Tensor, bias_ih: Tensor | None, bias_hh: Tensor | None,
                        h0: Tensor | None, c0: Tensor | None, lengths: Tensor | None, reverse: bool, training: bool,
                        gates_into_gx: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    k = _kernels()
    T, B, _ = gx.shape
    D, _, H = weight_hh.shape
    c_ws = None if c0 is None else c0.to(torch.float32, copy=True).contiguous()
    gx = gx.contiguous()
    y, hn, cn, gates, c_all = _launch("fwd", H, B, gx.dtype, gx.device, lambda config: k.lstm_forward(
        gx, weight_hh.contiguous(), bias_ih, _contiguous(h0), c_ws, _last_steps(lengths, gx.device),
        reverse=reverse, store_gates=training, config=config, bias_hh=bias_hh,
        gates_out=gx if gates_into_gx and training and lengths is None else None), directions=D, steps=T)
    if not training:
        return y, hn, cn, gx.new_empty(0), gx.new_empty(0, dtype=torch.float32)
    return y, hn, cn, gates, c_all


@_custom_op("lstm_recurrence")
def _lstm_recurrence(gx: Tensor, weight_hh: Tensor, bias_ih: Tensor | None, bias_hh: Tensor | None,
                     h0: Tensor | None, c0: Tensor | None, lengths: Tensor | None, reverse: bool,
                     training: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The recurrence of D directions in one launch (direction 1 in reverse; a single direction in reverse when
    `reverse`): gx = x @ W_ih^T [T, B, D*4H], weight_hh [D, 4H, H], bias_ih and bias_hh [D, 4H] ([4H] for D = 1)
    or None (the kernel adds them in float32), h0 and c0 [D, B, H] or None (zeros). Returns y [T, B, D*H], h_n,
    c_n [D, B, H] and, when training, the activated gates [T, B, D*4H] and c_t [T, B, D*H] float32 for the backward
    (empty otherwise)."""
    return _recurrence_forward(gx, weight_hh, bias_ih, bias_hh, h0, c0, lengths, reverse, training)


# Eagerly (_call), gx is always the caller's temporary (lstm_layer's input projection), read by nobody after
# the kernel: the activated gates are written over it, one [T, B, D*4H] buffer fewer at the forward's peak
# (perf/NOTES.md v0.12). The custom op's own outputs must not alias its inputs, so it keeps them apart.
_lstm_recurrence.eager = functools.partial(_recurrence_forward, gates_into_gx=True)


@_lstm_recurrence.register_fake
def _(gx, weight_hh, bias_ih, bias_hh, h0, c0, lengths, reverse, training):
    T, B, G = gx.shape
    D, _, H = weight_hh.shape
    y, hn, cn = gx.new_empty(T, B, D * H), gx.new_empty(D, B, H), gx.new_empty(D, B, H)
    if training:
        return y, hn, cn, gx.new_empty(T, B, G), gx.new_empty(T, B, D * H, dtype=torch.float32)
    return y, hn, cn, gx.new_empty(0), gx.new_empty(0, dtype=torch.float32)


def _contiguous(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.contiguous()


def _recurrence_backward(dy: Tensor, dhn: Tensor | None, dcn: Tensor | None, gates: Tensor, c_all: Tensor,
                         c0: Tensor | None, weight_hh: Tensor, lengths: Tensor | None, reverse: bool,
                         into_gates: bool = False, bias_sums: tuple | None = None) -> tuple:
    """(dG, dh0, dc0), and with bias_sums (dtype, copies) a fourth value: the bias gradients' sums where the launch
    made them (kernels.lstm.lstm_backward), else None."""
    k = _kernels()
    T, B, _ = gates.shape
    D, _, H = weight_hh.shape
    return _launch("bwd", H, B, gates.dtype, gates.device, lambda config: k.lstm_backward(
        gates, c_all, None if c0 is None else c0.to(torch.float32).contiguous(), weight_hh.contiguous(),
        dy.contiguous(), _contiguous(dhn), _contiguous(dcn), _last_steps(lengths, gates.device), reverse=reverse,
        config=config, into_gates=into_gates, bias_sums=bias_sums), directions=D)


@_custom_op("lstm_recurrence_backward")
def _lstm_recurrence_backward(dy: Tensor, dhn: Tensor | None, dcn: Tensor | None, gates: Tensor, c_all: Tensor,
                              c0: Tensor | None, weight_hh: Tensor, lengths: Tensor | None,
                              reverse: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Returns dG [T, B, D*4H] (gate pre-activation gradients, = d gx), dh0 and dc0 [D, B, H]. dhn, dcn, c0 None:
    zeros."""
    return _recurrence_backward(dy, dhn, dcn, gates, c_all, c0, weight_hh, lengths, reverse)


@_lstm_recurrence_backward.register_fake
def _(dy, dhn, dcn, gates, c_all, c0, weight_hh, lengths, reverse):
    D, _, H = weight_hh.shape
    return torch.empty_like(gates), gates.new_empty(D, gates.shape[1], H), gates.new_empty(D, gates.shape[1], H)


def _no_double_backward(ctx, *grads):
    raise NotImplementedError(
        "tritonlstm: double backward (the gradient of a gradient through the LSTM) is not supported by the Triton "
        "kernels, as it is not by cuDNN's. Run that forward pass with backend='torch' (module.backend = 'torch', "
        "or fused_lstm(..., backend='torch')), whose plain PyTorch ops support it.")


_register_autograd(_lstm_recurrence_backward, _no_double_backward, lambda ctx, inputs, output: None)


class _TiedToForward(torch.autograd.Function):
    """The recurrence's gradients, under create_graph=True, tied to an output of the forward (`anchor`, which
    requires grad wherever any of the forward's inputs does), so that differentiating them again raises
    _no_double_backward's error. Untied, they would depend on the graph only through the backward op's inputs:
    with frozen weights and a constant output gradient those need no grad, and a second backward would take the
    recurrence's gradients for constants, silently (cuDNN's backward takes the input itself, and raises)."""

    @staticmethod
    def forward(ctx, anchor, *grads):
        return tuple(g.view_as(g) for g in grads)

    @staticmethod
    def backward(ctx, *grads):
        _no_double_backward(ctx)


def _tie_to_forward(anchor: Tensor, *grads: Tensor) -> tuple[Tensor, ...]:
    """grads tied to anchor (_TiedToForward) where a backward builds a graph (create_graph=True) on plain tensors
    and they do not already require grad; as they are otherwise. Under torch.func the backward ops' own autograd
    (Transformable) refuses a second derivative."""
    if not torch.is_grad_enabled() or not anchor.requires_grad or all(g.requires_grad for g in grads) \
            or not _plain(anchor, *grads):
        return grads
    return _TiedToForward.apply(anchor, *grads)


def _stack_backward_run(dy: Tensor, dhn: Tensor | None, dcn: Tensor | None, gates: Tensor, c_all: Tensor,
                        c0: Tensor | None, weight_ih: Tensor, weight_hh: Tensor, lengths: Tensor | None,
                        drop: Tensor | None, into_gates: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    k = _kernels()
    L, T, B, _ = gates.shape
    H = weight_hh.shape[2]
    return _launch("stack_bwd", H, B, gates.dtype, gates.device, lambda config: k.lstm_stack_backward(
        gates, c_all, None if c0 is None else c0.to(torch.float32).contiguous(), weight_ih.contiguous(),
        weight_hh.contiguous(), dy.contiguous(), _contiguous(dhn), _contiguous(dcn), _last_steps(lengths, gates.device),
        config=config, drop=_contiguous(drop), into_gates=into_gates), layers=L)


@_custom_op("lstm_stack_backward")
def _lstm_stack_backward(dy: Tensor, dhn: Tensor | None, dcn: Tensor | None, gates: Tensor, c_all: Tensor,
                         c0: Tensor | None, weight_ih: Tensor, weight_hh: Tensor, lengths: Tensor | None,
                         drop: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """The reverse wavefront of a stack: dy [L, T, B, H] (each layer's own output gradient), dhn, dcn, c0
    [L, B, H] or None (zeros), gates [L, T, B, 4H], c_all [L, T, B, H], drop [L-1, T, B, H] the forward's dropout
    scale or None. Returns dG [L, T, B, 4H], dh0 and dc0 [L, B, H]."""
    return _stack_backward_run(dy, dhn, dcn, gates, c_all, c0, weight_ih, weight_hh, lengths, drop)


@_lstm_stack_backward.register_fake
def _(dy, dhn, dcn, gates, c_all, c0, weight_ih, weight_hh, lengths, drop):
    L, _, B, _ = gates.shape
    H = weight_hh.shape[2]
    return torch.empty_like(gates), gates.new_empty(L, B, H), gates.new_empty(L, B, H)


_register_autograd(_lstm_stack_backward, _no_double_backward, lambda ctx, inputs, output: None)


@_custom_op("lstm_stack")
def _lstm_stack(gx: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Tensor | None, bias_hh: Tensor | None,
                h0: Tensor | None, c0: Tensor | None, lengths: Tensor | None, drop: Tensor | None,
                training: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """A unidirectional stack of L layers in one launch (wavefront): gx of the first layer [T, B, 4H],
    weight_ih [L-1, 4H, H] of the others, weight_hh [L, 4H, H], bias_ih and bias_hh [L, 4H] ([4H] for L = 1) or
    None, h0 and c0 [L, B, H] or None (zeros), drop [L-1, T, B, H] or None: the dropout scale applied to each
    layer's output before the next. Returns every layer's y [L, T, B, H], h_n and c_n [L, B, H], when training every
    layer's gates [L, T, B, 4H] and c_t [L, T, B, H] float32 (empty otherwise), and the dropped outputs
    [L-1, T, B, H] that the layers above took as input (empty without drop)."""
    k = _kernels()
    T, B, _ = gx.shape
    L, _, H = weight_hh.shape
    c_ws = None if c0 is None else c0.to(torch.float32, copy=True).contiguous()
    y, hn, cn, gates, c_all, xd = _launch("stack", H, B, gx.dtype, gx.device, lambda config: k.lstm_stack_forward(
        gx.contiguous(), weight_ih.contiguous(), weight_hh.contiguous(), bias_ih, _contiguous(h0), c_ws,
        _last_steps(lengths, gx.device), store_gates=training, config=config,
        drop=_contiguous(drop), bias_hh=bias_hh), layers=L)
    xd = gx.new_empty(0) if xd is None else xd
    if not training:
        return y, hn, cn, gx.new_empty(0), gx.new_empty(0, dtype=torch.float32), xd
    return y, hn, cn, gates, c_all, xd


@_lstm_stack.register_fake
def _(gx, weight_ih, weight_hh, bias_ih, bias_hh, h0, c0, lengths, drop, training):
    T, B, G = gx.shape
    L, _, H = weight_hh.shape
    y, hn, cn = gx.new_empty(L, T, B, H), gx.new_empty(L, B, H), gx.new_empty(L, B, H)
    xd = gx.new_empty(0) if drop is None else gx.new_empty(max(L - 1, 1), T, B, H)
    if training:
        return y, hn, cn, gx.new_empty(L, T, B, G), gx.new_empty(L, T, B, H, dtype=torch.float32), xd
    return y, hn, cn, gx.new_empty(0), gx.new_empty(0, dtype=torch.float32), xd


def _stack_setup_context(ctx, inputs, output):
    gx, weight_ih, weight_hh, bias_ih, bias_hh, h0, c0, lengths, drop, training = inputs
    y, _, _, gates, c_all, xd = output
    ctx.bias_metas = _bias_metas(bias_ih, bias_hh)
    ctx.save_for_backward(weight_ih, weight_hh, h0, c0, lengths, drop, y, gates, c_all, xd)
    ctx.mark_non_differentiable(gates, c_all, xd)
    # Unmaterialised, the gradients of the outputs nobody used (gates, c_all) are None rather than zeros as large
    # as the gates: 12 bytes per T*B*H in 16-bit, half of the training step's peak (perf/NOTES.md).
    ctx.set_materialize_grads(False)


@_without_autocast
def _stack_backward(ctx, dy, dhn, dcn, _dgates, _dc_all, _dxd):
    """The stack's reverse recurrence in one launch (a reverse wavefront over the layers), then the weight
    gradients as GEMMs: layer l's input is the layer below's output (x for layer 0, whose input gradient is
    dG_0, the gradient of gx)."""
    weight_ih, weight_hh, h0, c0, lengths, drop, y, gates, c_all, xd = ctx.saved_tensors
    if gates.numel() == 0:
        raise RuntimeError("tritonlstm: backward through a stack forward that ran without saving its gates")
    L, T, B, H = y.shape
    dy = torch.zeros_like(y) if dy is None else dy
    args = (dy, dhn, dcn, gates, c_all, c0, weight_ih, weight_hh, lengths, drop)  # (None: zeros, as in _backward)
    if _graph_released_after_this_backward(ctx, *args[:6]):
        dg, dh0, dc0 = _stack_backward_run(*args, into_gates=True)
    else:
        dg, dh0, dc0 = _tie_to_forward(y, *_call(_lstm_stack_backward, *args))
    dg2 = dg.view(L, T * B, 4 * H)
    need = ctx.needs_input_grad
    d_ih = d_hh = None
    if need[1] and L > 1:
        inputs = y[:-1] if drop is None else xd  # the layers above took their input after dropout
        inputs = inputs.reshape(L - 1, T * B, H)
        d_ih = torch.stack([_tf32_matmul(dg2[l + 1].t(), inputs[l]) for l in range(L - 1)]) \
            if _tf32_gemms(dg2, inputs) else torch.bmm(dg2[1:].transpose(1, 2), inputs)
    if need[2]:
        d_hh = torch.stack([_recurrent_weight_grad(dg[l], y[l], None if h0 is None else h0[l], lengths, False)
                            for l in range(L)])
    return (dg[0] if need[0] else None, d_ih, d_hh, *_bias_grads(dg2, ctx.bias_metas, need[3:5]),
            dh0 if need[5] else None, dc0 if need[6] else None, None, None, None)


_register_autograd(_lstm_stack, _stack_backward, _stack_setup_context)


def _setup_context(ctx, inputs, output):
    gx, weight_hh, bias_ih, bias_hh, h0, c0, lengths, reverse, training = inputs
    y, _, _, gates, c_all = output
    ctx.reverse = reverse
    ctx.bias_metas = _bias_metas(bias_ih, bias_hh)
    ctx.save_for_backward(weight_hh, h0, c0, lengths, y, gates, c_all)
    ctx.mark_non_differentiable(gates, c_all)
    ctx.set_materialize_grads(False)  # as in _stack_setup_context


def _recurrent_weight_grad(dg: Tensor, y: Tensor, h0: Tensor | None, lengths: Tensor | None,
                           reverse: bool) -> Tensor:
    """dW_hh = sum over (t, b) of dG_t^T h_{t-1} for one direction (dg [T, B, 4H], y [T, B, H], h0 [B, H] or None:
    zeros), with h_{t-1} read from y and h0 where they are: a shifted copy of y would be the training step's
    largest temporary after dG (perf/NOTES.md, peak memory). A row's first step pairs its dG with h0 (t = 0
    forwards; t = length - 1 in reverse); its other steps with y one step back along its direction. y past a row's
    end is zero (as the kernels leave it), so the shifted product needs no mask."""
    T, B, G = dg.shape
    later, previous = (dg[:-1], y[1:]) if reverse else (dg[1:], y[:-1])
    dw = None  # (h0 None: the first steps' term is zero)
    if h0 is not None:
        first = dg[0] if not reverse else dg[T - 1] if lengths is None else \
            dg[lengths.to(dg.device, torch.long) - 1, torch.arange(B, device=dg.device)]
        dw = _mm(first.t(), h0)
    if T > 1:
        a, b = later.reshape((T - 1) * B, G).t(), previous.reshape((T - 1) * B, y.shape[2])
        if dw is None:
            dw = _tf32_matmul(a, b) if _tf32_gemms(a, b) else torch.mm(a, b)
        else:
            dw = dw + _tf32_matmul(a, b) if _tf32_gemms(a, b) else torch.addmm(dw, a, b)
    return dg.new_zeros(G, y.shape[2]) if dw is None else dw


@_without_autocast
def _backward(ctx, dy, dhn, dcn, _dgates, _dc_all):
    weight_hh, h0, c0, lengths, y, gates, c_all = ctx.saved_tensors
    if gates.numel() == 0 and y.numel() != 0:
        raise RuntimeError("tritonlstm: backward through a forward that ran without saving its gates "
                           "(it ran with training=False)")
    T, B, _ = y.shape
    D, G, H = weight_hh.shape
    dy = torch.zeros_like(y) if dy is None else dy
    # dhn, dcn None (h_n, c_n unused) and c0 None (zeros) reach the kernel's launch as None: zeros from its own
    # workspaces' memset.
    args = (dy, dhn, dcn, gates, c_all, c0, weight_hh, lengths, ctx.reverse)
    need = ctx.needs_input_grad
    # Eagerly without a graph to build, the launch may sum the bias gradients itself (kernels.lstm.BIAS_IN_KERNEL):
    # then no launch or memset for them after it. A retained graph's backwards take the same path.
    request = _bias_request(ctx.bias_metas, need[2:4])
    if request is not None:  # (and kernels.reduce after the launch where _column_sums would run it: v0.74)
        request = (*request, _sums_by_kernel(T * B, gates))
    sums = [None]
    if _graph_released_after_this_backward(ctx, *args[:6]):
        dg, dh0, dc0, *sums = _recurrence_backward(*args, into_gates=True, bias_sums=request)
    elif _runs_op_eager(args):
        dg, dh0, dc0, *sums = _recurrence_backward(*args, bias_sums=request)  # (what _call would run)
    else:
        dg, dh0, dc0 = _tie_to_forward(y, *_call(_lstm_recurrence_backward, *args))
    dw_hh = None
    if need[1]:
        dg4 = dg.view(T, B, D, G)
        dw_hh = [_recurrent_weight_grad(dg4[:, :, d], y[..., d * H:(d + 1) * H], None if h0 is None else h0[d],
                                        lengths, d == 1 or ctx.reverse) for d in range(D)]
        dw_hh = dw_hh[0].unsqueeze(0) if D == 1 else torch.stack(dw_hh)  # (stack would copy a single one)
    sums = sums[0].unbind(0) if sums and sums[0] is not None else None  # (None where the launch did not make them)
    return (dg if need[0] else None, dw_hh, *_bias_grads(dg.view(T * B, D * G), ctx.bias_metas, need[2:4], sums),
            dh0 if need[4] else None, dc0 if need[5] else None, None, None, None)


_register_autograd(_lstm_recurrence, _backward, _setup_context)


def synchronize(device: torch.device | str | int | None = None) -> None:
    """Waits for the device (as torch.cuda.synchronize) and raises RuntimeError if a persistent launch on it
    failed its grid barrier since the last report. Launches do not wait for that check (a host-device sync per
    launch would cost more than some whole sequences); a failure is also raised by the next launch on the
    device, and the failed launch's outputs are NaN."""
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    elif isinstance(device, int):
        device = torch.device("cuda", device)
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if "tritonlstm.kernels.lstm" in sys.modules:
        _kernels().barrier_errors.check(device, wait=True)
    elif device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------------------
# The public op
# ----------------------------------------------------------------------------------------------------------


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _check_inputs(x, weight_ih, weight_hh, bias_ih, bias_hh, h0, c0, lengths, weight_hr) -> None:
    named = {"x": x, "weight_ih": weight_ih, "weight_hh": weight_hh, "bias_ih": bias_ih, "bias_hh": bias_hh,
             "h0": h0, "c0": c0, "weight_hr": weight_hr}
    for name, t in named.items():
        if t is None and name in ("x", "weight_ih", "weight_hh"):
            raise TypeError(f"{name} must be a Tensor, got None")
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
        if t is not None and not t.is_floating_point():
            raise TypeError(f"{name} must have a floating dtype, got {t.dtype}")
    if x.dim() != 3:
        raise ValueError(f"x must be 3-D [T, B, I] (time-major), got shape {_shape(x)}")
    T, B, input_size = x.shape
    if weight_hr is None:
        if weight_hh.dim() != 2 or weight_hh.shape[0] != 4 * weight_hh.shape[1] or weight_hh.shape[1] == 0:
            raise ValueError(f"weight_hh must be [4H, H] with H >= 1, got shape {_shape(weight_hh)}")
        H = P = weight_hh.shape[1]
    else:
        if weight_hr.dim() != 2 or 0 in weight_hr.shape:
            raise ValueError(f"weight_hr must be [P, H] with P, H >= 1, got shape {_shape(weight_hr)}")
        P, H = weight_hr.shape
        if _shape(weight_hh) != (4 * H, P):
            raise ValueError(f"weight_hh must be [4H, P] = [{4 * H}, {P}] (P, H from weight_hr), "
                             f"got shape {_shape(weight_hh)}")
    if weight_ih.dim() != 2 or weight_ih.shape[0] != 4 * H:
        raise ValueError(f"weight_ih must be [4H, I] = [{4 * H}, I] (H = {H} from weight_hh), "
                         f"got shape {_shape(weight_ih)}")
    if weight_ih.shape[1] != input_size:
        raise ValueError(f"x's input size (x.shape[2]) must match weight_ih.shape[1]: expected {weight_ih.shape[1]}, "
                         f"got {input_size}")
    for name in ("bias_ih", "bias_hh"):
        b = named[name]
        if b is not None and _shape(b) != (4 * H,):
            raise ValueError(f"{name} must have shape ({4 * H},), got {_shape(b)}")
    for name, size in (("h0", P), ("c0", H)):
        st = named[name]
        if st is not None and _shape(st) != (B, size):
            raise ValueError(f"{name} must have shape (B, {'P' if name == 'h0' and weight_hr is not None else 'H'})"
                             f" = ({B}, {size}), got {_shape(st)}")
    for name, t in named.items():
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{name} must have x's dtype {x.dtype}, got {t.dtype}")
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} must be on x's device {x.device}, got {t.device}")
    if T == 0:
        raise ValueError(f"x must have at least one step (T >= 1), got shape {_shape(x)}")
    if lengths is not None:
        if not isinstance(lengths, Tensor) or lengths.dim() != 1 or lengths.shape[0] != B \
                or lengths.is_floating_point():
            got = f"{lengths.dtype} of shape {_shape(lengths)}" if isinstance(lengths, Tensor) else \
                type(lengths).__name__
            raise ValueError(f"lengths must be an integer tensor of shape ({B},), got {got}")
        # (Not while torch.compile traces: the values are data, which a graph cannot branch on.)
        if B and not torch.compiler.is_compiling() and (int(lengths.min()) < 1 or int(lengths.max()) > T):
            raise ValueError(f"lengths must lie in [1, T] = [1, {T}], got min {int(lengths.min())}, "
                             f"max {int(lengths.max())}")


def _stacked_biases(pairs: list) -> tuple[Tensor | None, Tensor | None]:
    """(b_ih, b_hh) as the ops take them, or None where no direction or layer has it: one direction's or layer's as
    it is ([4H]: no launch), several stacked [N, 4H]. The kernels
    add the two in float32, where b_ih.float() + b_hh before the launch took two ATen ops (perf/NOTES.md v0.54)."""
    if len(pairs) == 1:
        return pairs[0][0], pairs[0][1]
    out = []
    for col in zip(*pairs):
        given = [b for b in col if b is not None]
        if not given:
            out.append(None)
            continue
        if len(given) < len(col):
            col = [torch.zeros_like(given[0]) if b is None else b for b in col]
        out.append(torch.stack(col))
    return out[0], out[1]


def _bias_metas(*biases: Tensor | None) -> tuple:
    return tuple(None if b is None else (b.dtype, b.shape) for b in biases)


def _bias_request(metas: tuple, need: tuple) -> tuple | None:
    """(dtype, copies) of the bias gradients `need` asks for, one copy a bias, where they share a dtype and shape
    (always, through the public API); None where none is needed or they differ."""
    wanted = [metas[i] for i in (0, 1) if need[i] and metas[i] is not None]
    if not wanted or any(m != wanted[0] for m in wanted):  # (not a set: shapes may be symbolic)
        return None
    return wanted[0][0], len(wanted)


def _bias_grads(dg: Tensor, metas: tuple, need: tuple, sums: tuple | None = None) -> tuple:
    """The gradients of b_ih and b_hh (None where not needed or absent), dg's column sums (dg [T*B, C] or
    [L, T*B, 4H]) in each one's dtype and shape: `sums` where the backward's launch made them (_bias_request's
    copies), else from one launch (_column_sums' copies). Each its own tensor: as after nn.LSTM's backward, an
    in-place update of one .grad (clip_grad_norm_) must not change the other. Where the two differ in dtype, the
    sums in float32 cast for each."""
    wanted = [i for i in (0, 1) if need[i] and metas[i] is not None]
    out = [None, None]
    if not wanted:
        return tuple(out)
    request = _bias_request(metas, need)
    if request is not None:
        if sums is None:
            sums = _column_sums(dg, *request)
        for i, g in zip(wanted, sums):
            out[i] = g.view(metas[i][1])
        return tuple(out)
    sums = _column_sums(dg)[0]
    for i in wanted:
        out[i] = sums.to(metas[i][0], copy=True).view(metas[i][1])
    return tuple(out)


def fused_lstm(x: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Tensor | None = None,
               bias_hh: Tensor | None = None, h0: Tensor | None = None, c0: Tensor | None = None, *,
               reverse: bool = False, lengths: Tensor | None = None, weight_hr: Tensor | None = None,
               backend: str = "auto") -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """One LSTM layer in one direction, fused: the recurrent matmul, gate activations and cell update of every
    step run in Triton kernels.

    x [T, B, I] (time-major); weights and biases as `nn.LSTM` stores them (gate order i, f, g, o):
    weight_ih [4H, I], weight_hh [4H, H], biases [4H]; h0, c0 [B, H] or None (zeros).
    reverse runs t = T-1 .. 0 (y[t] stays aligned with x[t]). lengths [B] (1 <= lengths[b] <= T): row b stops
    after lengths[b] steps (starts at lengths[b] - 1 when reverse); its outputs past that are zero and h_n, c_n
    come from its last step. weight_hr [P, H] (nn.LSTM's proj_size): h_t = W_hr (o * tanh(c_t)), weight_hh is
    then [4H, P] and h0 [B, P]. backend: "triton" (the kernels, or an error), "torch" (plain PyTorch), "auto"
    (Triton for CUDA tensors and under the CPU interpreter, torch otherwise).

    Returns y [T, B, H or P] and (h_n [B, H or P], c_n [B, H]).
    """
    _check_inputs(x, weight_ih, weight_hh, bias_ih, bias_hh, h0, c0, lengths, weight_hr)
    if not isinstance(reverse, (bool, int)) or reverse not in (0, 1):
        raise TypeError(f"reverse must be a bool, got {reverse!r}")
    y, (hn, cn) = lstm_layer(x, [(weight_ih, weight_hh, bias_ih, bias_hh, weight_hr)],
                             None if h0 is None else h0[None], None if c0 is None else c0[None],
                             lengths=lengths, reverse=reverse, backend=backend, checked=True)
    return y, (hn[0], cn[0])


def lstm_cell_step(x: Tensor, h0: Tensor, c0: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Tensor | None,
                   bias_hh: Tensor | None) -> tuple[Tensor, Tensor]:
    """One step of nn.LSTMCell on the recurrence kernel: x [B, I], h0 and c0 [B, H] (B, H >= 1), weights as
    nn.LSTMCell stores them, every tensor of one dtype and device, already checked by the caller (LSTMCell's
    forward, with nn.LSTMCell's messages). Returns (h_1, c_1) [B, H].

    fused_lstm's path with T = 1 less what a step in a Python loop cannot afford twice: its checks, the autocast
    wrapper and the layer's handling of directions, projections and lengths (a step is host-bound: perf/NOTES.md
    v0.32)."""
    for name, t in (("weight_ih", weight_ih), ("weight_hh", weight_hh), ("bias_ih", bias_ih), ("bias_hh", bias_hh)):
        if t is not None and (t.dtype != x.dtype or t.device != x.device):  # a parameter cast or moved alone
            raise RuntimeError(f"LSTMCell: {name} must have the input's dtype {x.dtype} and device {x.device}, got "
                            f"{t.dtype} on {t.device}")
    b_ih, b_hh = _stacked_biases([(bias_ih, bias_hh)])
    training = _records_grad(x, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh)
    _, hn, cn, _, _ = _call(_lstm_recurrence, _project(x, weight_ih)[None], weight_hh[None], b_ih, b_hh, h0[None],
                            c0[None], None, False, training)
    return hn.squeeze(0), cn.squeeze(0)  # (views: their backward allocates nothing, select's zero-fills)


def zero_from(*tensors):
    """A zero that depends on every tensor given (None skipped), for empty outputs: nn.LSTM's empty outputs still
    require grad through the weights, and backward gives the weights zero gradients."""
    return sum(0 * t.sum() for t in tensors if t is not None)


@_in_autocast_dtype
def lstm_layer(x: Tensor, weights: list[tuple], h0: Tensor | None = None, c0: Tensor | None = None, *,
               lengths: Tensor | None = None, reverse: bool = False, backend: str = "auto",
               checked: bool = False) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """One layer in D = len(weights) directions, all in one kernel launch (direction 1 runs in reverse, as in a
    bidirectional nn.LSTM). weights[d] = (weight_ih, weight_hh, bias_ih, bias_hh, weight_hr), shapes as in
    fused_lstm; h0 [D, B, P], c0 [D, B, H] or None. `reverse` applies to a single direction.

    Returns y [T, B, D*P] (the directions concatenated, as nn.LSTM lays them out) and (h_n [D, B, P],
    c_n [D, B, H])."""
    D = len(weights)
    if D not in (1, 2):
        raise ValueError(f"lstm_layer takes 1 or 2 directions of weights, got {D}")
    if not checked:
        for d, w in enumerate(weights):
            _check_inputs(x, *w[:4], None if h0 is None else h0[d], None if c0 is None else c0[d], lengths, w[4])
    T, B, _ = x.shape
    w_ih, w_hh, b_ih, b_hh, w_hr = (list(col) for col in zip(*weights))
    H = w_hh[0].shape[0] // 4
    P = H if w_hr[0] is None else w_hr[0].shape[0]
    which = resolve_backend(backend, x.device, x.dtype)
    if B == 0 or which == "torch":
        h0 = x.new_zeros(D, B, P) if h0 is None else h0
        c0 = x.new_zeros(D, B, H) if c0 is None else c0
    # (Otherwise zero states stay None: the launch takes them from its workspaces' memset, no launch of their own.)
    if B == 0:
        # nn.LSTM returns empty outputs for an empty batch; keep them connected to the graph.
        nothing = zero_from(x, *(t for w in weights for t in w))
        return x.new_zeros(T, 0, D * P) + nothing, (h0 + nothing, c0 + nothing)
    if which == "torch":
        outs = [lstm_layer_reference(x, *weights[d][:4], h0[d], c0[d], reverse or d == 1, lengths, w_hr[d])
                for d in range(D)]
        return torch.cat([y for y, _ in outs], dim=2), (torch.stack([h for _, (h, _) in outs]),
                                                        torch.stack([c for _, (_, c) in outs]))

    # One GEMM projects the input of every step for every direction.
    # (One direction: the weights as they are; cat / stack would copy them on every call.)
    gx = _project(x.reshape(T * B, x.shape[2]), w_ih[0] if D == 1 else torch.cat(w_ih)).view(T, B, D * 4 * H)
    biases = _stacked_biases(list(zip(b_ih, b_hh)))
    training = _records_grad(x, h0, c0, *w_ih, *w_hh, *b_ih, *b_hh, *w_hr)
    if w_hr[0] is None:
        w_rec = w_hh[0].unsqueeze(0) if D == 1 else torch.stack(w_hh)
        y, hn, cn, _, _ = _call(_lstm_recurrence, gx, w_rec, *biases, h0, c0, lengths, reverse, training)
        return y, (hn, cn)
    # Projection: the recurrence runs on r_t = o * tanh(c_t) with W_hh @ W_hr as its recurrent weight, since
    # W_hh h_{t-1} = (W_hh W_hr) r_{t-1}; h0's term enters each row's first step through gx, and the outputs
    # are projected by one GEMM per direction after the loop.
    if h0 is not None:
        rows = torch.arange(B, device=x.device)
        gxs = []
        for d in range(D):
            backwards = reverse or d == 1
            first = (lengths.to(x.device, torch.long) - 1) if (backwards and lengths is not None) else \
                torch.full((B,), T - 1 if backwards else 0, device=x.device, dtype=torch.long)
            g = gx[..., d * 4 * H:(d + 1) * 4 * H]
            gxs.append(g.index_put((first, rows), g[first, rows] + h0[d] @ w_hh[d].t()))
        gx = torch.cat(gxs, dim=2)
    w_rec = torch.stack([w_hh[d] @ w_hr[d] for d in range(D)])
    r, rn, cn, _, _ = _call(_lstm_recurrence, gx, w_rec, *biases, None, c0, lengths, reverse, training)
    y = torch.cat([_project(r[..., d * H:(d + 1) * H].reshape(T * B, H), w_hr[d]).view(T, B, P) for d in range(D)],
                  dim=2)
    return y, (torch.stack([rn[d] @ w_hr[d].t() for d in range(D)]), cn)


@_in_autocast_dtype
def lstm_stack(x: Tensor, weights: list[tuple], h0: Tensor | None = None, c0: Tensor | None = None, *,
               lengths: Tensor | None = None, dropout_scale: Tensor | None = None,
               backend: str = "auto") -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """A unidirectional stack of L layers of equal width in one forward launch and one backward launch: a
    wavefront in which layer l runs step t while layer l+1 runs step t-1, so L layers cost about T + L steps
    instead of L * T. weights[l] = (weight_ih, weight_hh, bias_ih, bias_hh) as nn.LSTM stores them; h0, c0
    [L, B, H] or None. dropout_scale [L-1, T, B, H] or None: multiplies each layer's output (but the last)
    before the layer above takes it as input; for dropout with probability p, entries 0 or 1 / (1 - p), drawn
    by the caller (`tritonlstm.LSTM` draws them as nn.LSTM would on the CPU).
    Returns the last layer's y [T, B, H] and (h_n, c_n) [L, B, H]."""
    L = len(weights)
    if L < 1:
        raise ValueError("lstm_stack needs at least one layer of weights")
    H = weights[0][1].shape[1]
    for l, w in enumerate(weights):
        if w[1].dim() != 2 or w[1].shape[1] != H:
            raise ValueError(f"lstm_stack needs layers of one hidden size: layer {l}'s weight_hh is "
                             f"{_shape(w[1])}, layer 0's hidden size is {H}")
        _check_inputs(x if l == 0 else x.new_empty(x.shape[0], x.shape[1], H), *w,
                      None if h0 is None else h0[l], None if c0 is None else c0[l], lengths, None)
    T, B, _ = x.shape
    if dropout_scale is not None:
        if not isinstance(dropout_scale, Tensor) or _shape(dropout_scale) != (L - 1, T, B, H):
            got = _shape(dropout_scale) if isinstance(dropout_scale, Tensor) else type(dropout_scale).__name__
            raise ValueError(f"dropout_scale must have shape (L-1, T, B, H) = ({L - 1}, {T}, {B}, {H}), got {got}")
        if dropout_scale.dtype != x.dtype or dropout_scale.device != x.device:
            raise TypeError(f"dropout_scale must have x's dtype and device ({x.dtype}, {x.device}), "
                            f"got ({dropout_scale.dtype}, {dropout_scale.device})")
        if L == 1:
            dropout_scale = None
    which = resolve_backend(backend, x.device, x.dtype)
    if B == 0 or which == "torch":
        h0 = x.new_zeros(L, B, H) if h0 is None else h0
        c0 = x.new_zeros(L, B, H) if c0 is None else c0
        hs, cs, y = [], [], x
        for l, w in enumerate(weights):
            if l > 0 and dropout_scale is not None:
                y = y * dropout_scale[l - 1]
            y, (h, c) = lstm_layer(y, [(*w, None)], h0[l:l + 1], c0[l:l + 1], lengths=lengths, backend=which)
            hs.append(h)
            cs.append(c)
        return y, (torch.cat(hs), torch.cat(cs))
    span = _layers_per_launch(H, B, x.dtype, x.device, L,
                              _records_grad(x, h0, c0, *(t for w in weights for t in w)))
    if span >= L:
        return _stack_launch(x, weights, h0, c0, lengths, dropout_scale)
    # Consecutive wavefronts of `span` layers, each keeping its weights on chip; between two, the dropout the
    # kernel would have applied to the lower layer's output.
    y, hs, cs = x, [], []
    for l0 in range(0, L, span):
        l1 = min(L, l0 + span)
        if l0 > 0 and dropout_scale is not None:
            y = y * dropout_scale[l0 - 1]
        y, (h, c) = _stack_launch(y, weights[l0:l1], None if h0 is None else h0[l0:l1],
                                  None if c0 is None else c0[l0:l1], lengths,
                                  None if dropout_scale is None or l1 - l0 == 1 else dropout_scale[l0:l1 - 1])
        hs.append(h)
        cs.append(c)
    return y, (torch.cat(hs), torch.cat(cs))


def _layers_per_launch(H: int, B: int, dtype: torch.dtype, device: torch.device, L: int, training: bool) -> int:
    if device.type != "cuda":
        return L  # the interpreter runs any stack in one stepwise wavefront
    sms, smem = device_limits(device)
    return stack_layers_per_launch(H, B, dtype, sms, L, smem, training)


def _stack_launch(x, weights, h0, c0, lengths, dropout_scale):
    """One wavefront over the layers of `weights` (checked by lstm_stack): the first layer's input projection,
    then the stack op."""
    T, B, _ = x.shape
    L, H = len(weights), weights[0][1].shape[1]
    gx = _project(x.reshape(T * B, x.shape[2]), weights[0][0]).view(T, B, 4 * H)
    w_ih = torch.stack([w[0] for w in weights[1:]]) if L > 1 else weights[0][1][:0].view(0, 4 * H, H)
    biases = _stacked_biases([w[2:4] for w in weights])
    training = _records_grad(x, h0, c0, *(t for w in weights for t in w))
    y, hn, cn, _, _, _ = _call(_lstm_stack, gx, w_ih, torch.stack([w[1] for w in weights]), *biases, h0, c0,
                               lengths, dropout_scale, training)
    return y[-1], (hn, cn)
