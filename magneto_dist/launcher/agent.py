"""torchrun's elastic agent with the policies it lacks.

torch.distributed.elastic already supervises a node's workers, restarts the group on a failure,
re-forms the rendezvous with fewer or more nodes and forwards SIGTERM. Added here:
- every failure is recorded in RUN_DIR/restarts.jsonl (incidents.py), its cause told apart
  (exit code, signal, a hang killed by the step watchdog, a lost node);
- exit codes that a restart cannot fix (errors.NOT_RETRIED: config or data, checkpoint,
  non-finite loss, which a replay of the same data reproduces, no space) are not retried;
- the step watchdog kills only the hung worker: stock FileTimerServer then SIGKILLs the agent
  itself ("Terminating the server process ... because of expired timers", exit 137, no restart).
"""
from __future__ import annotations

import logging
import os

import torch.distributed.elastic.timer as timer
from torch.distributed.elastic.agent.server.api import WorkerState
from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

from ..errors import NOT_RETRIED
from .incidents import IncidentLog, cause_of
log = logging.getLogger("ft_launch")


class AgentSafeFileTimerServer(timer.FileTimerServer):
    """Kills expired workers, never the agent that hosts it."""

    def _reap_worker(self, worker_pid: int, signal: int) -> bool:
        if worker_pid == os.getpid():
            return True
        return super()._reap_worker(worker_pid, signal)


class SupervisingAgent(LocalElasticAgent):
    incidents: IncidentLog  # set by the launcher (cli.py) before torchrun builds the agent

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._hung_pids = set()
        self._attempt = 0

    def _setup_local_watchdog(self, envs) -> None:
        # LocalElasticAgent builds timer.FileTimerServer by that name; hand it ours for this
        # call only (torch has no hook to choose the class).
        stock = timer.FileTimerServer
        timer.FileTimerServer = AgentSafeFileTimerServer
        try:
            super()._setup_local_watchdog(envs)
        finally:
            timer.FileTimerServer = stock

    def _log_watchdog_event(self, name, request) -> None:
        if name == "kill worker process" and request is not None:
            self._hung_pids.add(request.worker_pid)
            log.warning("step watchdog: worker pid %s made no progress in time; killed it",
                        request.worker_pid)
        super()._log_watchdog_event(name, request)

    def _monitor_workers(self, worker_group):
        result = super()._monitor_workers(worker_group)
        if result.state in (WorkerState.FAILED, WorkerState.UNHEALTHY) and result.failures:
            # the first failure is the cause; the others are ranks that lost their peers
            rank, first = min(result.failures.items(), key=lambda kv: kv[1].timestamp)
            hung = any(f.pid in self._hung_pids for f in result.failures.values())
            row = self.incidents.record(self._attempt, cause_of(first.exitcode, hung), rank)
            log.warning("attempt %d failed: rank %s %s at step %s; resuming from step %s",
                        self._attempt, rank, row["cause"], row["step_reached"],
                        row["resumed_from"])
            final = NOT_RETRIED.get(first.exitcode)
            if final and not hung:
                log.error("not restarting: rank %s exited %d (%s); fix it and rerun",
                          rank, first.exitcode, final)
                self._remaining_restarts = 0
            self._hung_pids.clear()
            self._attempt += 1
        return result

    def _rendezvous(self, worker_group) -> None:
        before = worker_group.group_world_size
        super()._rendezvous(worker_group)
        after = worker_group.group_world_size
        if before is not None and after < before:
            self.incidents.record(self._attempt, "node lost")
            log.warning("the group re-formed with %d node(s) instead of %d", after, before)
        elif before is not None and after > before:
            log.warning("the group re-formed with %d node(s) instead of %d (a node joined)",
                        after, before)
