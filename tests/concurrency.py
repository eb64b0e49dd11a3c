"""Persistent launches of several programs on Triton's CPU interpreter, with the programs running at once.

The interpreter runs a launch's programs one after another, so a persistent launch of more than one program
cannot run there (the first program would wait at its first barrier for programs that have not started), and the
kernels' exchanges between programs (the grid barrier, the cluster barrier, the backward's reduce-scatter and
2-D grid) are otherwise exercised only on a GPU. Inside `concurrent_programs()`
every program of a launch runs in its own thread, so the barriers work as on a GPU: by atomics and polled loads on
shared memory.

Threads switch often (a 10 us switch interval) but otherwise keep near step with one another, which hides most
ordering bugs. So one program of each launch, drawn from a seeded generator, is made slow: it sleeps before each of
its stores. A program that reads another's output before a barrier or flag guarantees it was written then reads
stale memory, and the result is wrong (checked: a counter barrier that waits for one program fewer fails every
test of tests/test_concurrent_programs.py that uses it). What this cannot find is what the GPU's weaker memory
ordering adds (a missing fence): the interpreter's stores are visible at once (tests/test_compilecheck.py reads
each exchange's ordering off its PTX instead).
"""

from __future__ import annotations

import contextlib
import inspect
import random
import sys
import threading
import time

_local = threading.local()


class ClusterBarrier:
    """Hopper's cluster barrier among n threads, in its two halves: arrive() (not blocking) and wait() (until all n
    have arrived in the caller's phase). A thread that arrives twice without waiting, or waits without arriving, is
    an error the hardware would not report (undefined behaviour, or a hang), so here it raises."""

    def __init__(self, n: int):
        self.n, self.arrived, self.phase, self.broken = n, 0, 0, False
        self.cond = threading.Condition()

    def arrive(self) -> None:
        if getattr(_local, "phase", None) is not None:
            raise RuntimeError("cluster barrier: a program arrived twice without waiting in between")
        with self.cond:
            _local.phase = self.phase
            self.arrived += 1
            if self.arrived == self.n:
                self.arrived, self.phase = 0, self.phase + 1
                self.cond.notify_all()

    def wait(self) -> None:
        phase = getattr(_local, "phase", None)
        if phase is None:
            raise RuntimeError("cluster barrier: a program waited without arriving")
        with self.cond:
            while self.phase == phase:
                if self.broken:
                    raise threading.BrokenBarrierError
                self.cond.wait(0.05)
        _local.phase = None

    def abort(self) -> None:
        with self.cond:
            self.broken = True
            self.cond.notify_all()


class Aborted(Exception):
    """Raised inside a program still running at the launch's time limit."""


