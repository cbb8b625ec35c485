"""launch/ft_launch.py: one command per node; torchrun's flags plus --step-timeout.

    python launch/ft_launch.py --nproc-per-node 8 --nnodes 2:4 --rdzv-endpoint HOST:PORT \
        [--max-restarts 10] [--step-timeout auto|SECONDS|0] launch/pretrain_gpt.py --config ...

Defaults that differ from torchrun's, each from a measurement on torch 2.13 with gloo: the c10d
rendezvous (the static one hung on restart), 10 restarts, the rendezvous settings RDZV_DEFAULTS,
workers that do not share the agent's store (restarts raced on it: 2 of 6 runs hung connecting
to the dead attempt's addresses), hang detection on (--step-timeout auto), and on one machine a
free local port. Exit codes (errors.ExitCode): OK when done, INTERRUPTED (75) when stopped by
SIGTERM (requeue: the next run resumes from the newest complete checkpoint), the training
script's own codes that no restart can fix (errors.NOT_RETRIED), CONFIG (2) for a launch that
cannot work (bad flags, a node count the configured batch cannot use), FAILED (1) when out of
restarts.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import sys
import tempfile
from typing import Dict, List, Optional

from torch.distributed import run as torchrun
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher import api as launcher_api

from ..checkpoint.reshard import refusal
from ..compat.elastic import install_agent, rendezvous_hosted_here
from ..config import Config, load_config
from ..dims import (LayoutError, ParallelDims, data_parallel_size, model_parallel_size,
                    model_parallel_sizes, model_parallel_text)
from ..errors import NOT_RETRIED, ConfigError, ExitCode
from ..launch_env import default_config, task_of_script
from ..resilience.watchdog import AUTO_FACTOR, AUTO_MIN_S, LONG_FACTOR, STACKS_ENV, \
    STEP_TIMEOUT_ENV, SUPERVISED_ENV
from ..training.metrics import process_start_time
from .agent import SupervisingAgent, culprit
from .incidents import IncidentLog

# torch elastic's c10d rendezvous settings under this launcher; --rdzv-conf adds keys and
# overrides these one by one. A node whose agent has not written its keep-alive for
# keep_alive_interval x keep_alive_max_attempt seconds is dropped, and the survivors' round
# closes last_call_timeout after enough nodes joined, so a lost node costs about the sum before
# the survivors restart. torch's own 5 s x 3 keep-alive, not 1 s x 3: three missed beats (a few
# seconds of a busy network, store or agent) drop a live node, which costs every node a
# restart. Measured with tools/bench_recovery.py --lose-node: the group re-formed 17.5 s after
# the kill (10.0 s with 1 s x 3); torch's 30-s last call would only wait longer.
RDZV_DEFAULTS = {"last_call_timeout": "5", "keep_alive_interval": "5",
                 "keep_alive_max_attempt": "3"}


class LaunchError(ConfigError):
    """Flags that cannot work together (exit 2, said before anything starts)."""
    label = "ft_launch: error"


def parser():
    p = torchrun.get_args_parser()
    p.description = __doc__.split("\n")[0]
    p.set_defaults(rdzv_backend="c10d", max_restarts=10, rdzv_conf="")
    p.add_argument("--step-timeout", default="auto",
                   help="seconds an optimizer step may take before its rank is killed and the "
                        "group restarted; 'auto' (the default): 5x the median step time, at "
                        "least 60 s; 0: no hang detection (a stopped rank then hangs the job "
                        "until the process group's timeout). The first steps, evaluations and "
                        "checkpoint saves get 10x.")
    return p


def rdzv_conf(given: str) -> str:
    """RDZV_DEFAULTS with the user's --rdzv-conf keys on top."""
    conf: Dict[str, str] = dict(RDZV_DEFAULTS)
    for item in filter(None, (part.strip() for part in given.split(","))):
        key, _, value = item.partition("=")
        conf[key.strip()] = value.strip()
    return ",".join(f"{k}={v}" for k, v in conf.items())


def training_config(script: str, script_args: List[str]) -> Config:
    """The training command's config: its --config (else the script's own default config, as
    the script itself would read it) and overrides."""
    task = task_of_script(script)
    config = default_config(task) if task else None
    overrides, rest = [], list(script_args)
    while rest:
        arg = rest.pop(0)
        if arg == "--config" and rest:
            config = rest.pop(0)
        elif arg.startswith("--config="):
            config = arg.split("=", 1)[1]
        elif "=" in arg and not arg.startswith("-"):
            overrides.append(arg)
    return load_config(config, overrides)


