"""Where a training step's peak memory goes, on a GPU (issue 5.5, perf/NOTES.md v0.20): for each cell, the
CUDA allocator's peak over one forward + backward of tritonlstm.LSTM (what the bench reports), the peak of the
tensors that ATen ops returned during it (recorded by a TorchDispatchMode: every tensor the step made, kernels'
buffers included), and the largest of those alive at that peak. Allocator peak minus tensor peak is memory no
ATen op returned: library workspaces (cuBLAS, cuBLASLt), the caching allocator's rounding. Run 4 found a part of
the peak that does not grow with T (26-140 MB, growing with H and B, the same in fp16 and fp32) on top of the
counted bytes per T*B*H; this says whose it is.

    python perf/memory_probe.py [--cells float16:512:16:256,float16:512:256:64] [--json FILE]

A cell is dtype:H:B:T (one layer, input size H).
"""

from __future__ import annotations

import argparse
import sys
import weakref

from tritonlstm.bench import write_rows_json

DEFAULT_CELLS = ("float16:512:16:256,float16:512:256:64,float16:512:256:256,float32:512:256:64,"
                 "float16:1024:16:256,bfloat16:512:16:256")


def _recorder():
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class LiveTensors(TorchDispatchMode):
        """Bytes of the storages that ATen ops returned and that are still alive; the peak and what made it."""

        def __init__(self, before: set, device_type: str = "cuda"):
            super().__init__()
            self.before, self.device_type = before, device_type
            self.live, self.bytes, self.peak, self.at_peak = {}, 0, 0, {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if not isinstance(t, torch.Tensor) or t.device.type != self.device_type:
                    continue
                storage = t.untyped_storage()
                ptr = storage.data_ptr()
                if ptr in self.live or ptr in self.before or storage.nbytes() == 0:
                    continue
                self.live[ptr] = (str(func), tuple(t.shape), str(t.dtype).replace("torch.", ""), storage.nbytes())
                self.bytes += storage.nbytes()
                weakref.finalize(t if t._base is None else t._base, self._free, ptr)
                if self.bytes > self.peak:
                    self.peak, self.at_peak = self.bytes, dict(self.live)
            return out

        def _free(self, ptr):
            entry = self.live.pop(ptr, None)
            if entry is not None:
                self.bytes -= entry[3]

    return LiveTensors


def probe(dtype_name: str, hidden: int, batch: int, seq: int) -> dict:
    import torch

    from tritonlstm import LSTM

    dtype = getattr(torch, dtype_name)
    model = LSTM(hidden, hidden, backend="triton").to("cuda", dtype)
    x = torch.randn(seq, batch, hidden, device="cuda", dtype=dtype, requires_grad=True)
    y, _ = model(x)  # compile and warm up, as the bench does before measuring
    y.backward(torch.ones_like(y))
    del y
    x.grad = None
    for p in model.parameters():
        p.grad = None
    torch.cuda.synchronize()
    before = {t.untyped_storage().data_ptr() for t in (x, *model.parameters())}
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with _recorder()(before) as rec:
        y, _ = model(x)
        y.backward(torch.ones_like(y))
        del y
    torch.cuda.synchronize()
    mb = 2 ** 20
    tbh = seq * batch * hidden
    top = sorted(rec.at_peak.values(), key=lambda e: -e[3])[:10]
    return {"dtype": dtype_name, "hidden": hidden, "batch": batch, "seq": seq,
            "allocator_peak_mb": (torch.cuda.max_memory_allocated() - base) / mb, "tensor_peak_mb": rec.peak / mb,
            "tensor_peak_per_tbh": rec.peak / tbh,
            "at_peak": [{"op": op, "shape": list(shape), "dtype": dt, "mb": n / mb} for op, shape, dt, n in top]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", default=DEFAULT_CELLS, help="comma-separated dtype:H:B:T")
    ap.add_argument("--json", help="write the rows here")
    a = ap.parse_args(argv)
    try:
        cells = [(d, int(h), int(b), int(t)) for d, h, b, t in (c.split(":") for c in a.cells.split(",") if c)]
    except ValueError:
        ap.error(f"--cells: expected dtype:H:B:T,..., got {a.cells!r}")
    import torch

    if not torch.cuda.is_available():
        print("perf/memory_probe.py: no CUDA device, nothing to measure.")
        return 0
    rows = []
    for cell in cells:
        r = probe(*cell)
        rows.append(r)
        print(f"{r['dtype']:9} H={r['hidden']:<5} B={r['batch']:<4} T={r['seq']:<4} allocator peak "
              f"{r['allocator_peak_mb']:8.1f} MB, tensors {r['tensor_peak_mb']:8.1f} MB "
              f"({r['tensor_peak_per_tbh']:.1f} B per T*B*H), not from ATen ops "
              f"{r['allocator_peak_mb'] - r['tensor_peak_mb']:7.1f} MB", flush=True)
        for e in r["at_peak"]:
            print(f"      {e['mb']:8.1f} MB  {e['op']:34} {e['shape']} {e['dtype']}")
        if a.json:
            write_rows_json(a.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
