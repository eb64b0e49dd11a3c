"""Kernel launches with less host time than `kernel[grid](*args, **meta)`.

Triton's `JITFunction.run` recomputes the specialisation of every argument on every launch (its binder: one
`native_specialize_impl` per argument), builds a cache key string from it and checks the kernel's globals: ~24 us
of host time for lstm_fwd_kernel's 25 arguments and 27 keywords on the CI CPU, against ~1.6 us for handing the
compiled kernel's launcher its arguments (perf/NOTES.md v0.49). A short sequence's forward and a small training
step are host-bound on a GPU, so that difference is part of their time.

`launch` keys the compiled kernel by what the specialisation depends on, computed directly: each tensor's dtype
and 16-byte alignment, each integer's class (1, a multiple of 16, 32- or 64-bit), the keywords (constexprs and
options) and the current device. The key distinguishes everything Triton's specialisation distinguishes (it may
distinguish more: a second entry for one compiled kernel, never one entry for two), so a hit is the kernel
`JITFunction.run` would pick. A miss compiles through `kernel.warmup` (Triton's own binder and caches) and records
the entry. Either way the launch goes through the compiled kernel's launcher with the arguments, hooks and launch
metadata `JITFunction.run` passes it.

Arguments of another kind than tensors, ints, bools, floats and None, runtime arguments given as keywords,
kernels with pre-run hooks and the CPU interpreter's kernels go through `kernel[grid]` as before. What a hit skips
beside the binder: `JITFunction.run`'s check that the kernel's globals kept their values (ours are constants), and
compiler options taken from the environment after the first launch (set them before it, as Triton's docs say).
"""

import os

import torch
from triton import knobs
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

# TRITONLSTM_LAUNCH_CACHE=0 (read at import) sends every launch through kernel[grid], as before the cache.
ENABLED = os.environ.get("TRITONLSTM_LAUNCH_CACHE", "1") not in ("", "0")
MAX_ENTRIES = 1024  # a kernel's compiled specialisations kept (then all dropped, to be found again)


class _Kernel:
    """A kernel's entries, and what its keywords may name. Found by the kernel's id (JITFunction's own hash takes a
    lock and its cache key on each call), which no other object can take while this holds the kernel."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.constexprs = frozenset(p.name for p in kernel.params if p.is_constexpr)
        self.arg_names = frozenset(kernel.arg_names)
        self.entries: dict = {}


_kernels: dict[int, _Kernel] = {}


def _int_class(v: int) -> tuple:
    # Triton 3.6: 1 is a constexpr, multiples of 16 are marked divisible, and the type is i32 / i64 / u64 by range.
    return (v == 1, v % 16 == 0, -0x80000000 <= v < 0x80000000, -0x8000000000000000 <= v < 0x8000000000000000)


_INT_CLASSES: dict[int, tuple] = {}  # _int_class of the integers seen (T, B, H, steps: few distinct values)


def _arg_keys(args: tuple) -> tuple:
    """Each argument's part of the key, in one loop (v0.76: 9.3 -> 7.2 us for lstm_fwd_kernel's 29 arguments on the
    CI CPU, most of the rest each tensor's dtype and data_ptr). TypeError for an argument of another kind."""
    keys = []
    for a in args:
        kind = type(a)
        if kind is int:
            c = _INT_CLASSES.get(a)
            if c is None:
                c = _int_class(a)
                if len(_INT_CLASSES) < MAX_ENTRIES:
                    _INT_CLASSES[a] = c
            keys.append(c)
        elif kind is bool or a is None:
            keys.append(a)
        elif isinstance(a, torch.Tensor):
            keys.append((a.dtype, a.data_ptr() % 16 == 0))
        elif kind is float:
            keys.append(float)
        else:
            raise TypeError
    return tuple(keys)


def _arg_key(a):
    """One argument's part of the key."""
    return _arg_keys((a,))[0]


def _entry(kernel, args: tuple, meta: dict):
    """(compiled kernel, the parameters after args in signature order) for this launch's specialisation: from the
    cache, or compiled through kernel.warmup and recorded. None where the cache cannot key it."""
    if not isinstance(kernel, JITFunction) or kernel.pre_run_hooks:
        return None
    known = _kernels.get(id(kernel))
    if known is None:
        known = _kernels[id(kernel)] = _Kernel(kernel)
    try:
        key = (driver.active.get_current_device(), knobs.runtime.debug, knobs.compilation.instrumentation_mode,
               tuple(meta.items()), _arg_keys(args))
        found = known.entries.get(key)
    except TypeError:  # an argument of another kind, or a keyword's value that cannot be hashed
        return None
    if found is not None:
        return found
    # Every keyword a constexpr or an option (num_warps, ...), not a runtime argument: checked before an entry is
    # recorded, so a hit (the same keywords) needs no check (~2 us of a launch's host time, v0.76).
    if not all(k in known.constexprs or k not in known.arg_names for k in meta):
        return None
    compiled = kernel.warmup(*args, grid=(1, 1, 1), **meta)
    if hasattr(compiled, "result"):  # compiled under triton's AsyncCompileMode
        compiled = compiled.result()
    # As JITFunction.run binds them: the positional arguments, then each later parameter from the keywords or its
    # default.
    named = {name: param.default for name, param in kernel.signature.parameters.items()
             if param.default is not param.empty}
    named.update((k, v) for k, v in meta.items() if k in known.arg_names)
    tail = tuple(named[name] for name in kernel.arg_names[len(args):])
    if len(known.entries) >= MAX_ENTRIES:
        known.entries.clear()
    known.entries[key] = found = (compiled, tail)
    return found


def compiled_kernel(kernel, args: tuple, meta: dict):
    """(compiled kernel, every parameter in signature order) of kernel[grid](*args, **meta), compiling it if need
    be (nothing launched), or None where `launch` would not cache it."""
    found = _entry(kernel, args, meta)
    if found is None:
        return None
    compiled, tail = found
    return compiled, (*args, *tail)


def launch(kernel, grid: tuple, args: tuple, meta: dict) -> None:
    """kernel[grid](*args, **meta) on the current device and stream, through the launch cache."""
    found = compiled_kernel(kernel, args, meta) if ENABLED else None
    if found is None:
        kernel[grid](*args, **meta)
        return
    compiled, params = found
    grid = (*grid, 1, 1)[:3]
    run = compiled.run  # loads the module on its first use (and raises OutOfResources where it does not fit)
    stream = driver.active.get_current_stream(driver.active.get_current_device())
    run(grid[0], grid[1], grid[2], stream, compiled.function, compiled.packed_metadata,
        compiled.launch_metadata(grid, stream, *params), knobs.runtime.launch_enter_hook,
        knobs.runtime.launch_exit_hook, *params)


def clear() -> None:
    _kernels.clear()
