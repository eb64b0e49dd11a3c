"""tritonlstm.LSTM / LSTMCell / convert against torch.nn.LSTM / nn.LSTMCell with copied weights (interpreter)."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import tritonlstm
from tritonlstm.kernels import lstm as kernels

TOL = dict(rtol=2e-5, atol=2e-6)


@pytest.fixture
def no_torch_lstm(monkeypatch):
    """backend='triton' must never reach torch.lstm / _VF.lstm / nn.LSTM.forward; counts kernel launches."""
    def refuse(*a, **k):
        raise AssertionError("reached the torch LSTM implementation")

    monkeypatch.setattr(nn.LSTM, "forward", refuse)
    monkeypatch.setattr(nn.LSTMCell, "forward", refuse)
    monkeypatch.setattr(torch, "lstm", refuse)
    monkeypatch.setattr(torch, "lstm_cell", refuse)
    calls = {"fwd": 0}
    fwd = kernels.lstm_forward

    def spy(*a, **k):
        calls["fwd"] += 1
        return fwd(*a, **k)

    monkeypatch.setattr(kernels, "lstm_forward", spy)
    return calls


def pair(I, H, backend="triton", **kw):
    ref = nn.LSTM(I, H, **kw)
    ours = tritonlstm.LSTM(I, H, backend=backend, **kw)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def _cases():
    kinds = ("padded", "packed-sorted", "packed-unsorted", "unbatched")
    out, i = [], 0
    for kind in kinds:
        for layers in (1, 2, 3):
            for bidir in (False, True):
                bf, proj, bias, hx = bool(i % 2), (0, 3)[(i // 2) % 2], bool((i + 1) % 3), bool((i // 3) % 2)
                if kind.startswith("packed"):
                    bf = bool(i % 2)
                ident = f"{kind}-L{layers}" + ("-bidir" if bidir else "") + ("-bf" if bf else "") + \
                    (f"-proj{proj}" if proj else "") + ("" if bias else "-nobias") + ("-hx" if hx else "")
                out.append(pytest.param(kind, layers, bidir, bf, proj, bias, hx, id=ident))
                i += 1
    return out


@pytest.mark.parametrize("kind,layers,bidir,batch_first,proj,bias,hx", _cases())
def test_parity_with_nn_lstm(kind, layers, bidir, batch_first, proj, bias, hx):
    T, B, I, H = 5, 4, 3, 6
    ref, ours = pair(I, H, num_layers=layers, bidirectional=bidir, batch_first=batch_first, proj_size=proj,
                     bias=bias)
    D = 2 if bidir else 1
    P = proj or H
    batched = kind != "unbatched"
    shape = ((B, T, I) if batch_first else (T, B, I)) if batched else (T, I)
    x = torch.randn(*shape)
    state = None
    if hx:
        sb = (layers * D, B) if batched else (layers * D,)
        state = (torch.randn(*sb, P), torch.randn(*sb, H))
    lengths = torch.tensor([5, 3, 5, 1]) if kind == "packed-sorted" else torch.tensor([2, 5, 1, 4])

    outs = []
    for m in (ref, ours):
        xl = x.clone().requires_grad_()
        sl = tuple(s.clone().requires_grad_() for s in state) if state else None
        inp = xl
        if kind.startswith("packed"):
            if kind == "packed-sorted":
                lengths = torch.tensor([5, 5, 3, 1])
            inp = pack_padded_sequence(xl, lengths, batch_first=batch_first, enforce_sorted=kind == "packed-sorted")
        y, (h, c) = m(inp, sl)
        yd = y.data if isinstance(y, PackedSequence) else y
        g = torch.Generator().manual_seed(1)
        w = [torch.randn(t.shape, generator=g) for t in (yd, h, c)]
        ((yd * w[0]).sum() + (h * w[1]).sum() + (c * w[2]).sum()).backward()
        outs.append((y, h, c, xl.grad, [s.grad for s in sl] if sl else [], {n: p.grad for n, p in
                                                                               m.named_parameters()}))
    (y0, h0, c0, gx0, gs0, gp0), (y1, h1, c1, gx1, gs1, gp1) = outs
    if isinstance(y0, PackedSequence):
        assert isinstance(y1, PackedSequence)
        torch.testing.assert_close(y1.data, y0.data, **TOL)
        for f in ("batch_sizes", "sorted_indices", "unsorted_indices"):
            a, b = getattr(y0, f), getattr(y1, f)
            assert (a is None and b is None) or torch.equal(a, b), f
    else:
        assert y1.shape == y0.shape
        torch.testing.assert_close(y1, y0, **TOL)
    torch.testing.assert_close(h1, h0, **TOL)
    torch.testing.assert_close(c1, c0, **TOL)
    torch.testing.assert_close(gx1, gx0, **TOL)
    for a, b in zip(gs1, gs0):
        torch.testing.assert_close(a, b, **TOL)
    assert gp1.keys() == gp0.keys()
    for n in gp0:
        torch.testing.assert_close(gp1[n], gp0[n], **TOL, msg=lambda m, n=n: f"d{n}: {m}")


def test_triton_backend_never_reaches_torch_lstm(no_torch_lstm):
    _, ours = pair(3, 5, num_layers=2, bidirectional=True, proj_size=2)
    cell = tritonlstm.LSTMCell(3, 5, backend="triton")
    x = torch.randn(4, 2, 3)
    ours(x)
    ours(pack_padded_sequence(x, torch.tensor([4, 2]), enforce_sorted=False))
    cell(x[0])
    assert no_torch_lstm["fwd"] == 2 * 2 + 1  # both directions of a layer share one launch


def test_dropout_eval_is_exact():
    ref, ours = pair(3, 5, num_layers=3, dropout=0.5)
    ref.eval()
    ours.eval()
    x = torch.randn(4, 2, 3)
    torch.testing.assert_close(ours(x)[0], ref(x)[0], **TOL)


def test_dropout_training_mask_statistics_and_seed(monkeypatch):
    seen = []
    real = tritonlstm.LSTM._dropout_scale

    def spy(self, *a):
        out = real(self, *a)
        seen.append(out)
        return out

    monkeypatch.setattr(tritonlstm.LSTM, "_dropout_scale", spy)
    _, ours = pair(8, 64, num_layers=3, dropout=0.3)
    ours.train()
    x = torch.randn(6, 16, 8)
    torch.manual_seed(5)
    y1, _ = ours(x)
    assert len(seen) == 2  # between layers only, not after the last
    for scale in seen:
        assert torch.all((scale == 0) | torch.isclose(scale, torch.tensor(1 / 0.7)))
        assert abs((scale == 0).float().mean().item() - 0.3) < 0.02
    torch.manual_seed(5)
    y2, _ = ours(x)
    assert torch.equal(y1, y2)
    torch.manual_seed(6)
    assert not torch.equal(ours(x)[0], y1)
    ours.eval()
    seen.clear()
    ours(x)
    assert not seen


@pytest.mark.parametrize("kind", ["padded", "batch_first", "packed", "unbatched", "bidirectional", "p=1"])
def test_dropout_training_matches_nn_lstm_under_the_same_seed(kind, monkeypatch):
    """Training with dropout between layers draws the same units as nn.LSTM on the CPU, so outputs and every
    gradient match under the same seed; a unidirectional stack still runs as one forward and one backward
    launch."""
    launches = []
    for name in ("lstm_stack_forward", "lstm_stack_backward", "lstm_forward", "lstm_backward"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _n=name, _f=real, **k: launches.append(_n) or _f(*a, **k))
    kw = dict(num_layers=3, dropout=1.0 if kind == "p=1" else 0.4, batch_first=kind == "batch_first",
              bidirectional=kind == "bidirectional")
    ref, ours = pair(3, 6, **kw)
    ref.train()
    ours.train()
    T, B = 5, 4
    x = torch.randn(T, 3) if kind == "unbatched" else torch.randn(*((B, T, 3) if kind == "batch_first" else (T, B, 3)))
    res = []
    for m in (ref, ours):
        xl = x.clone().requires_grad_()
        inp = pack_padded_sequence(xl, torch.tensor([2, 5, 1, 4]), enforce_sorted=False) if kind == "packed" else xl
        torch.manual_seed(11)
        y, (h, c) = m(inp)
        yd = y.data if kind == "packed" else y
        g = torch.Generator().manual_seed(3)
        ((yd * torch.randn(yd.shape, generator=g)).sum() + (h * torch.randn(h.shape, generator=g)).sum()
         + (c * torch.randn(c.shape, generator=g)).sum()).backward()
        res.append([yd, h, c, xl.grad, *(p.grad for p in m.parameters())])
    for a, b in zip(res[1], res[0]):
        torch.testing.assert_close(a, b, **TOL)
    if kind == "bidirectional":
        assert launches == ["lstm_forward"] * 3 + ["lstm_backward"] * 3
    else:
        assert launches == ["lstm_stack_forward", "lstm_stack_backward"]


def test_state_dict_round_trips_both_ways():
    ref = nn.LSTM(3, 5, num_layers=2, bidirectional=True, proj_size=2)
    ours = tritonlstm.LSTM(3, 5, num_layers=2, bidirectional=True, proj_size=2)
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict(), strict=True)
    back = nn.LSTM(3, 5, num_layers=2, bidirectional=True, proj_size=2)
    back.load_state_dict(ours.state_dict(), strict=True)
    for (n, a), (_, b) in zip(ref.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), n
    cell = tritonlstm.LSTMCell(3, 5)
    cell.load_state_dict(nn.LSTMCell(3, 5).state_dict(), strict=True)
    nn.LSTMCell(3, 5).load_state_dict(cell.state_dict(), strict=True)


def test_repr_and_init_match_torch():
    torch.manual_seed(0)
    ref = nn.LSTM(3, 5, num_layers=2)
    torch.manual_seed(0)
    ours = tritonlstm.LSTM(3, 5, num_layers=2)
    assert repr(ours).replace("LSTM", "X") == repr(ref).replace("LSTM", "X")
    for a, b in zip(ref.parameters(), ours.parameters()):
        assert torch.equal(a, b)
    assert "backend='triton'" in repr(tritonlstm.LSTM(3, 5, backend="triton"))


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
@pytest.mark.parametrize("hx", [True, False], ids=["hx", "nohx"])
def test_cell_parity(batched, hx, no_torch_lstm):
    ref = nn.LSTMCell(4, 6)
    ours = tritonlstm.LSTMCell(4, 6, backend="triton")
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 4) if batched else torch.randn(4)
    st = (torch.randn(*x.shape[:-1], 6), torch.randn(*x.shape[:-1], 6)) if hx else None
    res = []
    for m in (ref, ours):
        xl = x.clone().requires_grad_()
        sl = tuple(s.clone().requires_grad_() for s in st) if st else None
        h, c = ours(xl, sl) if m is ours else _torch_cell(ref, xl, sl)
        (h.sum() * 2 + (c * c).sum()).backward()
        res.append((h, c, xl.grad, [s.grad for s in sl] if sl else [], [p.grad for p in m.parameters()]))
    for a, b in zip(res[1][:3], res[0][:3]):
        torch.testing.assert_close(a, b, **TOL)
    for a, b in zip(res[1][3] + res[1][4], res[0][3] + res[0][4]):
        torch.testing.assert_close(a, b, **TOL)
    assert no_torch_lstm["fwd"] == 1


def _torch_cell(m, x, hx):
    """nn.LSTMCell's math through torch ops (its forward is patched away in these tests)."""
    if x.dim() == 1:
        x = x[None]
        hx = None if hx is None else (hx[0][None], hx[1][None])
        h, c = _torch_cell(m, x, hx)
        return h[0], c[0]
    h0, c0 = hx if hx is not None else (x.new_zeros(x.shape[0], m.hidden_size),) * 2
    i, f, g, o = (x @ m.weight_ih.t() + m.bias_ih + h0 @ m.weight_hh.t() + m.bias_hh).chunk(4, 1)
    c = torch.sigmoid(f) * c0 + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def test_convert_nested_model():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Sequential(nn.Linear(3, 4), nn.ModuleDict({"rnn": nn.LSTM(4, 5, num_layers=2)}))
            self.cell = nn.LSTMCell(5, 5)
            self.head = nn.Linear(5, 2)

        def forward(self, x):
            y, _ = self.enc[1]["rnn"](self.enc[0](x))
            h, _ = self.cell(y[-1])
            return self.head(h)

    net = Net().eval()
    x = torch.randn(4, 2, 3)
    before = net(x)
    params = {n: p for n, p in net.named_parameters()}
    out = tritonlstm.convert(net, backend="triton")
    assert out is net
    assert type(net.enc[1]["rnn"]) is tritonlstm.LSTM and type(net.cell) is tritonlstm.LSTMCell
    assert net.enc[1]["rnn"].backend == "triton" and not net.enc[1]["rnn"].training
    assert all(p is params[n] for n, p in net.named_parameters())
    torch.testing.assert_close(net(x), before, **TOL)
    top = tritonlstm.convert(nn.LSTM(3, 4))
    assert type(top) is tritonlstm.LSTM


