"""Self-check of the Triton kernels against a float64 PyTorch reference: forward and every gradient."""

from __future__ import annotations

import os
import platform

import torch

from tritonlstm.functional import fused_lstm, interpreter_active
from tritonlstm.naive import lstm_layer_reference

# Relative-error limits (||out - ref|| / ||ref||); fp32 may use TF32 in the recurrent matmul on a GPU.
TOLERANCE = {torch.float32: 2e-3, torch.float16: 5e-3, torch.bfloat16: 3e-2}
_NAMES = ("x", "weight_ih", "weight_hh", "bias_ih", "bias_hh", "h0", "c0")


def environment() -> dict[str, str]:
    import triton

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
            "gpu": gpu, "cudnn": str(torch.backends.cudnn.version()) if torch.cuda.is_available() else "none",
            "kernels run on": "GPU" if torch.cuda.is_available() else
            ("CPU interpreter (TRITON_INTERPRET=1)" if interpreter_active() else "unavailable")}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return (a - b).norm().item() / max(b.norm().item(), 1e-2 * b.numel() ** 0.5)


def check_case(T: int, B: int, I: int, H: int, dtype: torch.dtype, device: str, reverse: bool) -> dict[str, float]:
    g = torch.Generator().manual_seed(T * 1000 + B * 10 + H)
    k = H ** -0.5
    raw = [torch.randn(T, B, I, generator=g), torch.rand(4 * H, I, generator=g) * 2 * k - k,
           torch.rand(4 * H, H, generator=g) * 2 * k - k, torch.rand(4 * H, generator=g) * 2 * k - k,
           torch.rand(4 * H, generator=g) * 2 * k - k, torch.randn(B, H, generator=g) * 0.5,
           torch.randn(B, H, generator=g) * 0.5]
    ins = [t.to(device=device, dtype=dtype).requires_grad_() for t in raw]
    ref = [t.detach().double().requires_grad_() for t in ins]
    y, (hn, cn) = fused_lstm(*ins, reverse=reverse, backend="triton")
    yr, (hr, cr) = lstm_layer_reference(*ref, reverse=reverse)
    w = [torch.randn(t.shape, generator=g).to(device=device, dtype=torch.float64) for t in (yr, hr, cr)]
    sum((a.double() * b).sum() for a, b in zip((y, hn, cn), w)).backward()
    sum((a * b).sum() for a, b in zip((yr, hr, cr), w)).backward()
    errors = {"y": _rel(y, yr), "h_n": _rel(hn, hr), "c_n": _rel(cn, cr)}
    errors.update({f"d{n}": _rel(a.grad, b.grad) for n, a, b in zip(_NAMES, ins, ref)})
    return errors


def run(verbose: bool = True) -> bool:
    """Prints the environment and the measured errors; True when every case is within tolerance."""
    if not torch.cuda.is_available():
        # Before the kernels load (they import triton): without a GPU they run on Triton's CPU interpreter.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    env = environment()
    if verbose:
        for k, v in env.items():
            print(f"{k:>15}: {v}")
    on_gpu = torch.cuda.is_available()
    if not on_gpu and not interpreter_active():
        print("self-check: no GPU and the interpreter is off; nothing to check")
        return False
    device = "cuda" if on_gpu else "cpu"
    if on_gpu:
        shapes = [(64, 16, 256, 256), (32, 3, 100, 1000), (16, 64, 512, 512)]
        dtypes = [torch.float32, torch.float16, torch.bfloat16]
    else:  # bf16 too: the package corrects triton 3.6's interpreter for it (kernels/interpreter.py)
        shapes = [(8, 3, 10, 24), (5, 17, 6, 33)]
        dtypes = [torch.float32, torch.float16, torch.bfloat16]
    ok = True
    for dtype in dtypes:
        for T, B, I, H in shapes:
            for reverse in (False, True):
                errs = check_case(T, B, I, H, dtype, device, reverse)
                worst_name = max(errs, key=errs.get)
                good = all(e <= TOLERANCE[dtype] for e in errs.values())
                ok &= good
                if verbose:
                    print(f"{'ok  ' if good else 'FAIL'} {str(dtype).split('.')[-1]:>8} T={T:<3} B={B:<3} I={I:<4} "
                          f"H={H:<4} {'reverse' if reverse else 'forward'}: max rel err {errs[worst_name]:.2e} "
                          f"({worst_name}; limit {TOLERANCE[dtype]:.0e})")
    if verbose:
        print("self-check passed" if ok else "self-check FAILED")
    return ok


def main(argv: list[str] | None = None) -> int:
    """`python -m tritonlstm` (and `python -m tritonlstm.selfcheck`): exit 0 when every case is within tolerance."""
    import argparse

    argparse.ArgumentParser(
        prog="python -m tritonlstm",
        description="Print the environment and check the Triton kernels against a float64 reference: forward and "
                    "every gradient, float32 / float16 / bfloat16, forward and reverse. On a GPU the kernels run "
                    "compiled; without one, on Triton's CPU interpreter (small shapes). Exit status 1 on a failure.",
    ).parse_args(argv)
    return 0 if run() else 1


if __name__ == "__main__":
    raise SystemExit(main())
