"""Test setup: the CPU interpreter (set before triton is imported), a bf16 fix for it, NaN-poisoned buffers."""

import os

if not os.environ.get("TRITONLSTM_TEST_GPU"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402


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
    """GPU tests run only in GPU mode (TRITONLSTM_TEST_GPU=1 on a CUDA machine); the rest only without it, since
    they run the kernels on CPU tensors through the interpreter."""
    gpu_mode = bool(os.environ.get("TRITONLSTM_TEST_GPU")) and torch.cuda.is_available()
    for item in items:
        if "gpu" in item.keywords and not gpu_mode:
            item.add_marker(pytest.mark.skip(reason="needs CUDA: run with TRITONLSTM_TEST_GPU=1 on a GPU machine"))
        elif "gpu" not in item.keywords and gpu_mode:
            item.add_marker(pytest.mark.skip(reason="interpreter test; GPU mode runs the gpu-marked tests"))
