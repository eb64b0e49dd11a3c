"""Drop-in modules: `LSTM` (subclasses nn.LSTM), `LSTMCell` (subclasses nn.LSTMCell) and `convert(model)`.

They override only `forward`, so parameter names, initialisation, `extra_repr` and the state_dict stay torch's
and checkpoints load both ways. Each layer and direction runs on the Triton recurrence (`lstm_layer`,
`lstm_stack`, `lstm_cell_step`); `backend="auto"` falls back to `super().forward` only where the kernels
cannot run (CPU without the interpreter, float64), and `backend="triton"` raises there instead. Two tracers get
what they get from torch.nn: FX's symbolic tracer a leaf node, and torch.onnx.export torch.nn's forward (ONNX's LSTM
op), whatever the backend, since neither graph can hold a Triton launch.
"""

from __future__ import annotations

import contextlib
import sys

import torch
from torch import Tensor, nn
from torch.fx import Proxy
from torch.nn.utils.rnn import PackedSequence

from tritonlstm.functional import (
    BACKENDS,
    autocast_dtype,
    lstm_cell_step,
    lstm_layer,
    lstm_stack,
    resolve_backend,
    zero_from,
)


def _check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def _autocast_dtype(device: torch.device, cell: bool = False) -> torch.dtype | None:
    """The dtype nn.LSTM (cell: nn.LSTMCell) would run in under autocast on this device. torch.lstm is a
    lower-precision op on CUDA and on the CPU; torch.lstm_cell only on CUDA (on the CPU nn.LSTMCell returns
    float32, and so does ours, computed in float32)."""
    if cell and device.type != "cuda":
        return None
    return autocast_dtype(device)


def _allow_dynamo() -> None:
    """Dynamo refuses to trace any instance of nn.LSTM, subclasses included, unless allow_rnn is set; our forward
    is plain Python around custom ops, so it traces without a graph break. Set when a tritonlstm.LSTM is built
    (a process-wide flag: plain nn.LSTMs compiled in the same process then go through dynamo's experimental
    RNN support instead of a graph break)."""
    import torch._dynamo

    torch._dynamo.config.allow_rnn = True


class HiddenStateError(TypeError, RuntimeError):
    """hx is not a pair of tensors. Both a TypeError (what it is) and a RuntimeError (what nn.LSTM and
    nn.LSTMCell raise for a tuple of the wrong length: "lstm expects two hidden states"), so that code catching
    either keeps working."""


def _state_pair(module: str, hx) -> tuple[Tensor, Tensor]:
    """hx as (h_0, c_0), or an error that names it (nn.LSTM itself fails on a bare IndexError or on the
    argument parsing of torch.lstm)."""
    if isinstance(hx, Tensor):
        got = f"a Tensor of shape {list(hx.shape)}"
    elif isinstance(hx, (tuple, list)) and len(hx) == 2 and all(isinstance(t, Tensor) for t in hx):
        return hx[0], hx[1]
    elif isinstance(hx, (tuple, list)):
        got = f"a {type(hx).__name__} of {len(hx)} ({', '.join(type(t).__name__ for t in hx)})"
    else:
        got = type(hx).__name__
    raise HiddenStateError(f"{module}: hx must be a tuple (h_0, c_0) of two tensors, got {got}")


def _no_script(module) -> None:
    raise RuntimeError(f"{type(module).__name__} (tritonlstm) cannot be compiled by torch.jit.script: its forward "
                       f"is Python around Triton launches. torch.jit.trace, torch.export and torch.compile work.")


def _fx_proxy(input, hx):
    """The fx Proxy among a forward's arguments, if torch.fx's symbolic tracer is calling it, else None (~0.2 us a
    call: every call asks)."""
    if isinstance(input, Proxy):
        return input
    if isinstance(hx, (tuple, list)):
        for state in hx:
            if isinstance(state, Proxy):
                return state
        return None
    return hx if isinstance(hx, Proxy) else None


def _fx_leaf(module, proxy, input, hx):
    """torch.fx's symbolic tracer keeps torch.nn's modules as leaves (one call_module node, run as the module at call
    time) and traces into any other; ours live outside torch.nn, and their shape-dependent Python cannot take
    proxies. So they record the node nn.LSTM / nn.LSTMCell gets, and the traced graph calls this module."""
    tracer = proxy.tracer
    args = (input,) if hx is None else (input, hx)
    return tracer.create_proxy("call_module", tracer.path_of_module(module), args, {})


