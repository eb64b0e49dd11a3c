"""tritonlstm.targets: the issue-5/7 target report, on a committed H100 run and on synthetic rows (CPU only)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tritonlstm import targets

RUN5 = Path(__file__).resolve().parents[1] / "perf" / "results" / "h100-2026-11-27-run5" / "results.json"


def _row(dtype, hidden, batch, layers=1, bidir=False, mode="fwd", ms=1.0, cudnn=2.0, mb=10.0, cudnn_mb=10.0):
    return dict(dtype=dtype, hidden=hidden, batch=batch, seq=256, layers=layers, bidirectional=bidir, mode=mode,
                tritonlstm_ms=ms, cudnn_ms=cudnn, speedup=cudnn / ms, tritonlstm_peak_mb=mb, cudnn_peak_mb=cudnn_mb,
                max_rel_err=1e-4)


def test_report_of_run5_counts_what_the_notes_say():
    data = json.loads(RUN5.read_text())
    text = targets.report(data["rows"] + data["errors"])
    # perf/NOTES.md "Runs 4 and 5" / "Where things stand": forward >= 1x in 32/36, training 27/36, target 3 in
    # 39/54, memory over cuDNN + 10 % in 13 of 48 training cells.
    assert "5.1 forward >= 1x: misses, 32/36" in text
    assert "5.2 forward+backward >= 1x: misses, 27/36" in text
    assert "forward >= 3x: misses, 18/27" in text and "forward+backward >= 2x: misses, 21/27" in text
    assert "<= cuDNN's + 10 %: misses, 32/36" in text and "for the record): misses, 3/12" in text
    assert "float32 H=512 B=16 L=4: 2.20x" in text
    assert "float32: 4 layers 10.773 ms = 8.97x one layer's 1.201 ms" in text


def test_cells_not_measured_are_counted_as_missing_never_as_met():
    text = targets.report([_row("float16", 256, 16, ms=0.5, cudnn=0.6)])
    assert "5.1 forward >= 1x: misses, 1/36 (35 not measured)" in text
    assert "5.4 fp16 B = 16 forward >= 1x: misses, 1/3 (2 not measured)" in text
    assert "5.4 fp16 B = 16 forward step <= 1.5 us: misses, 0/3 (2 not measured)" in text
    assert "float16 H=256 B=16: 1.95 us per step" in text


def test_every_target_holds_on_rows_that_meet_them():
    rows = [_row(d, h, b, mode=m, ms=0.2, cudnn=10.0) for d, h, b in targets.SINGLE for m in ("fwd", "fwdbwd")]
    rows += [_row(d, 512, 16, n, bi, m, ms=0.25, cudnn=10.0) for d in ("float16", "bfloat16", "float32")
             for n, bi, _ in targets.STACKS for m in ("fwd", "fwdbwd")]
    text = targets.report(rows)
    assert "misses" not in text.replace("4-layer forward within 1.5x of a 1-layer forward: misses", "")
    assert "4-layer forward within 1.5x of a 1-layer forward: HOLDS, 3/3" in text


def test_error_cells_fail_the_correctness_target():
    rows = [_row("float32", 256, 1), {**_row("float16", 512, 64), "speedup": None, "error": "output differs"}]
    text = targets.report(rows)
    assert "5.6 every cell passes the correctness check: misses, 1 cells with an error" in text
    assert "float16 H=512 B=64 L=1 fwd: output differs" in text


def test_cli_prints_the_report(tmp_path, capsys):
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"gpu": "X", "torch": "t", "triton": "3.6.0", "date": "d",
                                "rows": [_row("float32", 256, 1)], "errors": []}))
    assert targets.main([str(path)]) == 0
    assert "Issue 5" in capsys.readouterr().out
    assert targets.main([]) == 2
    assert targets.main(["--help"]) == 0 and capsys.readouterr().out.startswith("usage: python -m tritonlstm.targets")


@pytest.mark.parametrize("content,why", [(None, "No such file"), ("{not json", "Expecting"),
                                         ('{"gpu": "X"}', "no 'rows' list")], ids=["missing", "not-json", "no-rows"])
def test_cli_names_a_file_that_is_not_a_results_json(tmp_path, capsys, content, why):
    path = tmp_path / "results.json"
    if content is not None:
        path.write_text(content)
    assert targets.main([str(path)]) == 2
    err = capsys.readouterr().err
    assert f"RESULTS_JSON {str(path)!r} is not the bench's results.json" in err and why in err, err


def test_host_bound_cells_are_listed_with_cudnns_host_time(tmp_path, capsys):
    """The bench's host time per call (results.json "host", beside the rows): cells whose host time reaches 80 % of
    their median are listed, not counted against any target; a run without host times prints no such section."""
    bound = _row("float16", 256, 16, ms=0.667, cudnn=0.347)
    free = _row("float16", 1024, 256, ms=3.0, cudnn=4.0)
    host = [{**{k: bound[k] for k in bound if k in ("dtype", "hidden", "batch", "seq", "layers", "bidirectional",
                                                      "mode")}, "tritonlstm_host_ms": 0.6, "cudnn_host_ms": 0.15},
            {**{k: free[k] for k in free if k in ("dtype", "hidden", "batch", "seq", "layers", "bidirectional",
                                                    "mode")}, "tritonlstm_host_ms": 0.6, "cudnn_host_ms": 0.2}]
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"gpu": "G", "rows": [bound, free], "errors": [], "host": host}))
    assert targets.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "Host-bound cells (not a target: our host time per call >= 80% of our median): 1 of 2 timed" in out
    assert "float16 H=256 B=16 fwd: host 0.600 of 0.667 ms (cuDNN's host 0.150 of 0.347 ms)" in out
    assert "H=1024 B=256 fwd: host" not in out
    assert "Host-bound" not in targets.report([bound, free])
