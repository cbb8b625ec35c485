"""The sweep's parts, without training: the grid's width axis and refusals, results.jsonl
recovery, GPU placement, readings that respect the seeds, plots that fit their canvas, the dry
run's cost, and the Slurm path (sbatch parameters, the per-node launcher command, re-attach,
resubmission, --cancel) against fake Slurm commands."""
import json
import math
import os
import stat
import sys

import pytest

from magneto_dist.errors import ConfigError
from magneto_dist.launch_env import ROOT
from magneto_dist.stability import cluster, pool
from magneto_dist.stability.cell import Place, cell_job, rdzv_port, result_row
from magneto_dist.stability.cluster import ClusterOptions, ClusterRunner
from magneto_dist.stability.grid import load_sweep
from magneto_dist.stability.pool import SweepRunner, slot_devices
from magneto_dist.stability.report import interval, write_markdown
from magneto_dist.stability.sweep import load_results

SWEEP = ("grid: {schemes: [pre_ln], depths: [2], lrs: [0.001, 0.01], steps: 5}\n"
         "run: {model: {hidden_size: 64, num_heads: 4, ffn_hidden_size: 256}, "
         "data: {split: '98,1,1'}, train: {micro_batch_size: 8, global_batch_size: 8}}\n")


@pytest.fixture
def sweep_file(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(SWEEP)
    return str(path)


@pytest.mark.parametrize("override, message", [
    ("grid.lrs=[1e-3,0.001]", r"grid.lrs=\[0.001, 0.001\] lists 0.001 more than once"),
    ("grid.seeds=[1,2,1]", r"grid.seeds=\[1, 2, 1\] lists 1 more than once"),
    ("grid.hidden_sizes=[32,32]", r"grid.hidden_sizes=\[32, 32\] lists 32 more than once"),
    ("grid.lrs=[0.001,0.0010000001]", "agree to 6 significant digits give cells of one name")])
def test_duplicate_grid_values_are_refused_by_key(sweep_file, tmp_path, override, message):
    """Two equal values made two cells of one name, run at once: one hit the run lock."""
    with pytest.raises(ConfigError, match=message):
        load_sweep(sweep_file, [override], str(tmp_path))


def test_the_width_axis_scales_heads_and_ffn_by_the_stated_rule(sweep_file, tmp_path):
    sweep = load_sweep(sweep_file, ["grid.hidden_sizes=[32,128]"], str(tmp_path))
    assert [c.name for c in sweep.cells()][:2] == ["pre_ln-layernorm-L2-d32-lr0.001-s1-w0",
                                                   "pre_ln-layernorm-L2-d32-lr0.01-s1-w0"]
    wide = sweep.cell_config(sweep.cells()[-1]).model  # head dim 16 and FFN 4x, as the run's
    assert (wide.hidden_size, wide.num_heads, wide.ffn_hidden_size) == (128, 8, 512)
    sweep = load_sweep(sweep_file, ["grid.hidden_sizes=[128]", "grid.head_dim=32",
                                    "grid.ffn_ratio=2"], str(tmp_path))
    model = sweep.cell_config(sweep.cells()[0]).model
    assert (model.num_heads, model.ffn_hidden_size) == (4, 256)
    with pytest.raises(ConfigError, match="grid.hidden_sizes: 48 is not a positive multiple of "
                                          "the head dimension 32"):
        load_sweep(sweep_file, ["grid.hidden_sizes=[48]", "grid.head_dim=32"], str(tmp_path))


def _row(cell, verdict="ok", **extra):
    return {"cell": cell.name, **cell.key(), "verdict": verdict, "reason": "r",
            "final_valid_loss": 5.0, "final_loss": 5.0, "steps_done": 5, "seconds": 1.0,
            "run_dir": "", **extra}


def test_a_garbage_line_is_quarantined_not_fatal(sweep_file, tmp_path):
    """A garbage line followed by a row killed the next sweep with a raw ValueError."""
    sweep = load_sweep(sweep_file, [], str(tmp_path))
    a, b = sweep.cells()
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps(_row(a)) + "\n#garbage{\n" + "[1, 2]\n" + json.dumps(_row(b))
                    + "\n")
    said = []
    assert [r["cell"] for r in load_results(str(path), said.append)] == [a.name, b.name]
    said.clear()
    rows = SweepRunner(sweep, 1, log=said.append).run()  # every cell done: nothing runs
    assert [r["cell"] for r in rows] == [a.name, b.name]
    assert any(f"{path}:2 is not a result row; moved to {path}.quarantine" in s for s in said)
    assert any(f"{path}:3 is not a result row" in s for s in said)
    assert path.read_text() == json.dumps(_row(a)) + "\n" + json.dumps(_row(b)) + "\n"
    assert (tmp_path / "results.jsonl.quarantine").read_text() == "#garbage{\n[1, 2]\n"


