"""Every named variant of the recurrence kernels as a persistent launch of several programs running at once
(tests/concurrency.py), over more shapes than CI's tests/test_concurrent_programs.py: single layers (lengths,
reverse) against the float64 reference, two-layer stacks with dropout against the same stack run stepwise.
Outside CI: about an hour on a 2-core machine as two processes (a stack of 100 programs takes up to 13 minutes).
Prints one line per case; a failure is "BAD" (errors over tolerance) or "ERR" (an exception).

    python tests/sweep_concurrent.py [part parts]     # e.g. "0 2" and "1 2" in two processes
    SWEEP_ONLY=half python tests/sweep_concurrent.py   # the variants whose names hold "half"
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
import warnings

os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
warnings.filterwarnings("ignore")

import torch  # noqa: E402

from concurrency import concurrent_programs  # noqa: E402
from helpers import NAMES, RESOLUTION, RESOLUTION_GPU, leaf, loss_of, make_problem, reference, rel_err  # noqa: E402
from tritonlstm import configs, fused_lstm, use_config  # noqa: E402
from tritonlstm.functional import lstm_stack  # noqa: E402

SHAPES = ((48, 3), (64, 20), (80, 70), (33, 17))  # (H, B): partial tiles, several batch groups, odd H
TIME_LIMIT = 600.0  # a launch of 50 programs takes minutes here


def cases():
    out = []
    for H, B in SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            for kind, fwd, bwd, layers in (("layer", "fwd", "bwd", 1), ("stack", "stack", "stack_bwd", 2)):
                f = configs.named_variants(fwd, H, B, dtype, 132, layers=layers)
                b = configs.named_variants(bwd, H, B, dtype, 132, layers=layers)
                for name in sorted(set(f) | set(b)):
                    out.append((kind, H, B, dtype, name, f.get(name, f["unsplit"]), b.get(name, b["unsplit"])))
    return out


def layer_errors(i, H, B, dtype, fwd, bwd):
    problem = make_problem(5, B, H - 1, H, dtype)
    lengths = torch.randint(1, 6, (B,))
    lengths[0] = 5
    reverse = bool(i % 2)
    p_ref, out_ref = reference(problem, reverse=reverse, lengths=lengths)
    weights = tuple(torch.randn_like(t) for t in out_ref)
    loss_of(*out_ref, weights).backward()
    p = leaf(problem)
    with concurrent_programs(i, time_limit=TIME_LIMIT), use_config(fwd, "fwd"), use_config(bwd, "bwd"):
        y, (hn, cn) = fused_lstm(*(p[n] for n in NAMES), reverse=reverse, lengths=lengths, backend="triton")
        loss_of(y, hn, cn, weights).backward()
    errors = {name: rel_err(a, r) for name, a, r in zip(("y", "h_n", "c_n"), (y, hn, cn), out_ref)}
    return {**errors, **{f"d{n}": rel_err(p[n].grad, p_ref[n].grad) for n in NAMES}}


def stack_errors(i, H, B, dtype, fwd, bwd):
    L, T = 2, 4
    layers = [make_problem(T, B, H, H, dtype) for _ in range(L)]
    x = layers[0]["x"].requires_grad_()
    weights = [tuple(pr[n].requires_grad_() for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")) for pr in layers]
    scale = ((torch.rand(L - 1, T, B, H) > 0.3).float() / 0.7).to(dtype)

    def run(f, b):
        with concurrent_programs(i, time_limit=TIME_LIMIT), use_config(f, "stack"), use_config(b, "stack_bwd"):
            y, (hn, cn) = lstm_stack(x, weights, dropout_scale=scale, backend="triton")
            loss = y.float().sin().sum() + hn.float().sum() + cn.float().sum()
            return (y, hn, cn, *torch.autograd.grad(loss, [x, *(t for w in weights for t in w)]))

    stepwise = run(*(dataclasses.replace(c, persistent=False, exchange="barrier") for c in (fwd, bwd)))
    return {f"out{j}": rel_err(a, r) for j, (a, r) in enumerate(zip(run(fwd, bwd), stepwise))}


def main(part: int = 0, parts: int = 1) -> int:
    bad = 0
    only = os.environ.get("SWEEP_ONLY", "")
    for i, (kind, H, B, dtype, name, fwd, bwd) in enumerate(cases()):
        if i % parts != part or only not in name:
            continue
        torch.manual_seed(i)
        start = time.time()
        # half_w's float16 operands are as precise as TF32's, not float32's.
        tol = 2 * (RESOLUTION_GPU if fwd.half_w or bwd.half_w else RESOLUTION)[dtype]
        try:
            errors = (layer_errors if kind == "layer" else stack_errors)(i, H, B, dtype, fwd, bwd)
            over = {k: v for k, v in errors.items() if not v <= tol}
            status = f"BAD {over}" if over else "OK"
        except Exception as e:  # noqa: BLE001 - reported, the sweep goes on
            status = f"ERR {type(e).__name__}: {str(e)[:300]}"
        bad += status != "OK"
        print(f"{kind} H={H} B={B} {str(dtype)[6:]} {name}: {status} ({time.time() - start:.1f} s)", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(*map(int, sys.argv[1:3])))
