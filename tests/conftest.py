"""Test setup: GPU mode where CUDA exists (the gpu-marked tests, compiled kernels), else the CPU interpreter
(set before triton is imported; the package fixes its bf16 arithmetic); NaN-poisoned buffers in both.

TRITONLSTM_TEST_INTERPRET=1 forces interpreter mode on a GPU machine."""

import os

import torch  # importing torch does not import triton, so TRITON_INTERPRET can still be set below

GPU_MODE = torch.cuda.is_available() and not os.environ.get("TRITONLSTM_TEST_INTERPRET")
if not GPU_MODE:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest  # noqa: E402


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
