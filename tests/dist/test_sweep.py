"""tools/stability_sweep.py end to end on a tiny grid: every cell a real trainer run; results,
report and plots written; a rerun runs nothing again; a crashed cell is recorded and the sweep
goes on; a diverging cell is stopped early; cells as submitit local jobs survive a killed job
and a killed sweep."""
import contextlib
import json
import os
import signal
import subprocess
import sys
import time

from magneto_dist.stability.plots import PLOTS

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


def _descendants(pid):
    """pid and every process below it (a job's controller, its task, the trainer)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    children.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(
                        int(entry))
            except (OSError, IndexError, ValueError):
                continue
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo += children.get(found[-1], [])
    return found


def _kill_job(job_id):
    """The whole job at once, as when its node is lost: no process gets to save."""
    for pid in _descendants(int(job_id)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _wait_for(condition, timeout, what, proc):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the sweep exited {proc.returncode} before {what}"
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


LOCAL = ["--cluster", "local", "grid.schemes=[pre_ln]", "grid.hidden_sizes=[32,64]",
         "grid.lrs=[1e-3]", "grid.steps=16", "grid.save_interval=4", "train.eval_interval=8"]


def test_cluster_local_a_killed_job_is_resubmitted_and_a_killed_sweep_rerun_reattaches(
        tmp_path, cache_dir):
    """Two widths as submitit local jobs. The first cell to reach step 10 hangs there (after its
    checkpoint at step 8); its whole job is killed, the sweep resubmits the cell, and is itself
    killed -9 while that job runs. The rerun re-attaches (no second submission) and the cell
    resumes from step 8."""
    out = tmp_path / "sweep"
    ledger = out / "jobs.jsonl"

    def jobs():
        return [json.loads(line) for line in open(ledger)] if ledger.exists() else []

    command = [sys.executable, "tools/stability_sweep.py", "--config",
               "configs/stability/depth_lr_cpu.yaml", "--out", str(out), "--jobs", "2",
               f"data.cache_dir={cache_dir}", *GRID, *LOCAL]
    env = dict(os.environ, MAGNETO_DIST_FAULT="hang:0:10",
               MAGNETO_DIST_FAULT_ONCE_DIR=str(tmp_path / "once"))
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log,
                                 stderr=subprocess.STDOUT)
    try:
        hung = _wait_for(lambda: [p for p in (out / "logs").glob("*.log")
                                  if "fault injection: rank 0 at hang" in p.read_text()]
                         if (out / "logs").exists() else None, 300, "a cell to hang", first)[0]
        cell = hung.name[:-len(".log")]
        (killed,) = [j for j in jobs() if j["cell"] == cell]
        _kill_job(killed["job_id"])
        _wait_for(lambda: len(jobs()) == 3, 120, "the killed cell to be resubmitted", first)
        first.kill()  # the sweep itself, -9, while its jobs run
        first.wait()
        assert jobs()[-1]["cell"] == cell and jobs()[-1]["attempt"] == 2
        code, output = sweep(out, cache_dir, *LOCAL, env=env)
        assert code == 0, output[-3000:]
        assert "job(s) still queued or running (re-attached), 0 to submit" in output
    finally:
        first.kill()
        for job in jobs():  # nothing left behind if the test failed midway
            _kill_job(job["job_id"])
    assert len(jobs()) == 3  # no duplicate submission
    results = {r["cell"]: r for r in rows(out)}
    latest = {j["cell"]: j["job_id"] for j in jobs()}
    assert {c: r["job_id"] for c, r in results.items()} == latest
    assert sorted((r["hidden_size"], r["num_heads"]) for r in results.values()) == [(32, 2),
                                                                                   (64, 4)]
    assert results[cell]["attempts"] == 2 and results[cell]["steps_done"] == 16
    metrics = [json.loads(line) for line in open(out / "cells" / cell / "metrics.jsonl")]
    assert [r["step"] for r in metrics if r["split"] == "resume"] == [8]
    report = (out / "report.md").read_text()
    assert "## Depth 2, width 32" in report and "## Depth 2, width 64" in report
    assert (out / "scaling_width.png").stat().st_size > 1000
