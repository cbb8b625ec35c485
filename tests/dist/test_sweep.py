"""tools/stability_sweep.py end to end on a tiny grid: every cell a real trainer run; results,
report and plots written; a rerun runs nothing again; a crashed cell is recorded and the sweep
goes on; a diverging cell is stopped early."""
import json
import os
import subprocess
import sys

from magneto_dist.stability.report import PLOTS

from .ranks import ROOT

GRID = ["grid.schemes=[pre_ln,magneto]", "grid.depths=[2]", "grid.lrs=[1e-3,3e-3]",
        "grid.steps=6", "grid.diagnostics_interval=3", "train.eval_interval=3"]


def sweep(out, cache_dir, *extra, env=None):
    proc = subprocess.run(
        [sys.executable, "tools/stability_sweep.py", "--config",
         "configs/stability/depth_lr_cpu.yaml", "--out", str(out), "--jobs", "2",
         f"data.cache_dir={cache_dir}", *GRID, *extra], cwd=ROOT, capture_output=True,
        text=True, timeout=400, env=dict(os.environ, **(env or {})))
    return proc.returncode, proc.stdout + proc.stderr


def rows(out):
    with open(out / "results.jsonl") as f:
        return [json.loads(line) for line in f]


def test_sweep_end_to_end_resume_and_a_crashed_cell(tmp_path, cache_dir):
    out = tmp_path / "sweep"
    crashed = "magneto-layernorm-L2-d64-lr0.003-s1-w0"
    (out / "cells").mkdir(parents=True)
    (out / "cells" / crashed).write_text("")  # its run_dir cannot be made: the trainer exits 2
    code, output = sweep(out, cache_dir)
    assert code == 0, output[-3000:]
    results = {r["cell"]: r for r in rows(out)}
    assert len(results) == 4
    bad = results.pop(crashed)
    assert bad["verdict"] == "crashed" and bad["exit_code"] == 2
    assert "cannot be written (File exists)" in bad["reason"]
    assert os.path.exists(bad["log"])
    for r in results.values():
        assert r["verdict"] in ("ok", "stuck", "spiky"), r
        assert r["steps_done"] == 6 and r["final_valid_loss"] is not None
        assert len(r["grad_norm_init"]) == 2 and len(r["residual_rms_final"]) == 2
        assert [s for s, _ in r["model_update"]] == [0, 3, 6]
        for key in ("scheme", "norm_type", "depth", "lr", "seed", "warmup", "final_loss"):
            assert key in r
    report = (out / "report.md").read_text()
    assert "## Depth 2" in report and "| pre_ln |" in report and "(crashed)" in report
    for plot in PLOTS:
        assert (out / plot).stat().st_size > 1000, plot
    # a rerun finishes nothing twice; --report-only redraws from results.jsonl
    code, output = sweep(out, cache_dir)
    assert code == 0 and "4 cells already finished (results.jsonl); 0 to run" in output
    assert len(rows(out)) == 4
    (out / "report.md").unlink()
    code, output = sweep(out, cache_dir, "--report-only")
    assert code == 0 and (out / "report.md").exists()


def test_a_diverging_cell_is_stopped_early(tmp_path, cache_dir):
    out = tmp_path / "sweep"
    code, output = sweep(out, cache_dir, "grid.schemes=[pre_ln]", "grid.lrs=[1e-3]",
                         "grid.steps=40", env={"MAGNETO_DIST_FAULT": "nonfinite_loss:0:2-"})
    assert code == 0, output[-3000:]
    (row,) = rows(out)
    assert row["verdict"] == "diverged" and row["stopped_early"], row
    assert row["steps_done"] < 40
