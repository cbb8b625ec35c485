"""restarts.jsonl bookkeeping of the fault-tolerant launcher, without processes."""
import json
import os
import re
import time
from types import SimpleNamespace

from magneto_dist.checkpoint import tags as ckpt
from magneto_dist.launcher.agent import SupervisingAgent
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


def write_rows(run_dir, rows, name="metrics.jsonl"):
    with open(run_dir / name, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def complete_tag(run_dir, step):
    tag = run_dir / "checkpoints" / f"global_step{step}"
    tag.mkdir(parents=True)
    (tag / ckpt.COMPLETE).write_text(json.dumps({"step": step}))


def test_training_redone_is_the_time_of_the_replayed_steps(tmp_path):
    """16 steps of 0.6 s, the checkpoint at step 6, then a 50-s hang: the next attempt redoes
    steps 7-16, 6 s of training. It was reported as everything since step 6's row, hang
    included (56 s), and with none replayed as the hang itself."""
    t0 = time.time() - 60
    write_rows(tmp_path, [train(s, t0 + 0.6 * s) for s in range(1, 17)])
    complete_tag(tmp_path, 6)
    log = IncidentLog(str(tmp_path), node="n1")
    log.started = t0 - 1
    row = log.record(attempt=0, cause="hang", rank=1)
    assert (row["step_reached"], row["resumed_from"]) == (16, 6)
    assert abs(row["seconds_lost"] - 6.0) < 0.02, row
    assert 49 < row["seconds_stalled"] < 52, row  # from step 16's row to the detection
    complete_tag(tmp_path, 16)
    row = log.record(attempt=1, cause="hang", rank=1)
    assert row["seconds_lost"] == 0 and row["resumed_from"] == 16, row
    assert row["seconds_stalled"] == 0  # nothing ran since the previous incident


def test_goodput_does_not_count_a_hang_before_the_first_checkpoint(tmp_path):
    """Steps 1-3 (1 s each), a hang until the incident 120 s later, no checkpoint: the next
    attempt starts fresh (no resume row) and redoes steps 1-10. The time between the hung
    attempt's last row and the fresh attempt's first was counted as step 1's (goodput 97%)."""
    t0 = time.time() - 141
    log = IncidentLog(str(tmp_path), node="n1")
    log.started = t0
    write_rows(tmp_path, [train(s, t0 + s) for s in range(1, 4)])
    write_rows(tmp_path, [{"time": t0 + 123, "cause": "hang", "seconds_lost": 2.0,
                           "seconds_stalled": 120.0}], name="restarts.jsonl")
    write_rows(tmp_path, [train(s, t0 + 130 + s) for s in range(1, 11)])
    summary = log.summary()
    assert re.search(r"goodput 6% \(9 s of kept steps in 14[01] s\)", summary), summary
    assert "1 incident(s), 2 s of training redone, 120 s stalled" in summary, summary


def failure(pid, exitcode, timestamp=100):
    return SimpleNamespace(pid=pid, exitcode=exitcode, timestamp=timestamp)


def test_the_failing_rank_is_blamed_not_its_peers(tmp_path):
    """torch elastic's failure timestamps are whole seconds (our ranks write no error file),
    so a failed rank and the peers that lost it tie; the lowest rank was blamed (a hang of
    rank 1 was recorded as rank 0's exit 1)."""
    SupervisingAgent.incidents = IncidentLog(str(tmp_path), node="n1")
    SupervisingAgent.stacks_dir = str(tmp_path / "stacks")
    os.mkdir(SupervisingAgent.stacks_dir)
    agent = SupervisingAgent.__new__(SupervisingAgent)  # the hooks only, no torch elastic
    agent._hung_pids, agent._attempt, agent._remaining_restarts = set(), 0, 5
    cases = [({0: failure(10, 1), 1: failure(11, -9)}, {11}, (1, "hang")),
             ({0: failure(10, 1), 1: failure(11, -9)}, set(), (1, "signal SIGKILL")),
             ({0: failure(10, -15), 1: failure(11, 1)}, set(), (1, "exit 1")),
             ({0: failure(10, 1), 1: failure(11, 137)}, set(), (1, "exit 137")),
             ({0: failure(10, 1, 99), 1: failure(11, -9, 100)}, set(), (0, "exit 1"))]
    for failures, hung, blamed in cases:
        agent._hung_pids = set(hung)
        agent.on_failure(SimpleNamespace(failures=failures))
        row = json.loads((tmp_path / "restarts.jsonl").read_text().splitlines()[-1])
        assert (row["rank"], row["cause"]) == blamed, (failures, row)
    assert agent._remaining_restarts == 5
    agent.on_failure(SimpleNamespace(failures={0: failure(10, -15), 1: failure(11, 2)}))
    assert agent._remaining_restarts == 0  # rank 1's config error is not retried


WAITING = """Thread 0x00007f01 (most recent call first):
  File "/usr/lib/python3.11/threading.py", line 320 in wait

Current thread 0x00007f02 (most recent call first):
  File "/venv/torch/distributed/distributed_c10d.py", line 2501 in all_reduce
  File "/venv/deepspeed/comm/torch.py", line 290 in all_reduce
  File "/repo/magneto_dist/training/loop.py", line 250 in step
  File "/repo/launch/pretrain_gpt.py", line 13 in <module>
"""
HUNG = """Current thread 0x00007f03 (most recent call first):
  File "/repo/magneto_dist/resilience/faults.py", line 104 in inject
  File "/repo/magneto_dist/training/loop.py", line 236 in step
  File "/repo/launch/pretrain_gpt.py", line 13 in <module>
"""


def test_a_hang_is_blamed_on_the_rank_that_was_not_waiting_for_its_peers(tmp_path):
    """Every rank's step timer expires when one rank hangs (the others wait for it in a
    collective), and the watchdog kills them all in one pass: rank 0 was blamed. The stacks
    each rank dumps before the kill tell them apart."""
    SupervisingAgent.incidents = IncidentLog(str(tmp_path), node="n1")
    SupervisingAgent.stacks_dir = str(tmp_path / "stacks")
    os.mkdir(SupervisingAgent.stacks_dir)
    for pid, dump in ((10, WAITING), (11, HUNG)):
        (tmp_path / "stacks" / f"{pid}.stacks").write_text(dump)
    agent = SupervisingAgent.__new__(SupervisingAgent)
    agent._hung_pids, agent._attempt, agent._remaining_restarts = {10, 11}, 0, 5
    agent.on_failure(SimpleNamespace(failures={0: failure(10, -9), 1: failure(11, -9)}))
    row = json.loads((tmp_path / "restarts.jsonl").read_text())
    assert (row["rank"], row["cause"]) == (1, "hang"), row
    assert row["where"] == "/repo/magneto_dist/resilience/faults.py:104 in inject"
    assert os.listdir(tmp_path / "stacks") == []  # the next attempt's ranks start afresh


def straggler(step, rank, t, host="node-b", section="data"):
    return {"split": "straggler", "step": step, "rank": rank, "host": host, "section": section,
            "ratio": 40.0, "slowdown": 3.0, "late_s": 0.5, "step_s": 0.75, "first_step": step - 4,
            "time": t}


def test_an_incident_says_which_node_was_slow_before_it(tmp_path, caplog):
    """The failed attempt's last straggler check, not an earlier attempt's, nor an earlier
    check of the same attempt (whose straggler may have recovered since)."""
    t0 = time.time() - 60
    write_rows(tmp_path, [train(s, t0 + s) for s in range(1, 11)] + [
        straggler(5, 3, t0 + 5.5, host="old-attempt")])
    log = IncidentLog(str(tmp_path), node="n1")
    log.started = t0 + 8  # this launch's attempt began after step 7
    write_rows(tmp_path, [straggler(10, 1, t0 + 10.5, section="forward"),
                          straggler(15, 2, t0 + 15.5), straggler(15, 1, t0 + 15.5)])
    SupervisingAgent.incidents = log
    SupervisingAgent.stacks_dir = str(tmp_path / "stacks")
    os.mkdir(SupervisingAgent.stacks_dir)
    agent = SupervisingAgent.__new__(SupervisingAgent)
    agent._hung_pids, agent._attempt, agent._remaining_restarts = set(), 0, 5
    with caplog.at_level("WARNING", logger="ft_launch"):
        agent.on_failure(SimpleNamespace(failures={0: failure(10, 1), 1: failure(11, -9)}))
    row = json.loads((tmp_path / "restarts.jsonl").read_text())
    assert [(s["rank"], s["host"], s["section"], s["step"]) for s in row["slow"]] == [
        (2, "node-b", "data", 15), (1, "node-b", "data", 15)], row["slow"]
    assert "straggler check at step 15 named rank 2 on node-b: 3.00x the step time, behind " \
           "in data" in caplog.text
    assert log.record(attempt=1, cause="exit 1")["slow"] == []  # none since that incident


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


def test_a_step_goes_on_unwatched_once_the_agent_stopped_its_timer_server(tmp_path):
    """SIGTERM to the launcher: the agent stops its timer server, then asks the ranks to stop.
    The step and the save on the way out raised BrokenPipeError (the rank died instead of
    saving); they now finish unwatched."""
    from magneto_dist.resilience.watchdog import StepWatchdog

    watchdog = StepWatchdog("30", timer_file=str(tmp_path / "gone"))  # no server reads it
    assert watchdog.enabled
    with watchdog.expires():
        ran = True
    with watchdog.expires(long=True):
        saved = True
    assert ran and saved and not watchdog.enabled


def test_the_launcher_reads_the_training_scripts_own_default_config():
    """ft_launch writes incidents into the run directory of the command it supervises: without
    --config that is the script's own default (a BERT run's incidents once went to gpt_tiny)."""
    from magneto_dist.launcher.cli import training_config

    def run_dir_of(script, args):
        return training_config(script, args).logging.run_dir

    assert run_dir_of("launch/pretrain_bert.py", []) == "runs/bert_tiny"
    assert run_dir_of("/abs/launch/pretrain_gpt.py", []) == "runs/gpt_tiny"
    assert run_dir_of("launch/pretrain_bert.py", ["logging.run_dir=elsewhere"]) == "elsewhere"
