"""The float32 GEMMs of a layer, on a GPU (perf/NOTES.md v0.21): kernels.matmul in TF32 against torch.mm in
full float32 (what the layers ran before) and torch.mm in TF32 (cuBLAS, the matmul precision set for the
probe only), at the shapes of the bench's float32 cells: the input projection x @ W_ih^T, the input gradient
dG @ W_ih and the weight gradient dG^T @ x. Each result is checked against torch's float32 product first. The
first two also on row-scaled float16 operands (kernels.matmul half=True, v0.43; the input gradient's dG converted
in row chunks, as the layer does), and each on cuBLAS's float16 GEMM with a float32 output (operands converted
beforehand, untimed; where this torch has torch.mm's out_dtype).

    python perf/gemm_probe.py [--hidden 512,1024] [--batch 64,256] [--seq 256] [--restage-chunks 16,2]
                              [--tiles 128x256x32w8s4,...] [--json FILE]

Also the host's time per kernels.matmul TF32 call (launches queued without a sync): where it reaches the GPU's,
the product is launch-bound (run 7: dG^T @ x restaged in 16 chunks of 3 launches each).
"""

from __future__ import annotations

import argparse
import sys
import time

from tritonlstm.bench import write_rows_json


def shapes(hidden: int, rows: int):
    """(name, a, b) factories for one layer's GEMMs: rows = T * B, input size = hidden."""
    import torch

    def make():
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(rows, hidden, device="cuda", generator=g)
        w = torch.randn(4 * hidden, hidden, device="cuda", generator=g) * hidden ** -0.5
        dg = torch.randn(rows, 4 * hidden, device="cuda", generator=g)
        return {"x @ W_ih^T": (x, w.t()), "dG @ W_ih": (dg, w), "dG^T @ x": (dg.t(), x)}

    return make


def measure(hidden: int, rows: int) -> list[dict]:
    import torch
    from triton.testing import do_bench

    from tritonlstm.kernels.matmul import matmul

    out = []
    for name, (a, b) in shapes(hidden, rows)().items():
        flops = 2 * a.shape[0] * a.shape[1] * b.shape[1]
        ref = a @ b
        ours = matmul(a, b)
        err = ((ours - ref).norm() / ref.norm()).item()
        row = {"gemm": name, "hidden": hidden, "rows": rows, "m": a.shape[0], "k": a.shape[1], "n": b.shape[1],
               "rel_err_vs_fp32": err}
        row["triton_tf32_ms"] = do_bench(lambda: matmul(a, b), warmup=10, rep=50, return_mode="median")
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(20):
            matmul(a, b)
        row["host_ms"] = (time.perf_counter() - start) * 1e3 / 20
        torch.cuda.synchronize()
        row["torch_fp32_ms"] = do_bench(lambda: a @ b, warmup=10, rep=50, return_mode="median")
        # This process's own setting, for the probe only (the new API where this torch has it).
        flag = "fp32_precision" if hasattr(torch.backends.cuda.matmul, "fp32_precision") else "allow_tf32"
        previous = getattr(torch.backends.cuda.matmul, flag)
        setattr(torch.backends.cuda.matmul, flag, "tf32" if flag == "fp32_precision" else True)
        try:
            row["torch_tf32_ms"] = do_bench(lambda: a @ b, warmup=10, rep=50, return_mode="median")
        finally:
            setattr(torch.backends.cuda.matmul, flag, previous)
        # cuBLAS on float16 operands to a float32 output (torch.mm's out_dtype, torch >= 2.8), the operands converted
        # beforehand (untimed): the GEMM's own rate, for the lever in perf/NOTES.md (end of session 20).
        a16, b16 = a.half(), b.half()
        try:
            cublas16 = torch.mm(a16, b16, out_dtype=torch.float32)
        except (TypeError, RuntimeError):
            cublas16 = None
        if cublas16 is not None:
            row["rel_err_cublas_f16_vs_fp32"] = ((cublas16 - ref).norm() / ref.norm()).item()
            row["cublas_f16_ms"] = do_bench(lambda: torch.mm(a16, b16, out_dtype=torch.float32), warmup=10, rep=50,
                                            return_mode="median")

        def timed(key: str, err_key: str, product) -> None:
            """row[key_ms]: product's median time; row[err_key]: its error against torch's float32 product."""
            row[err_key] = ((product() - ref).norm() / ref.norm()).item()
            row[f"{key}_ms"] = do_bench(product, warmup=10, rep=50, return_mode="median")

        if name != "dG^T @ x":
            chunk = a.shape[0] if name == "x @ W_ih^T" else None  # as _TF32Projection converts them
            timed("triton_half", "rel_err_half_vs_fp32", lambda: matmul(a, b, half=True, row_chunk=chunk))
            if name == "dG @ W_ih":  # v0.62: the same row-scaled operands, the product on cuBLAS, scaled back after
                timed("cublas_half", "rel_err_cublas_half_vs_fp32", lambda: matmul(a, b, half=True, cublas=True))
        else:  # v0.61: column-scaled float16 operands on cuBLAS, the conversions included
            from tritonlstm.kernels import matmul as mm

            previous, mm.HALF_GRADS = mm.HALF_GRADS, True
            try:
                timed("cublas_half", "rel_err_cublas_half_vs_fp32", lambda: matmul(a, b))
            finally:
                mm.HALF_GRADS = previous
        for k in ("triton_tf32", "torch_fp32", "torch_tf32", "triton_half", "cublas_f16", "cublas_half"):
            if f"{k}_ms" in row:
                row[f"{k}_tflops"] = flops / row[f"{k}_ms"] / 1e9
        out.append(row)
    return out