@contextlib.contextmanager
def concurrent_programs(seed: int = 0, delay: float = 0.02, time_limit: float = 60.0):
    """Inside: each interpreted launch runs its programs in threads, one of them (drawn with `seed`) sleeping
    `delay` seconds before each of its stores; a persistent launch may have several programs (the launchers refuse
    them on the sequential interpreter); and exchange="cluster" meets its programs at a barrier of threads, as
    Hopper's cluster barrier meets a cluster's CTAs (the kernels skip theirs on the interpreter). A launch whose
    programs have not all finished after `time_limit` seconds (a barrier that never completes: the kernels' own
    bound, max_spin polls, is hours of interpreted polls) is stopped, its programs raising Aborted at their next
    memory access, and fails."""
    from triton.runtime import interpreter as interp

    from tritonlstm.kernels import lstm

    builder_type = type(interp.interpreter_builder)
    release = interp._ir.MEM_SEMANTIC.RELEASE
    rng = random.Random(seed)
    kinds = {"create_store": "store", "create_masked_store": "store", "create_load": "load",
             "create_masked_load": "load", "create_atomic_rmw": "poll", "create_atomic_cas": "poll"}
    saved = {name: getattr(builder_type, name) for name in kinds}
    saved_call, saved_residency = interp.GridExecutor.__call__, lstm._check_residency
    saved_cluster = lstm._cluster_barrier, lstm._cluster_arrive, lstm._cluster_wait
    saved_patch_lang, saved_rewrite = interp._patch_lang, interp.InterpretedFunction.rewrite
    # The interpreter's own state is built for one program at a time: rewriting a jitted helper at its first call
    # adds names to the kernel module's globals, which _patch_lang iterates over at every helper call ("dictionary
    # changed size during iteration" in another thread, now and then). One at a time, then.
    interp_lock = threading.RLock()

    def patch_lang(fn):
        with interp_lock:
            return saved_patch_lang(fn)

    def rewrite(self):
        with interp_lock:
            return saved_rewrite(self)

    saved_switch = sys.getswitchinterval()

    def watched(access, kind):
        def run(self, *args):
            stop = getattr(_local, "stop", None)
            if stop is not None and stop.is_set():
                raise Aborted
            if kind == "store" and getattr(_local, "slow", False):
                time.sleep(delay)
            elif kind == "poll" or (kind == "load" and args[-1]):
                # An atomic or a volatile load: what a waiting program polls. Giving up the GIL here lets the
                # programs it waits for run (without it, at 30-50 programs a launch took minutes).
                time.sleep(0)
            out = access(self, *args)
            if kind == "poll" and len(args) == 6 and args[4] == release and getattr(_local, "slow", False):
                arrived()  # a release-only atomic: the grid barrier's early arrival (_grid_arrive)
            return out
        return run

    def arrived():
        # The others may pass their wait now, and a step of theirs takes ~0.15 s here: held back longer, the slow
        # program stores what comes after its arrival once they have run on (read too early, it is stale).
        time.sleep(10 * delay)

    # Hopper's cluster barrier (the kernels skip theirs on the interpreter), whole or in halves (ARRIVE_EARLY): the
    # programs along axis 0 that share the caller's axes 1 and 2, as _launch_as_cluster launches them.
    def cluster_arrive(x):
        _local.clusters[_local.idx[1:]].arrive()
        if _local.slow:
            arrived()
        return x

    def cluster_wait(x):
        _local.clusters[_local.idx[1:]].wait()
        return x

    def cluster_barrier(x):
        barrier = _local.clusters[_local.idx[1:]]
        barrier.arrive()
        barrier.wait()
        return x

    def grid_idx(self):  # each thread's own program id (the interpreter keeps one for the process)
        return getattr(_local, "idx", None)

    def set_grid_idx(self, value):
        _local.idx = value

    def call(self, *args_dev, **kwargs):
        # GridExecutor.__call__ of triton 3.6, with the loop over programs replaced by threads.
        kwargs = {k: v for k, v in kwargs.items() if k in inspect.getfullargspec(self.fn).args}
        args_hst, kwargs_hst = self._init_args_hst(args_dev, kwargs)
        for hook in self.pre_run_hooks:
            hook(*args_hst, **kwargs_hst)
        scope = interp._patch_lang(self.fn)
        try:
            args = inspect.getcallargs(self.fn, *args_hst, **kwargs_hst)
            args = {n: a if n in self.constexprs else interp._implicit_cvt(a) for n, a in args.items()}
            grid = self.grid(args) if callable(self.grid) else self.grid
            grid = tuple(grid) + (1,) * (3 - len(grid))
            interp.interpreter_builder.set_grid_dim(*grid)
            ids = [(x, y, z) for x in range(grid[0]) for y in range(grid[1]) for z in range(grid[2])]
            slow = rng.randrange(len(ids))
            errors, stop = [], threading.Event()
            clusters = {(y, z): ClusterBarrier(grid[0]) for y in range(grid[1]) for z in range(grid[2])}

            def program(i):
                _local.idx, _local.slow, _local.stop, _local.clusters = ids[i], i == slow, stop, clusters
                _local.phase = None
                try:
                    self.fn(**args)
                except BaseException as e:  # noqa: BLE001 - re-raised in the launching thread
                    errors.append(e)

            threads = [threading.Thread(target=program, args=(i,), daemon=True) for i in range(len(ids))]
            for t in threads:
                t.start()
            deadline = time.monotonic() + time_limit
            for t in threads:
                t.join(max(0.0, deadline - time.monotonic()))
            if any(t.is_alive() for t in threads):
                failed = list(errors)  # a program that raised leaves the others waiting for it
                stop.set()
                for barrier in clusters.values():
                    barrier.abort()
                for t in threads:
                    t.join()
                if failed:
                    raise interp.InterpreterError(repr(failed[0])) from failed[0]
                raise TimeoutError(f"{self.fn.__name__}: programs still running after {time_limit} s (a barrier "
                                   "that never completes?)")
            if errors:
                raise interp.InterpreterError(repr(errors[0])) from errors[0]
        finally:
            scope.restore()
        self._restore_args_dev(args_dev, args_hst, kwargs, kwargs_hst)

    def residency(config, H, D, device):
        if not lstm.interpreting():
            saved_residency(config, H, D, device)

    builder_type.grid_idx = property(grid_idx, set_grid_idx)
    for name, access in saved.items():
        setattr(builder_type, name, watched(access, kinds[name]))
    interp.GridExecutor.__call__ = call
    lstm._check_residency = residency
    lstm._cluster_barrier, lstm._cluster_arrive, lstm._cluster_wait = cluster_barrier, cluster_arrive, cluster_wait
    interp._patch_lang, interp.InterpretedFunction.rewrite = patch_lang, rewrite
    sys.setswitchinterval(1e-5)
    try:
        yield
    finally:
        sys.setswitchinterval(saved_switch)
        lstm._check_residency = saved_residency
        lstm._cluster_barrier, lstm._cluster_arrive, lstm._cluster_wait = saved_cluster
        interp._patch_lang, interp.InterpretedFunction.rewrite = saved_patch_lang, saved_rewrite
        interp.GridExecutor.__call__ = saved_call
        for name, access in saved.items():
            setattr(builder_type, name, access)
        del builder_type.grid_idx
