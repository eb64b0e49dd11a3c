"""Plain-PyTorch LSTM layer: backend="torch" and the reference the tests compare the kernels with."""

from __future__ import annotations

import torch


def lstm_layer_reference(x: torch.Tensor, weight_ih: torch.Tensor, weight_hh: torch.Tensor,
                         bias_ih: torch.Tensor | None, bias_hh: torch.Tensor | None,
                         h0: torch.Tensor, c0: torch.Tensor, reverse: bool = False,
                         lengths: torch.Tensor | None = None, weight_hr: torch.Tensor | None = None):
    """One layer, one direction, step by step, differentiable by autograd.

    x [T, B, I], h0/c0 [B, H], lengths [B] (int, each in 1..T) or None. Row b runs its first lengths[b] steps
    (backwards from lengths[b] - 1 when reverse); outputs past a row's length are zero. weight_hr [P, H]
    projects h_t = W_hr (o * tanh(c_t)) (nn.LSTM's proj_size). Returns y [T, B, H or P], (h_n, c_n)."""
    T, B, _ = x.shape
    gx = x @ weight_ih.t()
    if bias_ih is not None:
        gx = gx + bias_ih
    if bias_hh is not None:
        gx = gx + bias_hh
    lengths = torch.full((B,), T, dtype=torch.long) if lengths is None else lengths.to("cpu", torch.long)
    rows = torch.arange(B, device=x.device)
    h, c = h0, c0
    outs = []
    for s in range(T):
        live = (s < lengths).to(x.device)
        t = (lengths - 1 - s).clamp(min=0).to(x.device) if reverse else torch.full((B,), s, device=x.device)
        gates = gx[t, rows] + h @ weight_hh.t()
        i, f, g, o = gates.chunk(4, dim=1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_new = torch.sigmoid(o) * torch.tanh(c_new)
        if weight_hr is not None:
            h_new = h_new @ weight_hr.t()
        m = live[:, None]
        c = torch.where(m, c_new, c)
        h = torch.where(m, h_new, h)
        outs.append((t, torch.where(m, h_new, torch.zeros_like(h_new))))
    # Scatter each step's rows back to their time positions (reverse rows visit t out of order).
    y = x.new_zeros(T, B, h0.shape[1])
    for s, (t, hs) in enumerate(outs):
        live = (s < lengths).to(x.device)
        y = y.index_put((t[live], rows[live]), hs[live])
    return y, (h, c)