def mode_tag(chunks: int, tiles: dict | None) -> str:
    """"/16" (MN-major operands restaged in 16 chunks), then the tiles where set."""
    tag = f"/{chunks}"
    if tiles is not None:
        tag += f" {tiles['BM']}x{tiles['BN']}x{tiles['BK']}w{tiles['num_warps']}s{tiles['num_stages']}"
    return tag


def parse_tiles(text: str) -> dict:
    """"128x256x32w8s4" -> dict(BM=128, BN=256, BK=32, num_warps=8, num_stages=4)."""
    import re

    m = re.fullmatch(r"(\d+)x(\d+)x(\d+)w(\d+)s(\d+)", text)
    if m is None:
        raise SystemExit(f"perf/gemm_probe.py: --tiles wants BMxBNxBKwWARPSsSTAGES, e.g. 128x256x32w8s4, got {text!r}")
    bm, bn, bk, w, st = map(int, m.groups())
    return dict(BM=bm, BN=bn, BK=bk, num_warps=w, num_stages=st)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", default="512,1024")
    ap.add_argument("--batch", default="64,256")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--restage-chunks", default="", help="values of kernels.matmul.RESTAGE_CHUNKS to run, e.g. 16,2 "
                    "(default: the module's)")
    ap.add_argument("--tiles", default="", help="kernels.matmul tile shapes to run, BMxBNxBKwWARPSsSTAGES, e.g. "
                    "128x128x32w8s3,128x256x32w8s4 (default: the module's choice per shape)")
    ap.add_argument("--json", help="write the rows here")
    a = ap.parse_args(argv)
    import torch

    from tritonlstm.kernels import matmul as mm

    if not torch.cuda.is_available():
        print("perf/gemm_probe.py: no CUDA device, nothing to time.")
        return 0
    rows = []
    print(f"{torch.cuda.get_device_name(0)}; TFLOP/s (ms): kernels.matmul TF32, torch.mm float32, torch.mm TF32, "
          "kernels.matmul on row-scaled float16; 'half on cuBLAS': float16 operands scaled by rows (dG @ W_ih, v0.62) "
          "or columns (dG^T @ x, v0.61), the product on cuBLAS, conversions included; "
          "/N: MN-major operands restaged in N chunks")
    chunk_counts = [int(v) for v in a.restage_chunks.split(",") if v] or [mm.RESTAGE_CHUNKS]
    tiles = [parse_tiles(t) for t in a.tiles.split(",") if t] or [None]
    cases = [(c, t, int(h), int(b)) for c in chunk_counts for t in tiles for h in a.hidden.split(",")
             for b in a.batch.split(",")]
    for chunks, t, h, b in cases:
        mm.TILES, mm.RESTAGE_CHUNKS = t, chunks
        for r in measure(h, a.seq * b):
            r["restage_chunks"], r["tiles"] = chunks, t
            rows.append(r)
            print(f"{mode_tag(chunks, t):<3} H={h:<5} B={b:<4} {r['gemm']:11} "
                  f"[{r['m']}x{r['k']}]@[{r['k']}x{r['n']}] "
                  + "  ".join(f"{r[k + '_tflops']:6.1f} ({r[k + '_ms']:.3f})"
                              for k in ("triton_tf32", "torch_fp32", "torch_tf32", "triton_half") if k + "_ms" in r)
                  + (f"  cuBLAS f16->f32 {r['cublas_f16_tflops']:6.1f} ({r['cublas_f16_ms']:.3f})"
                     if "cublas_f16_ms" in r else "")
                  + (f"  half on cuBLAS {r['cublas_half_tflops']:6.1f} ({r['cublas_half_ms']:.3f})"
                     if "cublas_half_ms" in r else "")
                  + f"  host {r['host_ms']:.3f} ms  rel err {r['rel_err_vs_fp32']:.1e}"
                  + (f" / {r['rel_err_half_vs_fp32']:.1e}" if "rel_err_half_vs_fp32" in r else "")
                  + (f" / cuBLAS f16 {r['rel_err_cublas_f16_vs_fp32']:.1e}" if "cublas_f16_ms" in r else "")
                  + (f" / half on cuBLAS {r['rel_err_cublas_half_vs_fp32']:.1e}" if "cublas_half_ms" in r else ""),
                  flush=True)
        if a.json:
            write_rows_json(a.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