def test_rows_from_before_the_width_axis_are_kept_not_rerun(sweep_file, tmp_path):
    sweep = load_sweep(sweep_file, [], str(tmp_path))
    old = []
    for cell in sweep.cells():  # as the sweep wrote them before: no hidden_size, no -dN
        row = {k: v for k, v in _row(cell).items() if k != "hidden_size"}
        row["cell"] = cell.name.replace("-d64", "")
        old.append(row)
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old))
    said = []
    rows = SweepRunner(sweep, 1, log=said.append).run()  # nothing to run
    assert [r["cell"] for r in rows] == [c.name for c in sweep.cells()]
    assert [r["hidden_size"] for r in rows] == [64, 64]
    assert "2 row(s) of" in said[0] and "given width 64" in said[0]


def test_spike_keys_are_the_trainers_and_cells_do_not_roll_back(sweep_file, tmp_path):
    """One spike rule: the verdict's old keys are refused naming the trainer key that replaced
    them; a cell's verdict reads its run's train.spike_* keys; rollback would hide the spikes
    the sweep measures."""
    with pytest.raises(ConfigError, match=r"verdict.spike_threshold is the trainer's "
                                          r"train.spike_loss_rise now"):
        load_sweep(sweep_file, ["verdict.spike_threshold=2"], str(tmp_path))
    with pytest.raises(ConfigError, match=r"run.train.spike_policy=rollback: a cell that rolls "
                                          r"its spikes back hides the instability"):
        load_sweep(sweep_file, ["train.spike_policy=rollback"], str(tmp_path))
    sweep = load_sweep(sweep_file, ["train.spike_loss_rise=0.5"], str(tmp_path))
    job = cell_job(sweep, sweep.cells()[0], None)
    assert job.spike_rule.loss_rise == 0.5 and job.spike_rule.window == 10


def test_a_second_sweep_on_the_same_output_is_refused(sweep_file, tmp_path):
    sweep = load_sweep(sweep_file, [], str(tmp_path))
    with pool.sweep_lock(str(tmp_path)):
        with pytest.raises(ConfigError, match=rf"{tmp_path} is in use by another sweep \(pid "
                                              rf"{os.getpid()}\); wait for it to end"):
            SweepRunner(sweep, 1).run()