@pytest.mark.parametrize("module,backend,exc,match", [
    ("LSTM", "auto", TypeError, "module must be a torch.nn.Module, got str"),
    (None, "auto", TypeError, "module must be a torch.nn.Module, got NoneType"),
    (nn.LSTM(3, 4), "cuda", ValueError, "backend must be one of"),
])
def test_convert_names_a_bad_argument(module, backend, exc, match):
    with pytest.raises(exc, match=match):
        tritonlstm.convert(module, backend=backend)


def test_torch_compile_fullgraph_module():
    torch.manual_seed(0)
    m = tritonlstm.LSTM(5, 6, num_layers=2, bidirectional=True, batch_first=True, backend="triton")
    cm = torch.compile(m, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 4, 5, requires_grad=True)
    y, (h, c) = cm(x)
    (y.sum() + c.sum()).backward()
    gx, gw = x.grad.clone(), m.weight_hh_l1.grad.clone()
    x.grad = None
    m.zero_grad()
    y2, (h2, c2) = m(x)
    (y2.sum() + c2.sum()).backward()
    torch.testing.assert_close(y, y2)
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gw, m.weight_hh_l1.grad)


@pytest.mark.parametrize("enforce_sorted", [True, False], ids=["sorted", "unsorted"])
def test_torch_compile_fullgraph_with_packed_input_matches_nn_lstm(enforce_sorted):
    ref, ours = pair(4, 6, num_layers=2, bidirectional=True)
    cm = torch.compile(ours, fullgraph=True, backend="aot_eager")
    lengths = [5, 4, 2] if enforce_sorted else [5, 2, 4]
    res = []
    for m in (ref, cm):
        x = torch.randn(5, 3, 4, generator=torch.Generator().manual_seed(1)).requires_grad_()
        y, (h, c) = m(pack_padded_sequence(x, lengths, enforce_sorted=enforce_sorted))
        (y.data.sum() + h.sum() + 0.5 * c.sum()).backward()
        res.append([y.data, h, c, x.grad])
    for a, b in zip(res[1], res[0]):
        torch.testing.assert_close(a, b, **TOL)


