"""PyTorch's own LSTM / LSTMCell module-test inputs (torch.testing._internal.common_modules.module_db), run through
tritonlstm's modules on the Triton kernels and compared with torch.nn, outputs and parameter gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils._pytree import tree_leaves

import tritonlstm

common_modules = pytest.importorskip("torch.testing._internal.common_modules")

INFOS = [m for m in common_modules.module_db if m.module_cls in (nn.LSTM, nn.LSTMCell)]


def _samples():
    for info in INFOS:
        for training in (True, False):
            samples = info.module_inputs_func(info, device="cpu", dtype=torch.float32, requires_grad=True,
                                              training=training)
            for i, s in enumerate(samples):
                kw = s.constructor_input.kwargs
                ident = f"{info.module_cls.__name__}-{'train' if training else 'eval'}-{i}-" + \
                    "-".join(f"{k}={v}" for k, v in kw.items() if k not in ("input_size", "hidden_size"))
                yield pytest.param(info.module_cls, s, training, id=ident)


@pytest.mark.parametrize("cls,sample,training", list(_samples()))
def test_module_db_inputs_match_torch(cls, sample, training):
    ours_cls = tritonlstm.LSTM if cls is nn.LSTM else tritonlstm.LSTMCell
    ref = cls(*sample.constructor_input.args, **sample.constructor_input.kwargs)
    ours = ours_cls(*sample.constructor_input.args, backend="triton", **sample.constructor_input.kwargs)
    ours.load_state_dict(ref.state_dict())
    ref.train(training)
    ours.train(training)
    args, kwargs = sample.forward_input.args, sample.forward_input.kwargs
    out_ref = ref(*copy.deepcopy(args), **kwargs)
    out = ours(*copy.deepcopy(args), **kwargs)
    flat_ref = torch.cat([t.reshape(-1) for t in tree_leaves(out_ref)])
    flat = torch.cat([t.reshape(-1) for t in tree_leaves(out)])
    assert [t.shape for t in tree_leaves(out)] == [t.shape for t in tree_leaves(out_ref)]
    torch.testing.assert_close(flat, flat_ref, rtol=1e-5, atol=1e-6)
    (flat_ref * torch.arange(flat_ref.numel())).sum().backward()
    (flat * torch.arange(flat.numel())).sum().backward()
    for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
        scale = b.grad.abs().max().item()
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5 * max(scale, 1.0),
                                   msg=lambda m, n=name: f"d{n}: {m}")


def _error_samples():
    for info in INFOS:
        for dtype in (torch.float32, torch.float64):
            for i, e in enumerate(info.module_error_inputs_func(info, device="cpu", dtype=dtype, requires_grad=False,
                                                                training=True)):
                yield pytest.param(info.module_cls, e, id=f"{info.module_cls.__name__}-{dtype}-{i}")


@pytest.mark.parametrize("cls,err", list(_error_samples()))
def test_module_db_error_inputs_raise_as_torch(cls, err):
    """PyTorch's own error inputs for nn.LSTM / nn.LSTMCell: the same exception type and message."""
    import re

    ours_cls = tritonlstm.LSTM if cls is nn.LSTM else tritonlstm.LSTMCell
    sample = err.module_error_input
    with pytest.raises(err.error_type) as info:
        module = ours_cls(*sample.constructor_input.args, backend="auto", **sample.constructor_input.kwargs)
        module(*sample.forward_input.args, **sample.forward_input.kwargs)
    assert re.search(err.error_regex, str(info.value)), str(info.value)
