"""Where a training step's peak memory goes, on a GPU (issue 5.5, perf/NOTES.md v0.20, session 10): for each
cell, the CUDA allocator's peak over one forward + backward of tritonlstm.LSTM (what the bench reports) and the
forward's alone, and the blocks alive at the step's peak from the caching allocator's own trace
(torch.cuda.memory._record_memory_history: every block, ATen tensors, library workspaces and blocks made in the
autograd engine's device thread alike, each with the Python line and the C++ frames that allocated it).

Run 5 found ~30-125 MB per training step beyond the counted tensors (~17 bytes per T*B*H in 16-bit), none at
B = 1, ~32 MB x H / 256 at B = 16, ~125 MB at B = 64, the same in fp16 and fp32. The GPU path's Python, emulated
on the CPU with the shipped H100 configs and the launches stubbed, allocates only the counted tensors (17.1 bytes
per T*B*H at fp16 H = 256 B = 16, where the GPU peaked at 48.6), so the rest comes from below Python: a cuBLAS /
cuBLASLt workspace of the GEMMs, or allocations of the backward's device thread. device_check.sh runs this twice,
the second time with cuBLAS's workspaces off (CUBLAS_WORKSPACE_CONFIG=:0:0, CUBLASLT_WORKSPACE_SIZE=0).

    python perf/memory_probe.py [--cells float16:512:16:256,float16:512:256:64] [--json FILE]

A cell is dtype:H:B:T (one layer, input size H). (The TorchDispatchMode recorder below sees only the calling
thread's ATen ops: on a GPU the backward runs in the autograd engine's device thread, which it misses; it serves
the CPU check in tests/test_bench.py.)
"""

from __future__ import annotations

import argparse
import sys
import weakref

from tritonlstm.bench import write_rows_json

DEFAULT_CELLS = ("float16:256:1:256,float16:256:16:256,float16:512:16:256,float32:256:16:256,float16:256:64:256,"
                 "float16:1024:64:256,float16:512:256:64")


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


def _where(frames: list[dict]) -> str:
    """A block's origin: the innermost frame in tritonlstm (or the probe), plus any C++ frame naming a BLAS
    library or a workspace."""
    py = next((f"{f['filename'].rsplit('/', 1)[-1]}:{f['line']} {f['name']}" for f in frames
               if "tritonlstm" in f["filename"] or "kernels/" in f["filename"] or "memory_probe" in f["filename"]),
              "?")
    native = [f["name"] for f in frames if any(k in f["name"].lower() for k in ("blas", "workspace", "cudnn"))]
    return py + (f" [{native[0][:80]}]" if native else "")


def peak_from_trace(events: list[dict]) -> tuple[int, list[tuple[int, str]]]:
    """(peak bytes, [(bytes, origin)] of the blocks alive at the peak, largest first) from one device's caching
    allocator trace (torch.cuda.memory._snapshot()["device_traces"][device]), counted from where the trace
    starts: 'alloc' adds a block, 'free_completed' removes it (the allocator's allocated-bytes statistic moves
    at those two events)."""
    live, total, peak, at_peak = {}, 0, 0, {}
    for e in events:
        if e["action"] == "alloc":
            live[e["addr"]] = (e["size"], _where(e.get("frames", [])))
            total += e["size"]
            if total > peak:
                peak, at_peak = total, dict(live)
        elif e["action"] == "free_completed" and e["addr"] in live:
            total -= live.pop(e["addr"])[0]
    return peak, sorted(at_peak.values(), key=lambda b: -b[0])


def probe(dtype_name: str, hidden: int, batch: int, seq: int) -> dict:
    import torch

    from tritonlstm import LSTM

    dtype = getattr(torch, dtype_name)
    model = LSTM(hidden, hidden, backend="triton").to("cuda", dtype)
    x = torch.randn(seq, batch, hidden, device="cuda", dtype=dtype, requires_grad=True)

    def clear():
        x.grad = None
        for p in model.parameters():
            p.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()

    y, _ = model(x)  # compile and warm up, as the bench does before measuring
    y.backward(torch.ones_like(y))
    del y
    base = clear()
    with torch.no_grad():
        model(x)
    torch.cuda.synchronize()
    fwd_peak = torch.cuda.max_memory_allocated() - base
    base = clear()
    torch.cuda.memory._record_memory_history(max_entries=100000)
    y, _ = model(x)
    y.backward(torch.ones_like(y))
    del y
    torch.cuda.synchronize()
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    step_peak = torch.cuda.max_memory_allocated() - base
    trace_peak, blocks = peak_from_trace(snapshot["device_traces"][torch.cuda.current_device()])
    mb = 2 ** 20
    return {"dtype": dtype_name, "hidden": hidden, "batch": batch, "seq": seq,
            "allocator_peak_mb": step_peak / mb, "forward_peak_mb": fwd_peak / mb, "trace_peak_mb": trace_peak / mb,
            "per_tbh": step_peak / (seq * batch * hidden),
            "at_peak": [{"mb": n / mb, "where": where} for n, where in blocks[:12]]}


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
        print(f"{r['dtype']:9} H={r['hidden']:<5} B={r['batch']:<4} T={r['seq']:<4} training step peak "
              f"{r['allocator_peak_mb']:8.1f} MB ({r['per_tbh']:.1f} B per T*B*H; the trace's "
              f"{r['trace_peak_mb']:.1f}), inference forward {r['forward_peak_mb']:8.1f} MB; alive at the peak:",
              flush=True)
        for e in r["at_peak"]:
            print(f"      {e['mb']:8.1f} MB  {e['where']}")
        if a.json:
            write_rows_json(a.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