def test_packed_input_is_unpacked_without_a_copy_per_step(monkeypatch):
    # pad_packed_sequence / pack_padded_sequence copy step by step: on a GPU ~4T kernel launches per call.
    ref, ours = pair(4, 6, num_layers=2, dropout=0.3)
    x = torch.randn(7, 3, 4, requires_grad=True)
    packed = pack_padded_sequence(x, [3, 7, 5], enforce_sorted=False)
    with torch.no_grad():
        expected = ref.eval()(packed)

    def refuse(*a, **k):
        raise AssertionError("a step-by-step (un)packing op ran")

    monkeypatch.setattr(torch._VF, "_pad_packed_sequence", refuse)
    monkeypatch.setattr(torch._VF, "_pack_padded_sequence", refuse)
    ours.train()
    y, _ = ours(packed)
    y.data.sum().backward()
    ours.eval()
    y, (h, c) = ours(packed)
    torch.testing.assert_close(y.data, expected[0].data, **TOL)
    torch.testing.assert_close(h, expected[1][0], **TOL)
    assert torch.equal(y.batch_sizes, packed.batch_sizes) and torch.equal(y.unsorted_indices, packed.unsorted_indices)


def _errors(fn):
    try:
        fn()
    except Exception as e:  # the type and message are what is compared
        return type(e), str(e)
    return None, None


BAD = [
    pytest.param(lambda m: m(torch.randn(2, 3, 4, 5)), id="input-4d"),
    pytest.param(lambda m: m(torch.randn(2, 3, 7)), id="input-size"),
    pytest.param(lambda m: m(torch.randn(2, 3, 4), (torch.zeros(2, 3, 5), torch.zeros(2, 3, 5))), id="h-layers"),
    pytest.param(lambda m: m(torch.randn(2, 3, 4), (torch.zeros(1, 2, 5), torch.zeros(1, 2, 5))), id="h-batch"),
    pytest.param(lambda m: m(torch.randn(2, 3, 4), (torch.zeros(1, 3, 5), torch.zeros(1, 3, 6))), id="c-size"),
    pytest.param(lambda m: m(torch.randn(2, 3, 4), (torch.zeros(3, 5), torch.zeros(3, 5))), id="hx-2d-batched"),
    pytest.param(lambda m: m(torch.randn(2, 4), (torch.zeros(1, 1, 5), torch.zeros(1, 1, 5))), id="hx-3d-unbatched"),
    pytest.param(lambda m: m(torch.randn(2, 3, 4).double()), id="dtype"),
    pytest.param(lambda m: m(torch.randn(0, 3, 4)), id="T0"),
    # A parameter cast or replaced alone (the module checks them once; its layers skip lstm_layer's checks, v0.50).
    pytest.param(lambda m: (setattr(m.weight_hh_l0, "data", m.weight_hh_l0.data.half()), m(torch.randn(2, 3, 4))),
                 id="weight_hh-dtype"),
    pytest.param(lambda m: (setattr(m.bias_ih_l0, "data", m.bias_ih_l0.data.double()), m(torch.randn(2, 3, 4))),
                 id="bias_ih-dtype"),
]


@pytest.mark.parametrize("bad", BAD)
def test_input_errors_like_nn_lstm(bad):
    ref, ours = pair(4, 5)
    ref_type, ref_msg = _errors(lambda: bad(ref))
    our_type, our_msg = _errors(lambda: bad(ours))
    assert ref_type is not None and our_type is ref_type, (ref_type, ref_msg, our_type, our_msg)


@pytest.mark.parametrize("name, shape", [("weight_ih_l1_reverse", (20, 9)), ("weight_hr_l0", (3, 4)),
                                         ("bias_hh_l1", (21,)), ("weight_ih_l0", (20, 5))])
def test_a_parameter_of_the_wrong_shape_is_named(name, shape):
    """Every layer's parameters are checked against the constructor's sizes before any launch: the input size at
    layer 0, D * P above it, P with a projection (here 2 layers, both directions, proj_size 3). (nn.LSTM on the CPU
    runs some such shapes without an error; the kernels would read past them.)"""
    m = tritonlstm.LSTM(4, 5, num_layers=2, bidirectional=True, proj_size=3, backend="triton")
    x = torch.randn(2, 3, 4)
    m(x)  # as constructed: every shape passes
    setattr(m, name, nn.Parameter(torch.randn(shape)))
    with pytest.raises(RuntimeError, match=rf"LSTM: {name} must have shape") as info:
        m(x)
    assert str(info.value).endswith(f"got {shape}")


