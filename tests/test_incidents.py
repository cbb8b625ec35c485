"""restarts.jsonl bookkeeping of the fault-tolerant launcher, without processes."""
import json

from magneto_dist.checkpoint import manager as ckpt
from magneto_dist.launcher.incidents import IncidentLog, cause_of, productive_seconds


def test_cause_names_exit_codes_signals_and_hangs():
    assert cause_of(1, hung=False) == "exit 1"
    assert cause_of(-9, hung=False) == "signal SIGKILL"
    assert cause_of(-9, hung=True) == "hang"


def train(step, t):
    return {"split": "train", "step": step, "time": t, "loss": 1.0}


def test_productive_time_counts_only_the_steps_that_were_kept():
    rows = [train(1, 10.0), train(2, 11.0), train(3, 12.0),          # attempt 1 (step 3 redone)
            {"split": "resume", "step": 2, "time": 20.0},
            train(3, 21.5), train(4, 22.5)]
    # step 2 (1 s) and the redone step 3 (1.5 s) and step 4 (1 s); step 1 has no start time
    assert productive_seconds(rows, since=0.0) == 3.5
    assert productive_seconds(rows, since=21.0) == 2.5


def test_an_incident_row_says_where_the_next_attempt_starts(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(
        json.dumps(r) + "\n" for r in [train(s, 100.0 + s) for s in range(1, 8)]) + '{"spl')
    tag = tmp_path / "checkpoints" / "global_step4"
    tag.mkdir(parents=True)
    (tag / ckpt.COMPLETE).write_text(json.dumps({"step": 4}))
    (tmp_path / "checkpoints" / "global_step6").mkdir()  # incomplete: never resumed from
    row = IncidentLog(str(tmp_path), node="n1").record(attempt=0, cause="exit 1", rank=3)
    assert (row["step_reached"], row["resumed_from"], row["node"], row["rank"]) == (7, 4, "n1", 3)
    assert row["seconds_lost"] >= 0
    assert json.loads((tmp_path / "restarts.jsonl").read_text()) == row


def test_step_allowance_is_long_at_first_and_for_saves_and_follows_measured_steps():
    from magneto_dist.resilience.watchdog import AUTO_MIN_S, LONG_FACTOR, StepWatchdog
    fixed = StepWatchdog("30", timer_file=None)
    assert not fixed.enabled  # no launcher: every step runs without a timer
    assert fixed.allowance(long=False) == 30.0 * LONG_FACTOR  # first steps
    fixed.durations = [1.0] * 3
    assert fixed.allowance(long=False) == 30.0 and fixed.allowance(long=True) == 300.0
    auto = StepWatchdog("auto", timer_file=None)
    assert auto.allowance(long=False) == AUTO_MIN_S * LONG_FACTOR
    auto.durations = [2.0] * 5
    assert auto.allowance(long=False) == AUTO_MIN_S  # 5 x 2 s is under the floor
    auto.durations = [30.0] * 5
    assert auto.allowance(long=False) == 150.0 and auto.allowance(long=True) == 1500.0


def test_the_launcher_reads_the_training_scripts_own_default_config():
    """ft_launch writes incidents into the run directory of the command it supervises: without
    --config that is the script's own default (a BERT run's incidents once went to gpt_tiny)."""
    from magneto_dist.launcher.cli import run_dir_of

    assert run_dir_of("launch/pretrain_bert.py", []) == "runs/bert_tiny"
    assert run_dir_of("/abs/launch/pretrain_gpt.py", []) == "runs/gpt_tiny"
    assert run_dir_of("launch/pretrain_bert.py", ["logging.run_dir=elsewhere"]) == "elsewhere"