def check_args(args) -> Optional[str]:
    try:
        min_nodes, max_nodes = torchrun.parse_min_max_nnodes(args.nnodes)
    except (ValueError, RuntimeError):
        return f"--nnodes {args.nnodes!r}: a number of nodes, or MIN:MAX"
    if not 1 <= min_nodes <= max_nodes:
        return f"--nnodes {args.nnodes}: needs 1 <= MIN <= MAX"
    if max_nodes > 1 and not args.rdzv_endpoint:
        return (f"--nnodes {args.nnodes} needs --rdzv-endpoint HOST:PORT (the same on every "
                "node; e.g. the first node of the Slurm allocation)")
    try:
        torchrun.determine_local_world_size(args.nproc_per_node)
    except ValueError as err:
        return f"--nproc-per-node {args.nproc_per_node}: {err}"
    if args.step_timeout != "auto":
        try:
            float(args.step_timeout)
        except ValueError:
            return f"--step-timeout {args.step_timeout!r}: a number of seconds, 0, or auto"
    return None


def node_count_problem(args, cfg: Config) -> Optional[str]:
    """Why some node count in --nnodes's range cannot run the configured layout, or None.
    Losing a node changes the data-parallel size, and the global batch must stay divisible by
    micro-batch x DP on every count the group may re-form with (else the survivors exit 2,
    never retried); a layout change must also be one the checkpoint can be resumed in."""
    min_nodes, max_nodes = torchrun.parse_min_max_nnodes(args.nnodes)
    per_node = torchrun.determine_local_world_size(args.nproc_per_node)
    layouts, fails, batch_fails = {}, {}, False
    for nodes in range(max_nodes, min_nodes - 1, -1):
        try:
            layouts[nodes] = ParallelDims.of(cfg, nodes * per_node).layout
        except LayoutError as err:
            fails[nodes] = str(err)
            batch_fails = True
            continue
        widest = layouts[max(layouts)]  # where a group that lost nodes resumes from
        why = refusal(widest, layouts[nodes]) if layouts[nodes] != widest else None
        if why:
            fails[nodes] = why
    works = sorted(set(layouts) - set(fails))
    if not fails:
        return None
    t = cfg.train
    first = min(fails)
    advice = (f"give --nnodes only working counts (e.g. {_widest_range(works)})" if works else
              "no count in the range works")
    return (f"--nnodes {args.nnodes} with --nproc-per-node {per_node} ("
            f"{model_parallel_text(model_parallel_sizes(cfg))}, "
            f"train.micro_batch_size={t.micro_batch_size}, train.global_batch_size="
            f"{t.global_batch_size}, train.zero_stage={t.zero_stage}): the run cannot continue "
            f"on {_counts(sorted(fails))} node(s) (on {first}: {fails[first]}); node counts that "
            f"work: {_counts(works) or 'none'}. {advice[0].upper()}{advice[1:]}"
            + (f", or {_batch_for_all(cfg, per_node, min_nodes, max_nodes)}" if batch_fails
               else ""))


def _batch_for_all(cfg: Config, per_node: int, min_nodes: int, max_nodes: int) -> str:
    """The smallest global batch from the configured one up that every count keeps."""
    t, sizes = cfg.train, model_parallel_sizes(cfg)
    replicas = [data_parallel_size(sizes, nodes * per_node)
                for nodes in range(min_nodes, max_nodes + 1)]
    if None in replicas:
        return (f"a multiple of {model_parallel_text(sizes)} = {model_parallel_size(sizes)} "
                "ranks on every count")
    step = math.lcm(*(t.micro_batch_size * dp for dp in replicas))
    return (f"train.global_batch_size={-(-t.global_batch_size // step) * step} (a multiple of "
            f"{step}: micro-batch x data-parallel size on every count)")


def _counts(nodes: List[int]) -> str:
    return ", ".join(map(str, nodes))


def _widest_range(works: List[int]) -> Optional[str]:
    """The longest run of consecutive working counts (the largest counts on a tie)."""
    runs: List[List[int]] = []
    for nodes in works:
        if runs and runs[-1][-1] == nodes - 1:
            runs[-1].append(nodes)
        else:
            runs.append([nodes])
    if not runs:
        return None
    best = max(runs, key=lambda run: (len(run), run[-1]))
    return f"--nnodes {best[0]}:{best[-1]}" if len(best) > 1 else f"--nnodes {best[0]}"


def unreachable_store(args) -> Optional[str]:
    """A launcher that does not host the rendezvous store waits for it up to the rendezvous's
    join_timeout (min 60 s here) and says so in one line; torch's own client fails after a page
    of C++ frames."""
    from datetime import timedelta

    from torch.distributed import TCPStore

    if args.rdzv_backend != "c10d" or not args.rdzv_endpoint:
        return None
    host, port, hosting, conf = rendezvous_hosted_here(args.rdzv_endpoint, args.rdzv_conf)
    if hosting:
        return None
    wait_s = min(60.0, float(conf.get("join_timeout", 600)))
    try:
        TCPStore(host, port, is_master=False, timeout=timedelta(seconds=wait_s))
    except (RuntimeError, ValueError) as err:  # DistNetworkError is a RuntimeError
        reason = str(err).strip().splitlines()[0][:200]
        return (f"cannot reach the rendezvous store at {host}:{port} within {wait_s:.0f} s "
                f"({reason}); start the launcher that hosts it (or tools/rdzv_store.py) first, "
                "or check --rdzv-endpoint")
    return None