CELL_BAD = [
    pytest.param(lambda m: m(torch.randn(2, 3, 4)), id="input-3d"),
    pytest.param(lambda m: m(torch.randn(3, 7)), id="input-size"),
    pytest.param(lambda m: m(torch.randn(3, 4), (torch.zeros(2, 5), torch.zeros(2, 5))), id="hx-batch"),
    pytest.param(lambda m: m(torch.randn(3, 4), (torch.zeros(1, 3, 5), torch.zeros(3, 5))), id="hx-3d"),
    pytest.param(lambda m: m(torch.randn(3, 4), (torch.zeros(3, 6), torch.zeros(3, 5))), id="h-size"),
    pytest.param(lambda m: m(torch.randn(3, 4), (torch.zeros(3, 5).double(), torch.zeros(3, 5))), id="h-dtype"),
    pytest.param(lambda m: m(torch.ones(3, 4, dtype=torch.long)), id="int-input"),
    # One parameter cast alone (the step's own path checks what fused_lstm would have).
    pytest.param(lambda m: (setattr(m.weight_hh, "data", m.weight_hh.data.half()), m(torch.randn(3, 4))),
                 id="weight_hh-dtype"),
    pytest.param(lambda m: (setattr(m.bias_hh, "data", m.bias_hh.data.double()), m(torch.randn(3, 4))),
                 id="bias_hh-dtype"),
]


@pytest.mark.parametrize("bad", CELL_BAD)
def test_cell_input_errors_like_nn_lstmcell(bad):
    ref = nn.LSTMCell(4, 5)
    ours = tritonlstm.LSTMCell(4, 5, backend="triton")
    ref_type, ref_msg = _errors(lambda: bad(ref))
    our_type, our_msg = _errors(lambda: bad(ours))
    assert ref_type is not None and our_type is ref_type, (ref_type, ref_msg, our_type, our_msg)


