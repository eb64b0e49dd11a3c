"""Where a call's GPU time goes, kernel by kernel, from the profiler's device timeline (perf/NOTES.md, session 12).

Run 5's training steps took 0.2-1.5 ms more than the forward plus the backward kernel alone in cells whose
GEMMs are tiny (fp16 H = 256 B = 16: 3.37 ms against 0.89 + 1.03; fp16 H = 256 B = 1: +0.8 ms), and the forward
0.27 ms more than its kernel at fp16 H = 256 B = 16. This profiles a few calls of one cell after warm-up and
splits each call's span on the GPU (first kernel start to last kernel end) into the kernels' own time and the
gaps between them: a gap is the GPU waiting for the host (or a sync), a long kernel is itself slow. Each call is
separated by a synchronize, so the span excludes the host time before the first launch. Mode "cell" is one
LSTMCell step (no grad) against nn.LSTMCell's, the decoder loop's call. "host" is the host's
time per call without the profiler (the calls queued behind a sleep kernel, so the GPU cannot pace them): a call
is host-bound where it exceeds the span's busy time. The profiler adds a
few us of host time per op, so a gap here is an upper bound on the gap without it; cuDNN's calls, profiled the
same way beside ours, show how much.

    python perf/step_timeline.py [--cells float16:256:16,float16:256:1] [--modes fwd,fwdbwd,cell] [--calls 5]
                                 [--json FILE] [--traces DIR] [--host-profile DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from launch_spread import parse_cells  # noqa: E402

from tritonlstm.bench import host_ms, write_rows_json  # noqa: E402

DEFAULT_CELLS = "float16:256:16,float16:256:1,float16:512:16,bfloat16:512:16"
GAP_US = 10.0  # gaps shorter than this are launch latency, not named one by one
DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def device_events(trace: dict) -> list[dict]:
    """The device-side events of a Chrome trace (kernels, copies, memsets), by start time: name, ts, dur (us)."""
    events = [e for e in trace.get("traceEvents", []) if e.get("cat") in DEVICE_CATEGORIES and "dur" in e]
    return sorted(({"name": e["name"], "ts": float(e["ts"]), "dur": float(e["dur"])} for e in events),
                  key=lambda e: e["ts"])


def split_calls(events: list[dict], markers: list[tuple[float, float]]) -> list[list[dict]]:
    """The device events of each call: those that start inside the call's marker (host ts, ts + dur), or later but
    before the next marker starts (a launch runs after the host call that queued it returns)."""
    calls = []
    for i, (start, _) in enumerate(markers):
        end = markers[i + 1][0] if i + 1 < len(markers) else float("inf")
        calls.append([e for e in events if start <= e["ts"] < end])
    return calls


def summarise(events: list[dict]) -> dict:
    """One call's span on the GPU, the kernels' share of it, and its gaps (>= GAP_US) with their neighbours."""
    if not events:
        return {"span_us": 0.0, "busy_us": 0.0, "gaps_us": 0.0, "kernels": [], "gaps": []}
    span = events[-1]["ts"] + events[-1]["dur"] - events[0]["ts"]
    busy, gaps, end = 0.0, [], events[0]["ts"]
    for prev, e in zip([None] + events[:-1], events):
        gap = e["ts"] - end
        if prev is not None and gap >= GAP_US:
            gaps.append({"us": gap, "after": prev["name"][:80], "before": e["name"][:80]})
        busy += e["dur"]
        end = max(end, e["ts"] + e["dur"])
    kernels = [{"name": e["name"][:80], "us": e["dur"]} for e in events]
    return {"span_us": span, "busy_us": busy, "gaps_us": sum(g["us"] for g in gaps), "kernels": kernels,
            "gaps": gaps}


def host_profile(call, path: Path, calls: int = 20, sleep_cycles: int = 1_000_000_000) -> None:
    """cProfile of `calls` calls queued behind a ~0.5 s sleep kernel (so that none waits for the GPU), written to
    `path`: the functions by their own time, then by cumulative time. Where the host's time per call goes on the
    GPU machine itself (session 19: the CI CPU's profile of the same call, perf/host_time.py, may not rank the
    parts as a GPU host does, whose CUDA launches and slower Python cost ~2.5x the CI CPU's per call)."""
    import cProfile
    import io
    import pstats

    import torch

    from tritonlstm.functional import synchronize

    profiler = cProfile.Profile()
    torch.cuda._sleep(sleep_cycles)
    profiler.enable()
    for _ in range(calls):
        call()
    profiler.disable()
    synchronize()
    out = io.StringIO()
    for key in ("tottime", "cumulative"):
        pstats.Stats(profiler, stream=out).sort_stats(key).print_stats(40)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{calls} calls\n" + out.getvalue())


def make_calls(dtype_name: str, hidden: int, batch: int, seq: int, mode: str, device: str = "cuda") -> dict:
    """{"tritonlstm": call, "cudnn": call}: one call of the cell's module each (device "cpu": on the interpreter
    against torch's CPU modules, for the tests); each returns the output it made."""
    import torch

    from tritonlstm.modules import LSTM, LSTMCell

    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    cell = mode == "cell"  # one LSTMCell step, no grad, as a decoder's loop calls it (against nn.LSTMCell)
    model = (LSTMCell if cell else LSTM)(hidden, hidden, backend="triton").to(device, dtype)
    ref = (torch.nn.LSTMCell if cell else torch.nn.LSTM)(hidden, hidden).to(device, dtype)
    ref.load_state_dict(model.state_dict())
    x = torch.randn(*(() if cell else (seq,)), batch, hidden, device=device, dtype=dtype,
                    requires_grad=mode == "fwdbwd")

    def caller(net):
        def call():
            with torch.enable_grad() if mode == "fwdbwd" else torch.no_grad():
                y = net(x)[0]
                if mode == "fwdbwd":
                    y.backward(torch.ones_like(y))
            return y

        return call

    return {"tritonlstm": caller(model), "cudnn": caller(ref)}


def profile_cell(dtype_name: str, hidden: int, batch: int, seq: int, mode: str, calls: int,
                 trace_dir: str | None, host_profile_dir: str | None = None) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile, record_function

    from tritonlstm.functional import synchronize

    rows = []
    for name, call in make_calls(dtype_name, hidden, batch, seq, mode).items():
        for _ in range(5):
            call()
        synchronize()
        host_us = host_ms(call, calls=10) * 1e3
        if host_profile_dir and name == "tritonlstm":
            host_profile(call, Path(host_profile_dir) / f"hostprof-{dtype_name}-{hidden}-{batch}-{mode}.txt")
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for i in range(calls):
                with record_function(f"call{i}"):
                    call()
                synchronize()
        path = Path(trace_dir or tempfile.mkdtemp()) / f"trace-{name}-{dtype_name}-{hidden}-{batch}-{mode}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(path))
        trace = json.loads(path.read_text())
        if trace_dir is None:
            os.remove(path)
        markers = sorted((float(e["ts"]), float(e["dur"])) for e in trace.get("traceEvents", [])
                         if e.get("name", "").startswith("call") and e.get("cat") == "user_annotation")
        for i, events in enumerate(split_calls(device_events(trace), markers)):
            rows.append({"dtype": dtype_name, "hidden": hidden, "batch": batch, "seq": seq, "mode": mode,
                         "impl": name, "call": i, "host_us": host_us, **summarise(events)})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=parse_cells, default=parse_cells(DEFAULT_CELLS), help="dtype:H:B,...")
    ap.add_argument("--modes", default="fwd,fwdbwd,cell")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--json", help="write the rows here (rewritten after each cell)")
    ap.add_argument("--traces", help="keep the Chrome traces in this folder")
    ap.add_argument("--host-profile", metavar="DIR",
                    help="and a cProfile of our calls' host path per cell and mode, as text files in this folder")
    a = ap.parse_args(argv)
    modes = a.modes.split(",")
    if any(m not in ("fwd", "fwdbwd", "cell") for m in modes) or a.seq < 1 or a.calls < 1:
        ap.error(f"--modes takes fwd, fwdbwd and cell, --seq and --calls >= 1; got {a.modes!r}, {a.seq}, {a.calls}")
    import torch

    if not torch.cuda.is_available():
        print("perf/step_timeline.py: no CUDA device, nothing to profile.")
        return 0
    rows: list[dict] = []
    print(f"{'cell':<24}{'impl':<12}{'call':>5}{'host':>9}{'span':>9}{'busy':>9}{'gaps':>9}  (us)  largest gaps")
    for dtype_name, hidden, batch in a.cells:
        for mode in modes:
            for row in profile_cell(dtype_name, hidden, batch, a.seq, mode, a.calls, a.traces, a.host_profile):
                rows.append(row)
                top = sorted(row["gaps"], key=lambda g: -g["us"])[:2]
                print(f"{dtype_name}:{hidden}:{batch}:{mode:<8}".ljust(24) + f"{row['impl']:<12}{row['call']:>5}"
                      f"{row['host_us']:9.0f}{row['span_us']:9.0f}{row['busy_us']:9.0f}{row['gaps_us']:9.0f}  " +
                      "; ".join(f"{g['us']:.0f} before {g['before'][:40]}" for g in top), flush=True)
            if a.json:
                write_rows_json(a.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
