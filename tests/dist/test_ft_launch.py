"""launch/ft_launch.py on one machine ("nodes" are launchers on localhost): kills, a hang, a
lost node, SIGTERM and a config error, each judged by the losses against an uninterrupted run."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from .gpt_runs import TINY, read_metrics, wait_for_steps
from .ranks import ROOT, free_port, kill_group
from .test_reshard import DOCUMENTS

COMMON = ["train.train_iters=24", "checkpoint.save_interval=2", "checkpoint.keep_last=3",
          "train.micro_batch_size=2", "train.global_batch_size=8"]


def script(run_dir, cache_dir, *overrides):
    return ["launch/pretrain_gpt.py", *TINY, f"data.cache_dir={cache_dir}",
            f"logging.run_dir={run_dir}", *COMMON, *overrides]


def ft_launch(args, nproc=2, extra_env=None, launcher_args=(), prefix=()):
    cmd = [*prefix, sys.executable, "launch/ft_launch.py", "--nproc-per-node", str(nproc),
           "--monitor-interval", "0.5", *launcher_args, *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(extra_env or {}))
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(proc, timeout=600):
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        kill_group(proc)
    return proc.returncode, out


def final_losses(run_dir):
    """Step -> loss, the last occurrence of each step (rows after a resume replay steps)."""
    return {r["step"]: r["loss"] for r in read_metrics(run_dir)}


def incidents(run_dir):
    path = run_dir / "restarts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def reference(shared_run, cache_dir, ranks=2, *overrides):
    """The uninterrupted run's losses (once per session for each set of arguments)."""
    return final_losses(shared_run(lambda run_dir: script(run_dir, cache_dir, *overrides), ranks))


def test_ten_random_kills_finish_with_the_uninterrupted_losses(tmp_path, cache_dir, shared_run):
    rng = random.Random(2026)
    steps = sorted(rng.sample(range(2, 24), 8))
    faults = [f"kill_at_step:{rng.randrange(2)}:{s}" for s in steps]
    faults += ["kill_in_save:1:6", "kill_in_save:0:14"]  # two mid-save, leaving tags unmarked
    run_dir = tmp_path / "run"
    code, out = finish(ft_launch(script(run_dir, cache_dir), launcher_args=["--max-restarts", "12"],
                                 extra_env={"MAGNETO_DIST_FAULT": ",".join(faults),
                                            "MAGNETO_DIST_FAULT_ONCE_DIR": str(tmp_path / "once")}))
    assert code == 0, out[-5000:]
    rows = incidents(run_dir)
    blamed = [(int(fault.split(":")[1]), "signal SIGKILL") for fault in faults[:8]]
    blamed += [(1, "exit 137"), (0, "exit 137")]  # a kill in a save: os._exit(137)
    assert sorted((r["rank"], r["cause"]) for r in rows) == sorted(blamed), rows
    assert "10 incident(s)" in out and "goodput" in out
    assert final_losses(run_dir) == reference(shared_run, cache_dir)  # bit for bit, all 24 steps


def test_a_hung_rank_is_killed_within_two_timeouts(tmp_path, cache_dir, shared_run):
    timeout_s = 6
    run_dir = tmp_path / "run"
    code, out = finish(ft_launch(script(run_dir, cache_dir),
                                 launcher_args=["--step-timeout", str(timeout_s)],
                                 extra_env={"MAGNETO_DIST_FAULT": "hang:1:7",
                                            "MAGNETO_DIST_FAULT_ONCE_DIR": str(tmp_path / "once")}))
    assert code == 0, out[-5000:]
    (row,) = incidents(run_dir)
    # rank 0's timer expired too (waiting for rank 1 in a collective): the stacks tell them apart
    assert (row["cause"], row["rank"], row["step_reached"]) == ("hang", 1, 6), row
    assert "magneto_dist/resilience/faults.py:" in row["where"] and "in inject" in row["where"]
    hung_since = [r["time"] for r in read_metrics(run_dir) if r["step"] == 6][0]
    assert row["time"] - hung_since < 2 * timeout_s, (row, hung_since)
    # the hang is time stalled, not training to redo (the checkpoint of step 6 holds it all)
    assert row["resumed_from"] == 6 and row["seconds_lost"] == 0, row
    assert timeout_s <= row["seconds_stalled"] == round(row["time"] - hung_since, 2), row
    assert final_losses(run_dir) == reference(shared_run, cache_dir)


