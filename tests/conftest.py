"""Test setup: GPU mode where CUDA exists (the gpu-marked tests, compiled kernels), else the CPU interpreter
(set before triton is imported; the package fixes its bf16 arithmetic); NaN-poisoned buffers in both.

TRITONLSTM_TEST_INTERPRET=1 forces interpreter mode on a GPU machine."""

import os
import sys

import torch  # importing torch does not import triton, so TRITON_INTERPRET can still be set below

GPU_MODE = torch.cuda.is_available() and not os.environ.get("TRITONLSTM_TEST_INTERPRET")
if not GPU_MODE:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest  # noqa: E402


def _speed_up_the_interpreter():
    """Two of Triton 3.6's interpreter costs, removed without changing what it computes (the launch's patching and
    every result as before; TRITONLSTM_TEST_REPATCH=1 keeps the interpreter as it is). Together about a quarter of
    an interpreted test's time (the 2-D grid HALF_G backward test: 30.4 -> 22.9 s).
    - It re-patches triton.language at every call of a jitted helper inside a kernel (InterpretedFunction.__call__
      -> _patch_lang: inspect.getmembers over tl, tl.math and tl.tensor, thousands of times a launch) with the
      functions its launch patched in already. While a launch's patches are in place, a helper whose language
      modules the launch patched skips the repeat.
    - _get_np_dtype builds its table of dtypes at every call; here the same table is built once."""
    from triton.runtime import interpreter as interp

    if os.environ.get("TRITONLSTM_TEST_REPATCH") or getattr(interp._patch_lang, "once_a_launch", False):
        return
    tl, patch_lang, get_np_dtype = interp.tl, interp._patch_lang, interp._get_np_dtype
    active, lang_ids = [], {}  # active: the ids of the language modules the running launch patched

    def langs(fn):
        if fn not in lang_ids:
            lang_ids[fn] = {id(v) for v in fn.__globals__.values() if v is tl or v is tl.core}
        return lang_ids[fn]

    class LaunchScope(interp._LangPatchScope):
        def restore(self):
            active.clear()
            super().restore()

    helper_call = interp.InterpretedFunction.__call__.__code__

    def once(fn):
        if active and langs(fn) <= active[0]:
            return interp._LangPatchScope()  # nothing to restore: the launch's patches stay in place
        scope = patch_lang(fn)
        if not active and sys._getframe(1).f_code is not helper_call:  # a launch's (not a helper's outside one)
            scope.__class__ = LaunchScope
            active.append(langs(fn))
        return scope

    table = {t: get_np_dtype(t) for t in (tl.int1, tl.float16, tl.float32, tl.float64, tl.int8, tl.uint8, tl.int16,
                                          tl.uint16, tl.int32, tl.uint32, tl.int64, tl.uint64, tl.bfloat16)}

    def np_dtype(tt_dtype):
        if type(tt_dtype) is tl.block_type and not isinstance(tt_dtype.element_ty, tl.pointer_type):
            tt_dtype = tt_dtype.element_ty
        np_type = table.get(tt_dtype) if type(tt_dtype) is tl.dtype else None
        return np_type if np_type is not None else get_np_dtype(tt_dtype)

    once.once_a_launch, once.original, np_dtype.original = True, patch_lang, get_np_dtype
    interp._patch_lang, interp._get_np_dtype = once, np_dtype


@pytest.fixture(autouse=True, scope="session")
def interpreter_speed():
    if not GPU_MODE:
        _speed_up_the_interpreter()
    yield


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