def test_cell_takes_a_cell_state_of_another_dtype_like_nn_lstmcell():
    # nn.LSTMCell only scales c_0, so type promotion lets it differ from the input's dtype.
    ref = nn.LSTMCell(4, 5)
    ours = tritonlstm.LSTMCell(4, 5, backend="triton")
    ours.load_state_dict(ref.state_dict())
    x, h0, c0 = torch.randn(3, 4), torch.randn(3, 5), torch.randn(3, 5).half()
    for a, b in zip(ours(x, (h0, c0)), ref(x, (h0, c0))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_bad_backend_name():
    with pytest.raises(ValueError, match="backend must be one of"):
        tritonlstm.LSTM(3, 4, backend="cudnn")


@pytest.fixture
def stack_calls(monkeypatch):
    calls = {"stack": 0, "fwd": 0}
    stack, fwd = kernels.lstm_stack_forward, kernels.lstm_forward

    def spy_stack(*a, **k):
        calls["stack"] += 1
        return stack(*a, **k)

    def spy_fwd(*a, **k):
        calls["fwd"] += 1
        return fwd(*a, **k)

    monkeypatch.setattr(kernels, "lstm_stack_forward", spy_stack)
    monkeypatch.setattr(kernels, "lstm_forward", spy_fwd)
    return calls


@pytest.mark.parametrize("kind", ["padded", "packed", "unbatched"])
@pytest.mark.parametrize("layers", [2, 3])
@pytest.mark.parametrize("batch_first,hx", [(False, True), (True, False)], ids=["tm-hx", "bf-nohx"])
def test_inference_stack_runs_in_one_launch(kind, layers, batch_first, hx, stack_calls):
    """Eval-mode inference through a unidirectional stack takes the wavefront kernel (one launch for all
    layers) and matches nn.LSTM."""
    ref, ours = pair(3, 6, num_layers=layers, batch_first=batch_first, dropout=0.3)
    ref.eval()
    ours.eval()
    T, B = 5, 4
    x = torch.randn(*((B, T, 3) if batch_first else (T, B, 3))) if kind != "unbatched" else torch.randn(T, 3)
    sb = (layers, B) if kind != "unbatched" else (layers,)
    state = (torch.randn(*sb, 6), torch.randn(*sb, 6)) if hx else None
    inp = x
    if kind == "packed":
        inp = pack_padded_sequence(x, torch.tensor([2, 5, 1, 4]), batch_first=batch_first, enforce_sorted=False)
    with torch.no_grad():
        y0, (h0, c0) = ref(inp, state)
        y1, (h1, c1) = ours(inp, state)
    if kind == "packed":
        y0, y1 = y0.data, y1.data
    torch.testing.assert_close(y1, y0, **TOL)
    torch.testing.assert_close(h1, h0, **TOL)
    torch.testing.assert_close(c1, c0, **TOL)
    assert stack_calls == {"stack": 1, "fwd": 0}


def test_stack_path_choice(stack_calls):
    _, ours = pair(3, 6, num_layers=2, dropout=0.2)
    x = torch.randn(4, 2, 3)
    ours.eval()
    ours(x)  # training a stack without active dropout: the wavefront too
    assert stack_calls == {"stack": 1, "fwd": 0}
    ours.train()
    ours(x)  # dropout between layers: inside the wavefront
    assert stack_calls == {"stack": 2, "fwd": 0}
    _, ours = pair(3, 6, num_layers=2, bidirectional=True)
    ours(x)  # bidirectional: layer by layer, both directions of a layer in one launch
    assert stack_calls == {"stack": 2, "fwd": 2}


@pytest.mark.parametrize("kind", ["padded", "packed"])
def test_stack_training_gradients_match_nn_lstm(kind, stack_calls):
    ref, ours = pair(3, 6, num_layers=3)
    x = torch.randn(5, 4, 3)
    state = (torch.randn(3, 4, 6), torch.randn(3, 4, 6))
    res = []
    for m in (ref, ours):
        xl = x.clone().requires_grad_()
        sl = tuple(s.clone().requires_grad_() for s in state)
        inp = xl if kind == "padded" else pack_padded_sequence(xl, torch.tensor([2, 5, 1, 4]), enforce_sorted=False)
        y, (h, c) = m(inp, sl)
        yd = y.data if kind == "packed" else y
        g = torch.Generator().manual_seed(3)
        ((yd * torch.randn(yd.shape, generator=g)).sum() + (h * torch.randn(h.shape, generator=g)).sum()
         + (c * torch.randn(c.shape, generator=g)).sum()).backward()
        res.append([yd, h, c, xl.grad, *(s.grad for s in sl), *(p.grad for p in m.parameters())])
    for a, b in zip(res[1], res[0]):
        torch.testing.assert_close(a, b, **TOL)
    assert stack_calls == {"stack": 1, "fwd": 0}


@pytest.mark.parametrize("kw", [dict(), dict(num_layers=2), dict(bidirectional=True, proj_size=2)], ids=str)
def test_empty_batch_backward_gives_zero_weight_gradients_like_nn_lstm(kw):
    # PyTorch's test_RNN_input_size_zero: outputs of an empty batch still require grad through the weights.
    for cls in (torch.nn.LSTM, tritonlstm.LSTM):
        m = cls(3, 4, **kw)
        y, (h, c) = m(torch.zeros(5, 0, 3))
        dirs = 2 if kw.get("bidirectional") else 1
        assert y.shape == (5, 0, dirs * kw.get("proj_size", 4))
        assert y.requires_grad and h.requires_grad and c.requires_grad
        (y.sum() + h.sum() + c.sum()).backward()
        assert all(p.grad is not None and not p.grad.any() for p in m.parameters())
    for cls in (torch.nn.LSTMCell, tritonlstm.LSTMCell):
        cell = cls(3, 4)
        h, c = cell(torch.zeros(0, 3))
        (h.sum() + c.sum()).backward()
        assert all(p.grad is not None and not p.grad.any() for p in cell.parameters())


def test_cell_with_zero_hidden_size_matches_torch():
    x = torch.randn(3, 10, requires_grad=True)
    hx = torch.randn(3, 0)
    h, c = tritonlstm.LSTMCell(10, 0, backend="triton")(x, (hx, hx))
    assert h.shape == c.shape == (3, 0)
    h.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_double_backward_is_refused_clearly_and_works_on_the_torch_backend():
    m = tritonlstm.LSTM(8, 8, backend="triton")
    x = torch.randn(5, 3, 8, requires_grad=True)
    y, _ = m(x)
    (g,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward.*backend='torch'"):
        g.sum().backward()
    m.backend = "torch"
    ref = nn.LSTM(8, 8)
    ref.load_state_dict(m.state_dict())
    grads = []
    for mod in (m, ref):
        x.grad = None
        (g,) = torch.autograd.grad(mod(x)[0].square().sum(), x, create_graph=True)
        g.sum().backward()
        grads.append(x.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], **TOL)



@pytest.mark.parametrize("kind", ["layer", "stack", "bidirectional", "cell"])
def test_double_backward_with_frozen_weights_is_refused_not_silently_wrong(kind):
    """Frozen weights and a constant output gradient: nothing the backward ops take requires grad, so their
    gradients were constants to a second backward, which then dropped the recurrence's second-order terms and
    returned a wrong x.grad without a word (seen with the stack). It must raise as with trainable weights."""
    if kind == "cell":
        m = tritonlstm.LSTMCell(4, 5, backend="triton")
        x = torch.randn(2, 4, requires_grad=True)
    else:
        m = tritonlstm.LSTM(4, 5, num_layers=2 if kind == "stack" else 1, bidirectional=kind == "bidirectional",
                            backend="triton")
        x = torch.randn(3, 2, 4, requires_grad=True)
    m.requires_grad_(False)
    y = m(x)[0]
    (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    assert g.requires_grad
    with pytest.raises(NotImplementedError, match="double backward"):
        (g.square().sum() + y.sum()).backward(retain_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad(g.square().sum(), x)

def test_activation_checkpointing_recomputes_the_same_stack_with_dropout():
    """torch.utils.checkpoint reruns the forward during backward (RNG state restored): the same outputs and
    gradients as without it, through the stack's one-launch forward and backward with dropout."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    m = tritonlstm.LSTM(6, 8, num_layers=2, dropout=0.3, backend="triton").train()
    x = torch.randn(5, 3, 6, requires_grad=True)
    results = []
    for use_checkpoint in (True, False):
        x.grad = None
        m.zero_grad()
        torch.manual_seed(1)
        y = checkpoint(lambda t: m(t)[0], x, use_reentrant=False) if use_checkpoint else m(x)[0]
        y.square().sum().backward()
        results.append([y.detach(), x.grad.clone(), *(p.grad.clone() for p in m.parameters())])
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("layers", [1, 2], ids=["L1", "L2-stack"])
def test_half_precision_module_matches_nn_lstm_in_float(dtype, layers):
    """The module in fp16 / bf16 against nn.LSTM in fp32 on the same (rounded) weights and input. Under the
    interpreter this also checks the package's bf16 fix is in place (the raw interpreter gets bf16 wrong)."""
    ref, ours = pair(6, 8, num_layers=layers)
    ours.to(dtype)
    ref.load_state_dict(ours.float().state_dict())
    ours.to(dtype)
    x = torch.randn(5, 3, 6).to(dtype)
    y, (h, c) = ours(x)
    ry, (rh, rc) = ref(x.float())
    assert y.dtype == dtype
    tol = {torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    for a, b in ((y, ry), (h, rh), (c, rc)):
        torch.testing.assert_close(a.float(), b, rtol=tol, atol=tol)


@pytest.mark.parametrize("kw", [{}, {"num_layers": 2}, {"num_layers": 2, "bidirectional": True, "proj_size": 3}],
                         ids=["L1", "L2-stack", "L2-bidir-proj"])
def test_jit_trace_saves_loads_and_trains(kw, tmp_path):
    """A trace records the custom ops (one graph with or without grad mode), runs at another shape after
    torch.jit.save / load, and its gradients are nn.LSTM's."""
    ref, ours = pair(4, 5, **kw)
    traced = torch.jit.trace(ours, (torch.randn(3, 2, 4),))
    torch.jit.save(traced, tmp_path / "lstm.pt")
    loaded = torch.jit.load(tmp_path / "lstm.pt")
    x = torch.randn(6, 3, 4)
    out, ref_out = loaded(x), ref(x)
    torch.testing.assert_close(out, ref_out, **TOL)
    out[0].square().sum().backward()
    ref_out[0].square().sum().backward()
    grads = dict(loaded.named_parameters())
    for name, p in ref.named_parameters():
        torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-4, atol=1e-6)


def test_torch_export_runs_the_kernels(monkeypatch):
    ref, ours = pair(4, 5, num_layers=2, bidirectional=True)
    x = torch.randn(3, 2, 4)
    expected = ref(x)
    program = torch.export.export(ours, (x,))
    launches = []
    fwd = kernels.lstm_forward
    monkeypatch.setattr(kernels, "lstm_forward", lambda *a, **k: launches.append(1) or fwd(*a, **k))
    monkeypatch.setattr(nn.LSTM, "forward", None)
    torch.testing.assert_close(program.module()(x), expected, **TOL)
    assert len(launches) == 2  # one launch per bidirectional layer


def test_fx_symbolic_trace_keeps_the_modules_as_leaves_as_torch_nn_does(monkeypatch):
    """torch.fx.symbolic_trace (and FX tools built on it) records nn.LSTM / nn.LSTMCell as one call_module node each;
    ours record the same graph, and the traced model runs the Triton kernels."""

    class Net(nn.Module):
        def __init__(self, lstm, cell):
            super().__init__()
            self.rnn, self.cell, self.head = lstm(3, 5, 2, bidirectional=True), cell(10, 4), nn.Linear(4, 2)

        def forward(self, x, hx=None):
            y, (h, c) = self.rnn(x, hx)
            a, _ = self.cell(y[-1], (h[-1].repeat(1, 2)[:, :4], c[-1][:, :4]))
            return self.head(a) + h.sum()

    torch.manual_seed(0)
    ref = Net(nn.LSTM, nn.LSTMCell)
    ours = Net(functools.partial(tritonlstm.LSTM, backend="triton"), functools.partial(tritonlstm.LSTMCell,
                                                                                      backend="triton"))
    ours.load_state_dict(ref.state_dict())
    traced_ref, traced = torch.fx.symbolic_trace(ref), torch.fx.symbolic_trace(ours)
    nodes = [(n.op, str(n.target)) for n in traced.graph.nodes]
    assert nodes == [(n.op, str(n.target)) for n in traced_ref.graph.nodes]
    assert ("call_module", "rnn") in nodes and ("call_module", "cell") in nodes
    launches = []
    fwd = kernels.lstm_forward
    monkeypatch.setattr(kernels, "lstm_forward", lambda *a, **k: launches.append(1) or fwd(*a, **k))
    x, hx = torch.randn(4, 2, 3), (torch.randn(4, 2, 5), torch.randn(4, 2, 5))
    for args in ((x,), (x, hx)):
        torch.testing.assert_close(traced(*args), ref(*args), **TOL)
    assert len(launches) == 6  # a call: two bidirectional layers and the cell's step


@pytest.mark.parametrize("kw", [{}, {"num_layers": 2}, {"num_layers": 2, "bidirectional": True, "proj_size": 3}],
                         ids=["L1", "L2-stack", "L2-bidir-proj"])
def test_dispatch_mode_tracers_see_the_ops(kw):
    """Under a dispatch mode that builds a graph the calls go through the custom ops instead of launching the kernels
    behind its back: make_fx's graph of a training step holds the forward and backward ops and recomputes the
    gradient; torch.func.functionalize runs. A mode that only watches (FlopCounterMode) keeps the eager path. All as
    nn.LSTM computes them."""
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.utils.flop_counter import FlopCounterMode

    ref, ours = pair(3, 5, **kw)
    x = torch.randn(4, 2, 3, requires_grad=True)

    def grad_of(m):
        return lambda x: torch.autograd.grad(m(x)[0].square().sum(), x)[0]

    graph = make_fx(grad_of(ours))(x)
    ops = {str(n.target) for n in graph.graph.nodes if "tritonlstm" in str(n.target)}
    assert len(ops) == 2 and all(op.endswith("_backward.default") or "_backward" not in op for op in ops), ops
    expected = grad_of(ref)(x)
    torch.testing.assert_close(graph(x), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(graph(2 * x), grad_of(ref)(2 * x), rtol=1e-5, atol=1e-6)  # the graph computes it
    with FlopCounterMode(display=False):  # (its module tracker refuses autograd.grad, nn.LSTM's too: backward)
        ours(x)[0].square().sum().backward()
    torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(torch.func.functionalize(lambda x: ours(x)[0])(x), ref(x)[0], **TOL)
    cell_ref, cell = nn.LSTMCell(3, 5), tritonlstm.LSTMCell(3, 5, backend="triton")
    cell.load_state_dict(cell_ref.state_dict())
    graph = make_fx(lambda x: cell(x)[0])(x[0])
    assert any("tritonlstm" in str(n.target) for n in graph.graph.nodes)
    torch.testing.assert_close(graph(x[1]), cell_ref(x[1])[0], **TOL)


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript-exporter", "dynamo-exporter"])
def test_onnx_export_records_the_op_torch_nn_records(dynamo, tmp_path):
    """torch.onnx.export (both exporters) of a model holding tritonlstm modules records ONNX's LSTM op, as for
    nn.LSTM / nn.LSTMCell (an ONNX runtime has no Triton kernels), and ONNX Runtime's outputs are the kernels'."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    if dynamo:
        pytest.importorskip("onnxscript")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = tritonlstm.LSTM(4, 5, 2, bidirectional=True, backend="triton")
            self.cell = tritonlstm.LSTMCell(10, 5, backend="triton")

        def forward(self, x, h, c):
            y, (h_n, c_n) = self.rnn(x, (h, c))
            a, b = self.cell(y[-1], (h_n[-1], c_n[-1]))
            return y, h_n, c_n, a, b

    torch.manual_seed(0)
    net = Net().eval()
    args = (torch.randn(3, 2, 4), torch.randn(4, 2, 5), torch.randn(4, 2, 5))
    path = tmp_path / "net.onnx"
    if dynamo:
        torch.onnx.export(net, args, dynamo=True).save(str(path))
    else:
        torch.onnx.export(net, args, str(path), dynamo=False)
    graph = onnx.load(str(path))
    ops = [n.op_type for n in graph.graph.node] + [n.op_type for f in graph.functions for n in f.node]
    assert "LSTM" in ops and not any("lstm_recurrence" in op for op in ops), ops
    session = ort.InferenceSession(str(path))
    outputs = session.run(None, {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)})
    with torch.no_grad():
        expected = net(*args)
    for got, want in zip(outputs, expected, strict=True):
        torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-5, atol=1e-6)


def test_jit_script_is_refused_with_a_clear_error():
    for m in (tritonlstm.LSTM(4, 5), tritonlstm.LSTMCell(4, 5)):
        with pytest.raises(RuntimeError, match="cannot be compiled by torch.jit.script.*trace"):
            torch.jit.script(m)


@pytest.mark.parametrize("hx", [
    pytest.param(lambda: (torch.zeros(1, 2, 5),), id="one-tensor-tuple"),
    pytest.param(lambda: torch.zeros(1, 2, 5), id="bare-tensor"),
    pytest.param(lambda: torch.zeros(2, 1, 2, 5), id="stacked-tensor"),
    pytest.param(lambda: [torch.zeros(1, 2, 5), None], id="none-in-pair"),
    pytest.param(lambda: 3, id="int"),
])
def test_malformed_hx_is_named(hx):
    """nn.LSTM fails on these with a bare IndexError (or worse); the drop-in names hx and what it got."""
    m = tritonlstm.LSTM(4, 5, backend="triton")
    with pytest.raises(TypeError, match=r"LSTM: hx must be a tuple \(h_0, c_0\) of two tensors, got"):
        m(torch.randn(3, 2, 4), hx())
    cell = tritonlstm.LSTMCell(4, 5, backend="triton")
    with pytest.raises(TypeError, match=r"LSTMCell: hx must be a tuple \(h_0, c_0\)"):
        cell(torch.randn(2, 4), hx())


@pytest.mark.parametrize("n", [1, 3])
def test_hx_of_the_wrong_length_raises_what_nn_lstm_raises(n):
    """nn.LSTM and nn.LSTMCell raise RuntimeError ("expects two hidden states") for these: code catching that
    must still catch ours."""
    for ref, ours, x, h in ((nn.LSTM(4, 5), tritonlstm.LSTM(4, 5, backend="triton"), torch.randn(3, 2, 4),
                             torch.zeros(1, 2, 5)),
                            (nn.LSTMCell(4, 5), tritonlstm.LSTMCell(4, 5, backend="triton"), torch.randn(2, 4),
                             torch.zeros(2, 5))):
        if n == 3 or isinstance(ref, nn.LSTMCell):  # nn.LSTM's (h,) is an IndexError
            with pytest.raises(RuntimeError, match="two hidden states"):
                ref(x, (h,) * n)
        with pytest.raises(RuntimeError, match="hx must be a tuple"):
            ours(x, (h,) * n)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("kw", [dict(), dict(num_layers=2), dict(num_layers=2, bidirectional=True, proj_size=3)],
                         ids=["1L", "2L-stack", "2L-bidir-proj"])
def test_cpu_autocast_runs_the_layer_in_the_autocast_dtype(dtype, kw):
    # A matmul inside the layer used to be autocast while the states were not: the kernel got mismatched
    # pointers. nn.LSTM under CPU autocast returns the autocast dtype (bf16; fp16 crashes in oneDNN here).
    ref = nn.LSTM(4, 6, **kw)
    ours = tritonlstm.LSTM(4, 6, backend="triton", **kw)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(5, 3, 4, requires_grad=True)
    with torch.autocast("cpu", dtype=dtype):
        y, (h, c) = ours(x)
    assert y.dtype == h.dtype == c.dtype == dtype
    expected = tritonlstm.LSTM(4, 6, backend="triton", **kw).to(dtype)
    expected.load_state_dict(ref.state_dict())
    for a, b in zip((y, h, c), (expected(x.detach().to(dtype))[0], *expected(x.detach().to(dtype))[1])):
        torch.testing.assert_close(a, b)
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and all(p.grad.dtype == torch.float32 for p in ours.parameters())
    with torch.autocast("cpu", dtype=dtype):  # a backward run inside the autocast region as well
        ours(x)[0].float().sum().backward()
    if dtype == torch.bfloat16 and not kw.get("proj_size"):
        with torch.autocast("cpu", dtype=dtype):
            y0, _ = ref(x)
        assert y0.dtype == dtype
        torch.testing.assert_close(y, y0, rtol=2e-2, atol=1e-2)


def test_cpu_autocast_cell_returns_float32_like_nn_lstmcell():
    ref = nn.LSTMCell(4, 6)
    ours = tritonlstm.LSTMCell(4, 6, backend="triton")
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h0, c0 = ref(x)
        h1, c1 = ours(x)
    assert h1.dtype == c1.dtype == h0.dtype == c0.dtype == torch.float32
    torch.testing.assert_close(h1, h0, rtol=2e-2, atol=1e-2)
    torch.testing.assert_close(c1, c0, rtol=2e-2, atol=1e-2)


def test_fused_lstm_under_cpu_autocast_runs_in_the_autocast_dtype():
    m = nn.LSTM(4, 6)
    w = (m.weight_ih_l0, m.weight_hh_l0, m.bias_ih_l0, m.bias_hh_l0)
    x = torch.randn(5, 3, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, (h, c) = tritonlstm.fused_lstm(x, *w, backend="triton")
    y_ref, (h_ref, c_ref) = tritonlstm.fused_lstm(x.bfloat16(), *(t.bfloat16() for t in w), backend="triton")
    assert y.dtype == h.dtype == c.dtype == torch.bfloat16
    torch.testing.assert_close((y, h, c), (y_ref, h_ref, c_ref))


@pytest.mark.parametrize("kw", [dict(), dict(num_layers=2), dict(bidirectional=True, proj_size=3)],
                         ids=["1L", "2L-stack", "bidir-proj"])
def test_torch_func_grad_and_per_sample_grads_match_nn_lstm(kw, monkeypatch):
    # torch.func.grad / vmap(grad) through the kernels (the custom op's own autograd fails under torch.func,
    # PyTorch #168393), against per-sample autograd through nn.LSTM.
    from torch.func import functional_call, grad, vmap

    ref = nn.LSTM(4, 6, **kw)
    ours = tritonlstm.LSTM(4, 6, backend="triton", **kw)
    ours.load_state_dict(ref.state_dict())
    xs = torch.randn(3, 5, 4)

    def loss(m, x):
        y, (h, c) = m(x[:, None])
        return (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum() + h.sum() + 0.5 * c.sum()

    expected = []
    for i in range(3):
        x = xs[i].clone().requires_grad_()
        expected.append(torch.autograd.grad(loss(ref, x), [x, *ref.parameters()]))
    launches = []
    for name in ("lstm_forward", "lstm_backward", "lstm_stack_forward", "lstm_stack_backward"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _n=name, _f=real, **k: launches.append(_n) or _f(*a, **k))
    params = {k: v.detach() for k, v in ours.named_parameters()}
    per_sample = vmap(grad(lambda p, x: loss(lambda inp: functional_call(ours, p, (inp,)), x)),
                      in_dims=(None, 0))(params, xs)
    dx = grad(lambda x: loss(ours, x))(xs[1])
    assert any("forward" in n for n in launches) and any("backward" in n for n in launches)
    torch.testing.assert_close(dx, expected[1][0], **TOL)
    for i in range(3):
        for (name, _), g in zip(ref.named_parameters(), expected[i][1:]):
            torch.testing.assert_close(per_sample[name][i], g, **TOL)


def test_forward_mode_ad_is_refused_clearly():
    import torch.autograd.forward_ad as fwAD

    m = tritonlstm.LSTM(2, 3, backend="triton")
    x = torch.randn(4, 1, 2)
    with pytest.raises(NotImplementedError, match="forward-mode AD"):
        torch.func.jvp(lambda x: m(x)[0], (x,), (torch.ones_like(x),))
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match="forward-mode AD"):
        m(fwAD.make_dual(x, torch.ones_like(x)))
    _, tangent = torch.func.jvp(lambda x: tritonlstm.fused_lstm(x, m.weight_ih_l0, m.weight_hh_l0, backend="torch")[0],
                                (x,), (torch.ones_like(x),))
    assert tangent.shape == (4, 1, 3)


def test_vmap_over_inputs_and_over_an_ensemble_of_weights():
    import copy

    from torch.func import functional_call, stack_module_state, vmap

    models = [tritonlstm.LSTM(4, 6, 2, backend="triton") for _ in range(3)]
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    x = torch.randn(5, 2, 4)
    ys = vmap(lambda p, b: functional_call(base, (p, b), (x,))[0])(params, buffers)
    for i, m in enumerate(models):
        torch.testing.assert_close(ys[i], m(x)[0], **TOL)
    xs = torch.randn(3, 5, 2, 4)
    ys = vmap(lambda x: models[0](x)[0])(xs)
    for i in range(3):
        torch.testing.assert_close(ys[i], models[0](xs[i])[0], **TOL)


@pytest.mark.parametrize("kw,packed", [({}, False), ({"bidirectional": True}, True), ({"proj_size": 3}, False),
                                       ({"proj_size": 3, "bidirectional": True}, True), ({"num_layers": 3}, True)],
                         ids=["single", "bidir-packed", "proj", "proj-bidir-packed", "stack-packed"])
@pytest.mark.parametrize("uses_state", [False, True], ids=["y-only", "y-h-c"])
def test_no_hx_is_zero_states_bit_for_bit(kw, packed, uses_state):
    """hx=None reaches the launches as None (zeros from their workspaces' memset, and no h_0 term in dW_hh); the
    same results, bit for bit, as zeros passed in. y-only: h_n and c_n unused, so their gradients reach the
    backward launch as None too. "stack": a unidirectional stack's wavefront launches."""
    ref, ours = pair(5, 8, **kw)
    P = 3 if kw.get("proj_size") else 8
    dirs = (2 if kw.get("bidirectional") else 1) * kw.get("num_layers", 1)
    x0 = torch.randn(6, 3, 5, generator=torch.Generator().manual_seed(3))
    res = []
    for hx in (None, (torch.zeros(dirs, 3, P), torch.zeros(dirs, 3, 8))):
        ours.zero_grad()
        x = x0.clone().requires_grad_()
        y, (h, c) = ours(pack_padded_sequence(x, [6, 2, 4], enforce_sorted=False) if packed else x, hx)
        y = y.data if packed else y
        (y.square().sum() + (h.sum() + 0.5 * c.sum() if uses_state else 0)).backward()
        res.append([y, h, c, x.grad, *(p.grad for p in ours.parameters())])
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    if not packed:  # (and still nn.LSTM's)
        y, (h, c) = ref(x0)
        for a, b in zip(res[0][:3], (y, h, c)):
            torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("layers", [1, 2], ids=["layer", "stack"])
def test_a_training_step_fills_one_zeroed_workspace_per_launch(monkeypatch, layers):
    """A training step without hx (one layer, or a stack's wavefronts) issues one zero fill per launch (the barrier
    counters, the zero states, the carried dc, the unused outputs' gradients and a layer's bias sums' counters share
    it) and converts no state's
    dtype: on a GPU each fill or conversion is a launch, ~25-60 us of a host-bound step's host time (perf/NOTES.md
    v0.70). The kernels themselves are stubbed out: this counts the ATen ops around them."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from tritonlstm.kernels import reduce

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view:
                self.names.append(func.__name__)
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(kernels, "_run", lambda *a, **k: None)
    monkeypatch.setattr(reduce, "launch_or_compile", lambda *a, **k: True)  # (its host path stays)
    _, ours = pair(5, 8, num_layers=layers)
    x = torch.randn(25, 3, 5, requires_grad=True)  # (75 rows: the bias sums in chunks, which need counters)
    ours(x)[0].sum().backward()  # (a first call makes the barrier's error flag)
    with Ops() as ops:
        y, _ = ours(x)
    forward = list(ops.names)
    with Ops() as ops:
        y.backward(torch.ones_like(y))
    backward = [n for n in ops.names if n != "ones_like.default"]
    fills = ("zeros.default", "new_zeros.default", "zeros_like.default", "fill_.Scalar", "zero_.default")
    assert [n for n in forward if n in fills] == ["zeros.default"], forward
    # A layer's bias sums take their counters from its recurrence's memset (v0.74; with BIAS_IN_KERNEL the launch
    # sums them itself, v0.73); a stack's kernels.reduce launch has its own.
    assert [n for n in backward if n in fills] == ["zeros.default"] * (1 if layers == 1 else 2), backward
    # No state converted, and the bias gradients neither cast nor copied (kernels.reduce writes both).
    assert "_to_copy.default" not in forward + backward and "copy_.default" not in backward, (forward, backward)
    if layers == 1:  # dW_hh (no first-step product with a zero h0), dW_ih, dx
        assert backward.count("mm.default") + backward.count("addmm.default") == 3, backward


def test_zeroed_workspaces_are_separate_aligned_and_zero():
    parts = [((7,), torch.int32), ((2, 3, 5), torch.bfloat16), ((1,), torch.float32), ((2, 3, 5), torch.float32),
             ((0,), torch.int32)]
    out = kernels._zeroed(torch.device("cpu"), *parts)
    spans = []
    for t, (shape, dtype) in zip(out, parts):
        assert t.shape == shape and t.dtype == dtype and t.is_contiguous()
        assert t.numel() == 0 or ((t.data_ptr() - out[0].data_ptr()) % 128 == 0 and t.data_ptr() % 16 == 0)
        assert not t.any()
        if t.numel():
            spans.append((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()))
        t.fill_(1)
    for (a0, a1), (b0, b1) in zip(spans, spans[1:]):
        assert a1 <= b0
    assert all((t == 1).all() for t in out)
    assert kernels._zeroed(torch.device("cpu"), ((3, 4), torch.float16))[0].shape == (3, 4)
