"""Corrections to Triton 3.6's CPU interpreter for bfloat16, applied when the kernels are built for it.

The interpreter stores bf16 as raw uint16: its `tl.dot` multiplies the raw integers (triton-lang/triton#11584)
and its fp32 -> bf16 cast truncates. Without a fix, every bf16 call under TRITON_INTERPRET=1 would return a
silently wrong answer. The fix makes both behave as the GPU does (bf16 products accumulated in fp32; round to
nearest even) and leaves every other dtype to the interpreter's own code. It touches only the interpreter's
builder, never compiled kernels, and applies once per process.
"""

import numpy as np

_applied = False


def _bf16_to_f32(data: np.ndarray) -> np.ndarray:
    return (data.astype(np.uint32) << 16).view(np.float32)


def fix_bf16() -> None:
    global _applied
    if _applied:
        return
    import triton.language as tl
    from triton.runtime import interpreter as it

    builder = it.InterpreterBuilder
    orig_dot, orig_cast = builder.create_dot, builder.cast_impl

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.scalar == tl.bfloat16 or b.dtype.scalar == tl.bfloat16:
            out = np.matmul(_bf16_to_f32(a.data), _bf16_to_f32(b.data), dtype=np.float32)
            return it.TensorHandle(out.astype(d.data.dtype) + d.data, d.dtype.scalar)
        return orig_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32).astype(np.uint64)
            rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
            return it.TensorHandle(rounded, tl.bfloat16)
        return orig_cast(self, src, dst_type)

    builder.create_dot = create_dot
    builder.cast_impl = cast_impl
    _applied = True