def _onnx_exporting() -> bool:
    """Whether torch.onnx.export is tracing this call (its TorchScript exporter traces through torch.jit, its dynamo
    one through torch.export); asked only then, as torch.onnx's own check costs ~1.4 us."""
    return ((torch.compiler.is_exporting() or torch.jit.is_tracing()) and "torch.onnx" in sys.modules
            and torch.onnx.is_in_onnx_export())


class _PackedLayout:
    """Where each row of a PackedSequence's data sits in the padded, time-major [T, B, ...] batch, in the sorted
    order the data is packed in: row n is step `steps[n]` of sorted row `rows[n]`. Unpacking and packing are
    then one scatter and one gather, where pad_packed_sequence / pack_padded_sequence copy step by step (on a
    GPU, a kernel launch per step, each way and again in the backward: ~4T launches a call)."""

    def __init__(self, packed: PackedSequence):
        batch_sizes = packed.batch_sizes.to("cpu", torch.int64)
        n, T = packed.data.size(0), batch_sizes.numel()
        if packed.sorted_indices is not None:
            self.B = packed.sorted_indices.numel()
        else:
            self.B = int(batch_sizes[0])
            torch._check(self.B >= 1)  # under torch.compile B is data: what a PackedSequence guarantees
        steps = torch.repeat_interleave(torch.arange(T), batch_sizes, output_size=n)
        rows = torch.arange(n) - (torch.cumsum(batch_sizes, 0) - batch_sizes)[steps]
        device = packed.data.device
        self.T, self.steps, self.rows = T, steps.to(device), rows.to(device)
        # Sorted row b runs for as many steps as have more than b rows. Kept on the CPU, where checking them
        # needs no device sync (each launch copies them over without one).
        self.lengths = (batch_sizes.unsqueeze(0) > torch.arange(self.B).unsqueeze(1)).sum(1)

    def unpack(self, data: Tensor) -> Tensor:
        padded = data.new_zeros(self.T, self.B, *data.shape[1:])
        return padded.index_put((self.steps, self.rows), data)

    def pack(self, padded: Tensor) -> Tensor:
        return padded[self.steps, self.rows]