def test_config_errors_are_not_retried(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    code, out = finish(ft_launch(script(run_dir, cache_dir, f"data.prefixes=[{tmp_path}/none]")))
    assert code == 2, out[-3000:]
    assert "not restarting: rank" in out and "exited 2 (config or data error)" in out
    assert len(incidents(run_dir)) == 1
    code, out = finish(ft_launch(script(run_dir, cache_dir, "train.zero_stage=7")))
    assert code == 2 and "config error: " in out and "train.zero_stage" in out, out[-3000:]
    port = free_port()  # nobody serves a rendezvous store there
    code, out = finish(ft_launch(script(run_dir, cache_dir), launcher_args=[
        "--nnodes", "2", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-conf",
        "is_host=false,join_timeout=2"]))
    assert code == 2, out[-3000:]
    assert f"ft_launch: error: cannot reach the rendezvous store at 127.0.0.1:{port} within 2 s" \
        in out
    code, out = finish(ft_launch(script(run_dir, cache_dir), launcher_args=["--nnodes", "2"]))
    assert code == 2 and "--nnodes 2 needs --rdzv-endpoint HOST:PORT" in out, out[-3000:]


def test_sigterm_saves_exits_for_requeue_and_resumes_exactly(tmp_path, cache_dir, shared_run):
    run_dir = tmp_path / "run"
    args = script(run_dir, cache_dir, "checkpoint.save_interval=0")
    proc = ft_launch(args)
    wait_for_steps(run_dir, proc, rows=5)
    os.kill(proc.pid, signal.SIGTERM)
    code, out = finish(proc, timeout=120)
    assert code == 75, out[-5000:]
    stopped_at = read_metrics(run_dir)[-1]["step"]
    marker = run_dir / "checkpoints" / f"global_step{stopped_at}" / "complete.json"
    assert marker.exists(), out[-3000:]
    assert f"[ft_launch] stopped by SIGTERM: the ranks saved step {stopped_at}; exit 75" in out
    assert [r["cause"] for r in incidents(run_dir)] == ["preempted"]
    code, out = finish(ft_launch(args))  # the requeued job
    assert code == 0, out[-5000:]
    assert final_losses(run_dir) == reference(shared_run, cache_dir, 2,
                                              "checkpoint.save_interval=0")


def fake_hosts_available() -> bool:
    """Whether this machine lets a launcher run under a host name of its own (a UTS namespace:
    root, or CAP_SYS_ADMIN)."""
    try:
        return subprocess.run(["unshare", "--uts", "true"], capture_output=True,
                              timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def on_host(name):
    """A command prefix that runs the launcher with `name` as its host name."""
    return ["unshare", "--uts", "sh", "-c", f'hostname {name} && exec "$@"', "sh"]


def test_losing_rank_0s_node_continues_on_the_other_with_the_same_global_batch(tmp_path,
                                                                               cache_dir,
                                                                               shared_run):
    """Two launchers of 2 ranks ("node-a" and "node-b": host names of their own where the
    machine allows it), a rendezvous store of its own; the launcher of global rank 0 and its
    ranks are killed: the other re-forms alone (DP 4 -> 2, accumulation doubles), its new rank
    0 takes over the dead host's run.lock once the lock's heartbeat has stopped (refused
    before, exit 2: another host's lock was never stale), and resumes through the universal
    checkpoint; the losses match the uninterrupted 4-rank run within 1e-5."""
    hosts = fake_hosts_available()
    port = free_port()
    store = subprocess.Popen([sys.executable, "tools/rdzv_store.py", "--port", str(port)],
                             cwd=ROOT, start_new_session=True)
    run_dir = tmp_path / "run"
    launcher = ["--nnodes", "1:2", "--rdzv-endpoint", f"127.0.0.1:{port}", "--local-addr",
                "127.0.0.1", "--rdzv-conf",
                "is_host=false,last_call_timeout=3,keep_alive_interval=1,keep_alive_max_attempt=3"]
    nodes = {}
    try:
        for name in ("node-a", "node-b"):
            nodes[name] = ft_launch(script(run_dir, cache_dir), launcher_args=launcher,
                                    prefix=on_host(name) if hosts else ())
        wait_for_steps(run_dir, nodes["node-b"], rows=7, timeout=300)
        holder = json.loads((run_dir / "run.lock").read_text())
        if hosts:
            lost = nodes.pop(holder["host"])
        else:  # one host name: rank 0's launcher is its ranks' parent
            lost = nodes.pop(next(n for n, p in nodes.items() if holder["pid"] in children(p.pid)))
        kill_group(lost)  # the node: its launcher and every rank in its session
        (survivor,) = nodes.values()
        code, out = finish(survivor)
    finally:
        kill_group(store)
        for proc in nodes.values():
            kill_group(proc)
    assert code == 0, out[-5000:]
    assert "changing layouts" in out and "TP1 x PP1 x DP2" in out, out[-3000:]
    assert "node lost" in [r["cause"] for r in incidents(run_dir)]
    assert f"removing stale lock {run_dir}/run.lock" in out, out[-3000:]
    if hosts:
        assert f"names pid {holder['pid']} on {holder['host']}" in out, out[-3000:]
    expected, got = reference(shared_run, cache_dir, 4), final_losses(run_dir)
    assert sorted(got) == list(range(1, 25))
    assert max(abs(got[s] - expected[s]) for s in got) < 1e-5, (got, expected)


def sigterm_caught(pid) -> bool:
    """Whether the process has a SIGTERM handler (the SigCgt mask of /proc/PID/status)."""
    with open(f"/proc/{pid}/status") as f:
        caught = next(line for line in f if line.startswith("SigCgt:")).split()[1]
    return bool(int(caught, 16) & (1 << (signal.SIGTERM - 1)))


def test_sigterm_before_any_step_exits_for_requeue_and_says_nothing_was_saved(tmp_path,
                                                                              cache_dir):
    """SIGTERM while the launcher imported torch exited 143 (the job's `[ $? -eq 75 ]` requeue
    line would not requeue), and while the ranks started up it said "the ranks saved" though
    no step had run."""
    run_dir = tmp_path / "run"
    proc = ft_launch(script(run_dir, cache_dir))
    deadline = time.monotonic() + 60
    while not sigterm_caught(proc.pid):  # as soon as the launcher can catch it (its imports)
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGTERM)
    code, out = finish(proc, timeout=120)
    assert code == 75 and "[ft_launch] stopped by SIGTERM before any rank started: nothing to " \
        "save; exit 75 (requeue the job)" in out, out[-3000:]
    proc = ft_launch(script(run_dir, cache_dir))
    for line in proc.stdout:  # the launcher is ready: the rendezvous and the ranks start now
        if line.startswith("[ft_launch] hangs are watched (--step-timeout auto)"):
            break
    os.kill(proc.pid, signal.SIGTERM)
    code, out = finish(proc, timeout=120)
    assert code == 75 and "[ft_launch] stopped by SIGTERM: no step had run in this launch, " \
        "nothing to save (the next run starts from scratch); exit 75" in out, out[-3000:]
    assert [r["cause"] for r in incidents(run_dir)] == ["preempted"]


def children(pid):
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            found += [int(p) for p in f.read().split()]
    return found


def test_ranks_die_with_a_killed_launcher(tmp_path, cache_dir):
    """Workers run in sessions of their own; a launcher killed by SIGKILL used to leave them
    running as orphans. Now they die with it (PR_SET_PDEATHSIG)."""
    run_dir = tmp_path / "run"
    proc = ft_launch(script(run_dir, cache_dir, "train.train_iters=100000",
                            "checkpoint.save_interval=0"))
    ranks = []
    try:
        wait_for_steps(run_dir, proc, rows=3)
        ranks = children(proc.pid)
        assert len(ranks) == 2, ranks
        os.kill(proc.pid, signal.SIGKILL)  # the launcher alone, not its process group
        deadline = time.monotonic() + 20
        while any(os.path.exists(f"/proc/{p}") for p in ranks) and time.monotonic() < deadline:
            time.sleep(0.2)
        alive = [p for p in ranks if os.path.exists(f"/proc/{p}")
                 and open(f"/proc/{p}/stat").read().split()[2] != "Z"]
        assert not alive, alive
    finally:
        kill_group(proc)
        proc.wait()
        for p in ranks:  # if the test failed: leave nothing behind
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass


# the long-sequence layouts: CP2 with packed documents (the ring's blocks, the chunks'
# positions and the documents' masks are all rebuilt from the checkpoint's data position) and
# TP2+SP with dropout (the SP region's masks draw from the per-TP-rank stream, restored too)
LONG_SEQUENCE = {
    "cp2_documents": ["parallel.context_parallel_size=2", *DOCUMENTS],
    "tp2_sp_dropout": ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true",
                       "model.dropout=0.1"]}


@pytest.mark.parametrize("layout", LONG_SEQUENCE)
def test_kills_under_long_sequence_layouts_resume_exactly(tmp_path, cache_dir, shared_run,
                                                          layout):
    """A rank killed mid-run and another killed inside a save: every step's loss equals the
    uninterrupted run's of the same layout bit for bit."""
    faults = "kill_at_step:1:5,kill_in_save:0:10"
    run_dir, args = tmp_path / "run", LONG_SEQUENCE[layout]
    code, out = finish(ft_launch(script(run_dir, cache_dir, "train.train_iters=12", *args),
                                 extra_env={"MAGNETO_DIST_FAULT": faults,
                                            "MAGNETO_DIST_FAULT_ONCE_DIR": str(tmp_path / "once")}))
    assert code == 0, out[-5000:]
    assert sorted((r["rank"], r["cause"]) for r in incidents(run_dir)) == \
        [(0, "exit 137"), (1, "signal SIGKILL")]
    assert final_losses(run_dir) == reference(shared_run, cache_dir, 2, "train.train_iters=12",
                                              *args)