def test_cells_get_the_parents_gpus_and_no_more_slots_than_gpus(sweep_file, tmp_path,
                                                                 monkeypatch):
    """A job given GPUs 4-7 ran its cells on 0-3; a slot beyond the GPUs trained on the CPU."""
    sweep = load_sweep(sweep_file, [], str(tmp_path))
    monkeypatch.setattr(pool, "gpu_count", lambda: 4)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    runner = SweepRunner(sweep, 4)
    assert runner.slots == ["4", "5", "6", "7"]
    job = cell_job(sweep, sweep.cells()[0], 5.0, devices=runner.slots[2])
    assert job.env()["CUDA_VISIBLE_DEVICES"] == "6" and job.env()["OMP_NUM_THREADS"] == "1"
    refusal = (r"--jobs 8 at 1 GPU\(s\) per cell needs 8 GPUs; this process sees 4 "
               r"\(CUDA_VISIBLE_DEVICES=4,5,6,7\), and a cell without one would train on the "
               r"CPU; use --jobs 4 or fewer")
    with pytest.raises(ConfigError, match=refusal):
        SweepRunner(sweep, 8)
    with pytest.raises(ConfigError, match=refusal):
        ClusterRunner(sweep, ClusterOptions("local", jobs=8))
    assert slot_devices(2, per_cell=2) == ["4,5", "6,7"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert SweepRunner(sweep, 4).slots == ["0", "1", "2", "3"]
    assert pool.default_jobs() == 4


def _seed_rows(sweep_file, tmp_path, losses: dict, verdicts: dict = None):
    """Rows of a 2-scheme x 2-LR grid with the given final losses per (scheme, seed)."""
    sweep = load_sweep(sweep_file, ["grid.schemes=[magneto,pre_ln]",
                                    f"grid.seeds={sorted({s for _, s in losses})}"],
                       str(tmp_path))
    rows = []
    for cell in sweep.cells():
        verdict = (verdicts or {}).get((cell.scheme, cell.lr), "ok")
        loss = losses[(cell.scheme, cell.seed)] + (0.2 if cell.lr == 0.01 else 0.0)
        rows.append(_row(cell, verdict, final_valid_loss=loss if verdict == "ok" else None))
    return rows


def test_readings_call_a_difference_only_beyond_the_spread_over_seeds(sweep_file, tmp_path):
    """5.390 +- 0.003 against 5.401 +- 0.086 was read as 'magneto better'."""
    mean, low, high = interval([1.0, 2.0, 3.0])  # t(0.975, 2 df) = 4.3027
    assert (mean, high - mean) == (2.0, pytest.approx(4.3027 / math.sqrt(3), rel=1e-4))
    overlap = {("magneto", 1): 5.387, ("magneto", 2): 5.390, ("magneto", 3): 5.393,
               ("pre_ln", 1): 5.340, ("pre_ln", 2): 5.500, ("pre_ln", 3): 5.363}
    report = open(write_markdown(_seed_rows(sweep_file, tmp_path, overlap), str(tmp_path),
                                 "t")).read()
    assert ("best stable validation loss 5.390 +- 0.003 (n=3) against 5.401 +- 0.087 (n=3): "
            "the confidence intervals overlap, no difference called") in report
    assert "magneto better" not in report and "confidence intervals of their means" in report
    apart = {("magneto", 1): 5.10, ("magneto", 2): 5.11, ("magneto", 3): 5.12,
             ("pre_ln", 1): 5.40, ("pre_ln", 2): 5.41, ("pre_ln", 3): 5.42}
    rows = _seed_rows(sweep_file, tmp_path, apart, {("pre_ln", 0.01): "diverged"})
    report = open(write_markdown(rows, str(tmp_path), "t")).read()
    assert ("largest stable LR 0.01 (3/3 seeds) against 0.001 (3/3 seeds): magneto tolerates "
            "larger LRs; best stable validation loss 5.110 +- 0.010 (n=3) against 5.410 +- "
            "0.010 (n=3): magneto better") in report
    one = {("magneto", 1): 5.1, ("pre_ln", 1): 5.4}
    report = open(write_markdown(_seed_rows(sweep_file, tmp_path, one), str(tmp_path),
                                 "t")).read()
    assert "magneto against pre_ln: one seed, so no comparison can be made" in report


def _synthetic_sweep(tmp_path, depths=(2, 4), widths=(32, 64), seeds=(1, 2)):
    """Rows and metrics.jsonl of a grid that never trained (the plots read both)."""
    rows = []
    for depth in depths:
        for width in widths:
            for scheme in ("post_ln", "magneto"):
                for lr in (1e-3, 1e-2):
                    for seed in seeds:
                        run = tmp_path / f"{scheme}{depth}{width}{lr}{seed}"
                        run.mkdir(parents=True)
                        bad = scheme == "post_ln" and lr == 1e-2
                        with open(run / "metrics.jsonl", "w") as f:
                            for step in range(1, 31):
                                loss = 7.0 if bad else 7.0 - step * 0.05 + seed * 0.01
                                f.write(json.dumps({"split": "train", "step": step,
                                                    "loss": loss}) + "\n")
                        rows.append({"cell": run.name, "scheme": scheme,
                                     "norm_type": "layernorm", "depth": depth,
                                     "hidden_size": width, "lr": lr, "seed": seed,
                                     "verdict": "stuck" if bad else "ok",
                                     "final_valid_loss": 7.0 if bad else 5.5 + seed * 0.01,
                                     "final_loss": 5.5, "run_dir": str(run),
                                     "grad_norm_init": [1.0 + i for i in range(depth)],
                                     "residual_rms_final": [0.5 * (i + 1) for i in range(depth)]})
    return rows


def test_plots_keep_every_title_label_and_legend_inside_the_canvas(tmp_path, monkeypatch):
    """The loss-curve title ran off both edges; the grad-norm tick labels were cut off."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from magneto_dist.plotting import DPI
    from magneto_dist.stability.plots import write_plots
    figures = []  # each figure as write_plots would save it (not encoded: only its layout)
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: figures.append(fig))
    for rows, expected in ((_synthetic_sweep(tmp_path / "a"), 7),
                           (_synthetic_sweep(tmp_path / "b", (2,), (32,), (1,)), 5)):
        figures.clear()
        paths = write_plots(rows, str(tmp_path))
        assert len(paths) == len(figures) == expected
        for fig, path in zip(figures, paths):
            canvas_agg = FigureCanvasAgg(fig)  # pyplot's was detached when the figure closed
            canvas_agg.draw()
            renderer = canvas_agg.get_renderer()
            canvas = fig.bbox
            assert fig.get_size_inches()[0] * DPI >= 500, path  # ~530 px a panel at least
            # each panel with its title, axis labels and drawn tick labels; the figure's title
            # and legend
            boxes = [ax.get_tightbbox(renderer) for ax in fig.axes if ax.get_visible()]
            boxes += [t.get_window_extent(renderer) for t in (fig._suptitle, *fig.legends)]
            assert fig._suptitle.get_text() and len(boxes) >= 2
            for box in boxes:
                assert (box.x0 >= -1 and box.y0 >= -1 and box.x1 <= canvas.x1 + 1
                        and box.y1 <= canvas.y1 + 1), (os.path.basename(path), box)


def test_dry_run_costs_each_cell_from_the_memory_planner_and_measured_step_times(
        sweep_file, tmp_path, capsys):
    from magneto_dist.config import with_vocab_size
    from magneto_dist.model import flops_per_token
    from magneto_dist.dims import ParallelDims
    from magneto_dist.stability.cost import Assumptions, sweep_costs
    from magneto_dist.training.memory_plan import GiB, Layout, MemoryPlanner
    from tools.stability_sweep import main

    overrides = ["grid.hidden_sizes=[32,64]", "train.micro_batch_size=4"]
    sweep = load_sweep(sweep_file, overrides, str(tmp_path), world_size=2)
    narrow, wide = sweep.cells()[0], sweep.cells()[-1]
    with open(tmp_path / "results.jsonl", "w") as f:  # an earlier cell of the narrow shape
        f.write(json.dumps({**_row(narrow), "nodes": 1, "gpus_per_node": 2,
                            "step_seconds": 0.25}) + "\n")
    rows = {r["cell"]: r for r in sweep_costs(sweep, 2, 1, 2, Assumptions(100.0, 0.5))}
    cfg = with_vocab_size(sweep.cell_config(wide), 8192)
    seq = cfg.model.max_seq_len
    memory = MemoryPlanner(cfg.model, cfg.train.precision, seq).plan(
        Layout(ParallelDims.of(cfg, 2), cfg.parallel.activation_checkpointing, 4))["total"]
    estimate = flops_per_token(cfg.model, seq) * 8 * seq / (2 * 100e12 * 0.5)
    assert rows[wide.name]["layout"] == "TP1 x PP1 x DP2 (ZeRO-1)"
    assert rows[wide.name]["memory_gib"] == pytest.approx(memory / GiB)
    assert rows[wide.name]["step_seconds"] == pytest.approx(estimate)
    assert not rows[wide.name]["measured"]
    assert rows[narrow.name]["measured"] and rows[narrow.name]["step_seconds"] == 0.25
    assert rows[narrow.name]["device_hours"] >= 5 * 0.25 * 2 / 3600
    assert main(["--config", sweep_file, "--out", str(tmp_path), "--dry-run", "--cluster",
                 "slurm", "--gpus-per-node", "2", "--device-tflops", "100", "--mfu", "0.5",
                 *overrides]) == 0
    out = capsys.readouterr().out
    total = sum(r["device_hours"] for r in rows.values())
    assert f"4 cells x 1 node(s) x 2 device(s): {total:,.1f} device-hours in all" in out
    assert "step times: 2 measured" in out and "2 estimated at 50% of 100 TFLOP/s" in out
    assert f"{memory / GiB:>9.2f}" in out and not (tmp_path / "jobs.jsonl").exists()


FAKE_SLURM = {  # the commands submitit calls, recording what they were given
    "srun": "exit 0",
    "sbatch": 'n=$(cat "$FAKE_SLURM/next" 2>/dev/null || echo 1001); echo $((n + 1)) > '
              '"$FAKE_SLURM/next"; cp "$1" "$FAKE_SLURM/sbatch_$n.sh"; '
              'echo "Submitted batch job $n"',
    "sacct": 'echo "JobID|State|NodeList"; while [ $# -gt 0 ]; do if [ "$1" = -j ]; then '
             'echo "$2|$(cat "$FAKE_SLURM/state_$2" 2>/dev/null || echo PENDING)|"; shift; '
             'fi; shift; done',
    "scancel": 'echo "$@" >> "$FAKE_SLURM/cancelled"'}


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    import submitit
    from submitit.slurm.slurm import SlurmInfoWatcher
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in FAKE_SLURM.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM", str(bin_dir))
    monkeypatch.setattr(submitit.SlurmJob, "watcher", SlurmInfoWatcher(delay_s=600))
    monkeypatch.setattr(cluster, "prepare_data", lambda sweep, log: 5.5)  # no training here
    return bin_dir


def test_slurm_jobs_sbatch_parameters_launcher_command_reattach_resubmit(
        sweep_file, tmp_path, fake_slurm):
    from submitit.core.utils import DelayedSubmission
    from tools.stability_sweep import main

    out = tmp_path / "out"
    args = ["--config", sweep_file, "--out", str(out), "--cluster", "slurm", "--detach",
            "--nodes-per-cell", "2", "--gpus-per-node", "4", "--partition", "gpu", "--account",
            "proj", "--time", "4:00:00", "--slurm", "qos=high", "--slurm", "exclusive",
            "train.global_batch_size=64"]

    def ledger():
        return [json.loads(line) for line in open(out / "jobs.jsonl")]

    assert main(args) == 0
    assert [(j["job_id"], j["attempt"]) for j in ledger()] == [("1001", 1), ("1002", 1)]
    sbatch = (fake_slurm / "sbatch_1001.sh").read_text().splitlines()
    for line in ("--nodes=2", "--gpus-per-node=4", "--ntasks-per-node=1", "--cpus-per-task=32",
                 "--partition=gpu", "--account=proj", "--time=240", "--qos=high",
                 "--signal=USR2@120", "--job-name=s:pre_ln-layernorm-L2-d64-lr0.001-s1-w0"):
        assert f"#SBATCH {line}" in sbatch, line
    assert "#SBATCH --exclusive" in sbatch
    assert any(x.startswith("srun ") and "-m submitit.core._submit" in x for x in sbatch)
    job = DelayedSubmission.load(out / "submitit" / "1001_submitted.pkl").function
    assert (job.nodes, job.gpus_per_node, job.entropy) == (2, 4, 5.5)
    hosts = ["gpu-a", "gpu-b"]
    command = job.command(Place("1001", 1, hosts))
    assert command == job.command(Place("1001", 0, hosts))  # one launcher per node, the same
    assert command[:11] == [sys.executable, os.path.join(ROOT, "launch", "ft_launch.py"),
                            "--nnodes", "2", "--nproc-per-node", "4", "--step-timeout", "auto",
                            "--rdzv-id", "1001", "--rdzv-endpoint"]
    assert command[11] == f"gpu-a:{rdzv_port('1001')}"
    assert command[12:14] == [os.path.join(ROOT, "launch", "pretrain_gpt.py"),
                              *job.overrides[:1]] and "train.lr=0.001" in command
    # rerun: both jobs pending, nothing submitted again
    assert main(args) == 0 and len(ledger()) == 2
    # job 1001 failed without a result: resubmitted; 1002 ended with its row: collected
    (fake_slurm / "state_1001").write_text("FAILED")
    (fake_slurm / "state_1002").write_text("COMPLETED")
    second = DelayedSubmission.load(out / "submitit" / "1002_submitted.pkl").function
    os.makedirs(second.run_dir)
    with open(os.path.join(second.run_dir, "metrics.jsonl"), "w") as f:
        for step in range(1, 6):
            f.write(json.dumps({"split": "train", "step": step, "loss": 6.0 - step / 10,
                                "time": step}) + "\n")
    assert second.submission == ledger()[1]["submission"]
    with open(second.result_path, "w") as f:
        json.dump(result_row(second, 0, None, "1002", 9.0, 0.0), f)
    assert main(args) == 0
    assert [(j["job_id"], j["attempt"]) for j in ledger()][2:] == [("1003", 2)]
    (row,) = load_results(str(out / "results.jsonl"))
    assert (row["cell"], row["job_id"], row["attempts"], row["steps_done"]) == (
        second.name, "1002", 1, 5)
    assert (out / "report.md").exists()
    # --cancel: scancel for the live job; then its last allowed attempt fails: a crashed row
    assert main([*args, "--cancel"]) == 0
    assert (fake_slurm / "cancelled").read_text().split() == ["1003"]
    (fake_slurm / "state_1003").write_text("CANCELLED")
    assert main([*args, "--max-attempts", "2"]) == 0 and len(ledger()) == 3
    lost = load_results(str(out / "results.jsonl"))[-1]
    assert lost["verdict"] == "crashed" and lost["job_id"] == "1003"
    assert lost["reason"].startswith("2 job(s) ended without a result (last: job 1003, state "
                                     "CANCELLED); see ")


def test_a_submission_defers_signals_without_blocking_them_in_the_jobs_it_starts():
    """Submissions held SIGTERM off with the signal mask, which every process started meanwhile
    inherits: submitit's local controller, its job and the trainer then never stopped on
    SIGTERM (a timed-out job could not make its trainer save; Ctrl-C stopped nothing)."""
    import signal
    import subprocess

    got = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
    try:
        with cluster.signals_held():
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
            os.kill(os.getpid(), signal.SIGTERM)  # a Ctrl-C or SIGTERM during the submission
            assert got == []
        assert got == [signal.SIGTERM]  # delivered once the submission is recorded
        with open(f"/proc/{child.pid}/status") as f:
            blocked = int(next(x for x in f if x.startswith("SigBlk:")).split()[1], 16)
        assert not blocked & (1 << (signal.SIGTERM - 1) | 1 << (signal.SIGINT - 1))
    finally:
        signal.signal(signal.SIGTERM, previous)
        child.kill()
        child.wait()