def _raise_signal(signum, frame):
    """torch elastic's handler does the same once workers run; installed earlier, a SIGTERM
    during start-up (imports, config, rendezvous) also stops the launch the way it expects."""
    raise SignalException(f"Process {os.getpid()} got signal: {signum}",
                          sigval=signal.Signals(signum))


def hang_watch_line(step_timeout: str) -> str:
    if step_timeout == "0":
        return ("hangs are not watched (--step-timeout 0): a stopped rank hangs the job until "
                "the process group's timeout")
    base = (f"{AUTO_FACTOR:g}x the median step time, at least {AUTO_MIN_S:g} s"
            if step_timeout == "auto" else f"{float(step_timeout):g} s")
    return (f"hangs are watched (--step-timeout {step_timeout}): a rank whose step takes over "
            f"{base} ({LONG_FACTOR}x that for the first steps, evaluations and saves) is killed "
            "and the group restarted")


def main(argv: Optional[List[str]] = None) -> int:
    signal.signal(signal.SIGTERM, _raise_signal)
    incidents = None
    try:
        args, cfg = prepare(argv)
        incidents = IncidentLog(cfg.logging.run_dir, started=process_start_time())  # imports too
        SupervisingAgent.incidents = incidents
        SupervisingAgent.stacks_dir = tempfile.mkdtemp(prefix="ft_launch-")
        os.environ[STACKS_ENV] = SupervisingAgent.stacks_dir
        install_agent(SupervisingAgent)  # torchrun has no way to pass another agent class
        print(f"[ft_launch] {hang_watch_line(args.step_timeout)}", file=sys.stderr, flush=True)
        return _launch(args)
    except ConfigError as err:  # the training command's config, or a LaunchError
        print(f"{err.label}: {err}", file=sys.stderr)
        return ExitCode.CONFIG
    except SignalException as err:  # the agent, if any, has stopped the ranks (they save)
        state = ("before any rank started: nothing to save" if incidents is None else
                 stopped_state(incidents.record(-1, "preempted"), incidents))
        print(f"[ft_launch] stopped by {err.sigval.name}: {state}; exit "
              f"{int(ExitCode.INTERRUPTED)} (requeue the job)", file=sys.stderr)
        return ExitCode.INTERRUPTED
    finally:
        if incidents is not None:
            shutil.rmtree(SupervisingAgent.stacks_dir, ignore_errors=True)
            print(f"[ft_launch] {incidents.summary()}", file=sys.stderr, flush=True)


def prepare(argv: Optional[List[str]]):
    """-> (args, the training command's config), the workers' environment set; ConfigError
    when the launch cannot work (flags, the training config, node counts, the store)."""
    args = parser().parse_args(argv)
    args.rdzv_conf = rdzv_conf(args.rdzv_conf)
    problem = check_args(args)
    if problem:
        raise LaunchError(problem)
    cfg = training_config(args.training_script, args.training_script_args)
    problem = node_count_problem(args, cfg) or unreachable_store(args)
    if problem:
        raise LaunchError(problem)
    logging.basicConfig(level=logging.WARNING, format="[ft_launch] %(message)s")
    os.environ.update({"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", SUPERVISED_ENV: "1",
                       STEP_TIMEOUT_ENV: args.step_timeout})
    if args.step_timeout != "0":
        os.environ["TORCHELASTIC_ENABLE_FILE_TIMER"] = "1"
    if args.rdzv_backend == "c10d" and not args.rdzv_endpoint:
        args.rdzv_endpoint = "localhost:0"  # one machine: the agent hosts it on a free port
    return args, cfg


def _launch(args) -> int:
    config, cmd, cmd_args = torchrun.config_from_args(args)
    try:
        launcher_api.elastic_launch(config=config, entrypoint=cmd)(*cmd_args)
        return ExitCode.OK
    except ChildFailedError as err:
        _, first = culprit(err.failures)
        if first.exitcode in NOT_RETRIED:
            return first.exitcode
        print(f"[ft_launch] out of restarts ({args.max_restarts}); last failure: exit "
              f"{first.exitcode}", file=sys.stderr)
        return ExitCode.FAILED


def stopped_state(row: dict, incidents: IncidentLog) -> str:
    """What a stop left behind, from the files (a "preempted" incident row)."""
    reached, saved = row["step_reached"], row["resumed_from"]
    if not incidents.steps_this_launch():
        where = f"resumes from step {saved}" if saved else "starts from scratch"
        return f"no step had run in this launch, nothing to save (the next run {where})"
    if reached <= saved:
        return f"the ranks saved step {saved}"
    return (f"the ranks stopped at step {reached} without saving it; the newest complete "
            f"checkpoint is step {saved} ({reached - saved} step(s) to redo)")
