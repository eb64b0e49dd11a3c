"""Test setup: GPU mode where CUDA exists (the gpu-marked tests, compiled kernels), else the CPU interpreter
(set before triton is imported) with a bf16 fix for it; NaN-poisoned buffers in both.

TRITONLSTM_TEST_INTERPRET=1 forces interpreter mode on a GPU machine."""

import os

import torch  # importing torch does not import triton, so TRITON_INTERPRET can still be set below

GPU_MODE = torch.cuda.is_available() and not os.environ.get("TRITONLSTM_TEST_INTERPRET")
if not GPU_MODE:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def _bf16_to_f32(data: np.ndarray) -> np.ndarray:
    return (data.astype(np.uint32) << 16).view(np.float32)


def _patch_interpreter_bf16() -> None:
    """Triton 3.6's interpreter stores bf16 as raw uint16: its tl.dot multiplies the raw integers
    (triton-lang/triton#11584) and its fp32 -> bf16 cast truncates. Test-only: make both behave as the GPU does
    (bf16 products accumulated in fp32; round to nearest even)."""
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


if os.environ.get("TRITON_INTERPRET") == "1":
    _patch_interpreter_bf16()


@pytest.fixture(autouse=True)
def poison_buffers(monkeypatch):
    """Every buffer the kernels must write starts as NaN, so an unwritten element cannot pass."""
    from tritonlstm.kernels import lstm as k

    def alloc(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(k, "_alloc", alloc)
    yield


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    """GPU tests run only in GPU mode; the rest only without it, since they run the kernels on CPU tensors
    through the interpreter (TRITONLSTM_TEST_INTERPRET=1 runs them on a GPU machine)."""
    for item in items:
        if "gpu" in item.keywords and not GPU_MODE:
            item.add_marker(pytest.mark.skip(reason="needs CUDA"))
        elif "gpu" not in item.keywords and GPU_MODE:
            item.add_marker(pytest.mark.skip(reason="interpreter test (TRITONLSTM_TEST_INTERPRET=1 runs it here)"))