class LSTM(nn.LSTM):
    """`torch.nn.LSTM` with the recurrence fused in Triton kernels. Same constructor (plus `backend`), same
    parameters, same `forward(input, hx=None)` contract and outputs."""

    def __init__(self, *args, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = _check_backend(backend)
        _allow_dynamo()

    def __prepare_scriptable__(self):
        _no_script(self)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s if self.backend == "auto" else f"{s}, backend={self.backend!r}"

    def _check_args(self, x: Tensor, h0: Tensor | None, c0: Tensor | None) -> None:
        """nn.LSTM's checks and messages, for time-major x [T, B, I] (and the states, unless None: zeros)."""
        if x.dtype != self.weight_ih_l0.dtype and _autocast_dtype(x.device) is None:
            raise ValueError(f"RNN input dtype ({x.dtype}) does not match weight dtype ({self.weight_ih_l0.dtype}). "
                             f"Convert input: input.to({self.weight_ih_l0.dtype}), or convert model: "
                             f"model.to({x.dtype})")
        if x.size(-1) != self.input_size:
            raise RuntimeError(f"input.size(-1) must be equal to input_size. Expected {self.input_size}, "
                               f"got {x.size(-1)}")
        dirs = 2 if self.bidirectional else 1
        real_hidden = self.proj_size if self.proj_size > 0 else self.hidden_size
        for i, (st, size) in enumerate(((h0, real_hidden), (c0, self.hidden_size)) if h0 is not None else ()):
            expected = (self.num_layers * dirs, x.size(1), size)
            if tuple(st.shape) != expected:
                raise RuntimeError(f"Expected hidden[{i}] size {expected}, got {list(st.shape)}")
            if st.dtype != x.dtype:
                raise RuntimeError(f"Expected hidden[{i}] dtype {x.dtype} (the input's), got {st.dtype}")
            if st.device != x.device:
                raise RuntimeError(f"Expected hidden[{i}] on the input's device {x.device}, got {st.device}")

    def _check_weights(self, weights: dict, x: Tensor) -> None:
        """Every parameter a layer launch reads, as the constructor shaped it and in the input's dtype and device
        (after autocast's cast): one that was replaced, cast or moved alone raises here, named, instead of
        reaching a kernel. The layers then skip lstm_layer's own checks (which the module's already cover for x
        and the states: ~5 us a layer and direction of a host-bound call, perf/NOTES.md v0.50)."""
        if not x.is_floating_point():
            raise TypeError(f"LSTM: input must have a floating dtype, got {x.dtype}")
        D = 2 if self.bidirectional else 1
        H = self.hidden_size
        P = self.proj_size if self.proj_size > 0 else H
        for name, w in weights.items():
            if w is None:
                continue
            if not isinstance(w, Tensor):
                raise TypeError(f"LSTM: {name} must be a Tensor, got {type(w).__name__}")
            kind = name[:9]
            if kind == "weight_ih":
                shape = (4 * H, self.input_size if name in ("weight_ih_l0", "weight_ih_l0_reverse") else D * P)
            elif kind == "weight_hh":
                shape = (4 * H, P)
            elif kind == "weight_hr":
                shape = (P, H)
            else:
                shape = (4 * H,)
            if w.shape != shape:
                raise RuntimeError(f"LSTM: {name} must have shape {shape} (from the constructor's sizes), got "
                                   f"{tuple(w.shape)}")
            if w.dtype != x.dtype or w.device != x.device:
                raise RuntimeError(f"LSTM: {name} must have the input's dtype {x.dtype} and device {x.device}, got "
                                   f"{w.dtype} on {w.device}")

    def forward(self, input, hx=None):
        if (proxy := _fx_proxy(input, hx)) is not None:
            return _fx_leaf(self, proxy, input, hx)
        if _onnx_exporting():
            # An ONNX graph runs on an ONNX runtime, which has no Triton kernels: record the op torch.nn records.
            return super().forward(input, hx)
        data = input.data if isinstance(input, PackedSequence) else input
        if not isinstance(data, Tensor):
            raise TypeError(f"LSTM: input must be a Tensor or PackedSequence, got {type(input).__name__}")
        cast = _autocast_dtype(data.device)
        if resolve_backend(self.backend, data.device, cast or self.weight_ih_l0.dtype) == "torch":
            return super().forward(input, hx)

        dirs = 2 if self.bidirectional else 1
        lengths = layout = None
        if isinstance(input, PackedSequence):
            # The layers run in the packed (sorted) batch order; hx and h_n are permuted instead of x and y.
            layout = _PackedLayout(input)
            x, lengths = layout.unpack(input.data), layout.lengths
            is_batched = True
        else:
            if input.dim() not in (2, 3):
                raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead")
            is_batched = input.dim() == 3
            x = input if is_batched else input.unsqueeze(0 if self.batch_first else 1)
            if self.batch_first:
                x = x.transpose(0, 1)
        if hx is None:
            # Zero states as None: the launches take them from their own workspaces' memset (two memsets and a
            # conversion fewer on a GPU, ~25-60 us of host time each: perf/NOTES.md v0.70).
            h0 = c0 = None
        else:
            h0, c0 = _state_pair("LSTM", hx)
            want = 3 if is_batched else 2
            if h0.dim() != want or c0.dim() != want:
                kind = "batched 3-D" if is_batched else "unbatched 2-D"
                raise RuntimeError(f"For {kind} input, hx and cx should also be {want}-D but got "
                                   f"({h0.dim()}-D, {c0.dim()}-D) tensors")
            if not is_batched:
                h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
        self._check_args(x, h0, c0)
        if x.size(0) == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        if layout is not None and input.sorted_indices is not None and h0 is not None:
            h0, c0 = h0.index_select(1, input.sorted_indices), c0.index_select(1, input.sorted_indices)

        weights = {name: getattr(self, name) for name in self._flat_weights_names}
        if cast is not None:
            x = x.to(cast)
            h0, c0 = (None, None) if h0 is None else (h0.to(cast), c0.to(cast))
            weights = {k: w.to(cast) for k, w in weights.items()}

        dropping = self.dropout > 0 and self.training and self.num_layers > 1
        if self.num_layers > 1 and dirs == 1 and self.proj_size == 0:
            # A unidirectional stack: every layer in one forward launch and one backward launch, as wavefronts.
            per_layer = [tuple(weights.get(f"{n}_l{layer}") for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
                         for layer in range(self.num_layers)]
            scale = None
            if dropping:
                scale = torch.stack([self._dropout_scale(layout, x, self.hidden_size)
                                     for _ in range(self.num_layers - 1)])
            output, hidden = lstm_stack(x, per_layer, h0, c0, lengths=lengths, dropout_scale=scale, backend="triton")
            return self._finish(input, output, hidden, is_batched, layout)

        self._check_weights(weights, x)
        layer_input, h_n, c_n = x, [], []
        for layer in range(self.num_layers):
            # Both directions of a layer run in one launch.
            sfxs = [f"_l{layer}" + ("_reverse" if d else "") for d in range(dirs)]
            per_dir = [tuple(weights.get(n + sfx) for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh",
                                                            "weight_hr")) for sfx in sfxs]
            # (One layer: the states as they are; a slice is a view op a call.)
            states = (h0, c0) if self.num_layers == 1 or h0 is None else (h0[layer * dirs:(layer + 1) * dirs],
                                                                          c0[layer * dirs:(layer + 1) * dirs])
            layer_input, (h, c) = lstm_layer(layer_input, per_dir, *states, lengths=lengths, backend="triton",
                                             checked=True)
            h_n.append(h)
            c_n.append(c)
            if dropping and layer < self.num_layers - 1:
                layer_input = layer_input * self._dropout_scale(layout, x, layer_input.size(2))
        # (One layer: its states as they are; cat would copy them.)
        hidden = (h_n[0], c_n[0]) if len(h_n) == 1 else (torch.cat(h_n), torch.cat(c_n))
        return self._finish(input, layer_input, hidden, is_batched, layout)

    def _dropout_scale(self, layout: _PackedLayout | None, x: Tensor, width: int) -> Tensor:
        """One layer's dropout scale [T, B, width] (0 or 1 / (1 - p)), drawn as nn.LSTM draws it on the CPU
        (bernoulli over its own layout of the layer's output: packed rows for a PackedSequence), so that the
        same seed drops the same units."""
        p = self.dropout
        shape = (layout.steps.numel(), width) if layout is not None else (x.size(0), x.size(1), width)
        if p >= 1:
            noise = x.new_zeros(shape)  # nn.LSTM draws nothing for p = 1
        else:
            noise = x.new_empty(shape).bernoulli_(1 - p).div_(1 - p)
        return noise if layout is None else layout.unpack(noise)

    def _finish(self, input, output: Tensor, hidden: tuple[Tensor, Tensor], is_batched: bool,
                layout: _PackedLayout | None):
        """Time-major padded output back to the caller's form: PackedSequence, batch_first, unbatched."""
        if layout is not None:
            # Same batch_sizes and indices as the input, as nn.LSTM returns them; h_n and c_n in the caller's
            # batch order.
            if input.unsorted_indices is not None:
                hidden = (hidden[0].index_select(1, input.unsorted_indices),
                          hidden[1].index_select(1, input.unsorted_indices))
            return PackedSequence(layout.pack(output), input.batch_sizes, input.sorted_indices,
                                  input.unsorted_indices), hidden
        if self.batch_first:
            output = output.transpose(0, 1)
        if not is_batched:
            output = output.squeeze(0 if self.batch_first else 1)
            hidden = (hidden[0].squeeze(1), hidden[1].squeeze(1))
        return output, hidden


class LSTMCell(nn.LSTMCell):
    """`torch.nn.LSTMCell` whose step (gates, cell update, output) is one fused Triton step, forward and
    backward."""

    def __init__(self, *args, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = _check_backend(backend)

    def __prepare_scriptable__(self):
        _no_script(self)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s if self.backend == "auto" else f"{s}, backend={self.backend!r}"

    def forward(self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        if (proxy := _fx_proxy(input, hx)) is not None:
            return _fx_leaf(self, proxy, input, hx)
        if _onnx_exporting():
            # An ONNX graph runs on an ONNX runtime, which has no Triton kernels: record the op torch.nn records.
            return super().forward(input, hx)
        if not isinstance(input, Tensor):
            raise TypeError(f"LSTMCell: input must be a Tensor, got {type(input).__name__}")
        cast = _autocast_dtype(input.device, cell=True)
        if resolve_backend(self.backend, input.device, cast or self.weight_ih.dtype) == "torch":
            return super().forward(input, hx)
        if input.dim() not in (1, 2):
            raise ValueError(f"LSTMCell: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if hx is not None:
            hx = _state_pair("LSTMCell", hx)
            for idx, value in enumerate(hx):
                if value.dim() not in (1, 2):
                    raise ValueError(f"LSTMCell: Expected hx[{idx}] to be 1D or 2D, got {value.dim()}D instead")
        is_batched = input.dim() == 2
        x = input if is_batched else input.unsqueeze(0)
        B = x.size(0)
        if hx is None:
            h0 = c0 = x.new_zeros(B, self.hidden_size)
        else:
            h0, c0 = (hx[0], hx[1]) if is_batched else (hx[0].unsqueeze(0), hx[1].unsqueeze(0))
        if x.size(1) != self.input_size:
            raise RuntimeError(f"input has inconsistent input_size: got {x.size(1)} expected {self.input_size}")
        for i, st in enumerate((h0, c0)):  # nn.LSTMCell's own messages
            if st.size(0) != B:
                raise RuntimeError(f"Input batch size {B} doesn't match hidden{i} batch size {st.size(0)}")
            if st.size(1) != self.hidden_size:
                raise RuntimeError(f"hidden{i} has inconsistent hidden_size: got {st.size(1)}, "
                                   f"expected {self.hidden_size}")
        if cast is None and x.dtype != self.weight_ih.dtype:
            raise RuntimeError(f"LSTMCell input dtype ({x.dtype}) does not match weight dtype "
                               f"({self.weight_ih.dtype})")
        for i, st in enumerate((h0, c0)):
            if st.device != x.device:
                raise RuntimeError(f"LSTMCell: hx[{i}] is on {st.device}, input on {x.device}")
        # nn.LSTMCell multiplies h_0 by a weight (a dtype mismatch raises) but only scales c_0 (it promotes).
        if cast is None and h0.dtype != x.dtype:
            raise RuntimeError(f"LSTMCell: hx[0] dtype ({h0.dtype}) does not match input dtype ({x.dtype})")
        if cast is None and c0.dtype != x.dtype:
            c0 = c0.to(x.dtype)
        w = [self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh]
        if cast is not None:
            x, h0, c0 = x.to(cast), h0.to(cast), c0.to(cast)
            w = [None if t is None else t.to(cast) for t in w]
        if B == 0 or self.hidden_size == 0:  # nothing to compute; keep the outputs connected to the graph
            nothing = zero_from(x, *w)
            h, c = h0 + nothing, c0 + nothing
            return (h, c) if is_batched else (h.squeeze(0), c.squeeze(0))
        # x is in the dtype nn.LSTMCell would use already (under CPU autocast: its own, float32).
        autocast = torch.is_autocast_enabled(x.device.type)
        with torch.autocast(x.device.type, enabled=False) if autocast else contextlib.nullcontext():
            h, c = lstm_cell_step(x, h0, c0, *w)
        if not is_batched:
            h, c = h.squeeze(0), c.squeeze(0)
        return h, c


def convert(module: nn.Module, backend: str = "auto") -> nn.Module:
    """Replaces every `nn.LSTM` and `nn.LSTMCell` in `module` (in place) by tritonlstm's, keeping the very same
    parameter tensors (so weights, device, dtype, training mode and optimizer references carry over), and
    returns the module (the replacement itself when `module` is an LSTM)."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    _check_backend(backend)

    def swap(m: nn.Module) -> nn.Module:
        cls = {nn.LSTM: LSTM, nn.LSTMCell: LSTMCell}.get(type(m))  # exact types: a subclass may own its forward
        if cls is None:
            if isinstance(m, (LSTM, LSTMCell)):
                m.backend = backend
            return m
        new = cls.__new__(cls)
        new.__dict__.update(m.__dict__)
        new.backend = backend
        if cls is LSTM:
            _allow_dynamo()
        return new

    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            new = swap(child)
            if new is not child:
                setattr(parent, name, new)
    return swap(module)
