"""launch/ft_launch.py: one command per node; torchrun's flags plus --step-timeout.

    python launch/ft_launch.py --nproc-per-node 8 --nnodes 2:4 --rdzv-endpoint HOST:PORT \
        [--max-restarts 10] [--step-timeout 600|auto] launch/pretrain_gpt.py --config ... k=v

Defaults that differ from torchrun's, each from a measurement on torch 2.13 with gloo: the c10d
rendezvous (the static one hung on restart), 10 restarts, a rendezvous that re-forms in about
6 s after a node is lost (about 40 s with torch's defaults), workers that do not share the
agent's store (restarts raced on it: 2 of 6 runs hung connecting to the dead attempt's
addresses), and on one machine a free local port. Exit codes (errors.ExitCode): OK when done,
INTERRUPTED (75) when stopped by SIGTERM after every rank saved (requeue), the training script's
own codes that no restart can fix (errors.NOT_RETRIED), FAILED (1) when out of restarts.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import List, Optional

from torch.distributed import run as torchrun
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher import api as launcher_api

from ..compat.elastic import install_agent, rendezvous_hosted_here
from ..config import load_config
from ..errors import NOT_RETRIED, ConfigError, ExitCode
from ..launch_env import default_config, task_of_script
from ..resilience.watchdog import STEP_TIMEOUT_ENV, SUPERVISED_ENV
from .agent import SupervisingAgent
from .incidents import IncidentLog
FAST_RDZV = "last_call_timeout=5,keep_alive_interval=1,keep_alive_max_attempt=3"


def parser():
    p = torchrun.get_args_parser()
    p.description = __doc__.split("\n")[0]
    p.set_defaults(rdzv_backend="c10d", max_restarts=10, rdzv_conf=FAST_RDZV)
    p.add_argument("--step-timeout", default="0",
                   help="seconds an optimizer step may take before its rank is killed and the "
                        "group restarted ('auto': 5x the measured step time, at least 60 s; "
                        "0: no hang detection). The first steps and checkpoint saves get 10x.")
    return p


def run_dir_of(script: str, script_args: List[str]) -> str:
    """logging.run_dir of the training command: its --config (else the script's own default
    config, as the script itself would read it) and overrides."""
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
    return load_config(config, overrides).logging.run_dir


def check_args(args) -> Optional[str]:
    min_nodes, max_nodes = torchrun.parse_min_max_nnodes(args.nnodes)
    if max_nodes > 1 and not args.rdzv_endpoint:
        return (f"--nnodes {args.nnodes} needs --rdzv-endpoint HOST:PORT (the same on every "
                "node; e.g. the first node of the Slurm allocation)")
    if args.step_timeout != "auto":
        try:
            float(args.step_timeout)
        except ValueError:
            return f"--step-timeout {args.step_timeout!r}: a number of seconds, 0, or auto"
    return None


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


def main(argv: Optional[List[str]] = None) -> int:
    args = parser().parse_args(argv)
    problem = check_args(args) or unreachable_store(args)
    if problem:
        print(f"ft_launch: error: {problem}", file=sys.stderr)
        return ExitCode.CONFIG
    try:
        run_dir = run_dir_of(args.training_script, args.training_script_args)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return ExitCode.CONFIG
    logging.basicConfig(level=logging.WARNING, format="[ft_launch] %(message)s")
    os.environ.update({"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", SUPERVISED_ENV: "1",
                       STEP_TIMEOUT_ENV: args.step_timeout})
    if args.step_timeout != "0":
        os.environ["TORCHELASTIC_ENABLE_FILE_TIMER"] = "1"
    if args.rdzv_backend == "c10d" and not args.rdzv_endpoint:
        args.rdzv_endpoint = "localhost:0"  # one machine: the agent hosts it on a free port
    incidents = IncidentLog(run_dir)
    SupervisingAgent.incidents = incidents
    install_agent(SupervisingAgent)  # torchrun has no way to pass another agent class
    code = _launch(args)
    print(f"[ft_launch] {incidents.summary()}", file=sys.stderr, flush=True)
    return code


def _launch(args) -> int:
    config, cmd, cmd_args = torchrun.config_from_args(args)
    try:
        launcher_api.elastic_launch(config=config, entrypoint=cmd)(*cmd_args)
        return 0
    except SignalException as err:
        SupervisingAgent.incidents.record(-1, "preempted")
        print(f"[ft_launch] stopped by signal {err.sigval.name}: the ranks saved and exited; "
              f"exit {int(ExitCode.INTERRUPTED)} (requeue the job to resume)", file=sys.stderr)
        return ExitCode.INTERRUPTED
    except ChildFailedError as err:
        _, first = err.get_first_failure()
        if first.exitcode in NOT_RETRIED:
            return first.exitcode
        print(f"[ft_launch] out of restarts ({args.max_restarts}); last failure: exit "
              f"{first.exitcode}", file=sys.stderr)
        return ExitCode.FAILED
