"""torchrun's elastic agent with the policies it lacks.

torch.distributed.elastic already supervises a node's workers, restarts the group on a failure,
re-forms the rendezvous with fewer or more nodes and forwards SIGTERM. Added here, through the
named hooks of compat.elastic.HookedElasticAgent (which also keeps the step watchdog from
killing the agent itself):
- every failure is recorded in RUN_DIR/restarts.jsonl (incidents.py), its cause told apart
  (exit code, signal, a hang killed by the step watchdog, a lost node);
- exit codes that a restart cannot fix (errors.NOT_RETRIED: config or data, checkpoint,
  non-finite loss, which a replay of the same data reproduces, no space) are not retried.
"""
from __future__ import annotations

import logging

from ..compat.elastic import HookedElasticAgent
from ..errors import NOT_RETRIED
from .incidents import IncidentLog, cause_of

log = logging.getLogger("ft_launch")


class SupervisingAgent(HookedElasticAgent):
    incidents: IncidentLog  # set by the launcher (cli.py) before torchrun builds the agent

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._hung_pids = set()
        self._attempt = 0

    def on_watchdog_kill(self, worker_pid: int) -> None:
        self._hung_pids.add(worker_pid)
        log.warning("step watchdog: worker pid %s made no progress in time; killed it",
                    worker_pid)

    def on_failure(self, result) -> None:
        # the first failure is the cause; the others are ranks that lost their peers
        rank, first = min(result.failures.items(), key=lambda kv: kv[1].timestamp)
        hung = any(f.pid in self._hung_pids for f in result.failures.values())
        row = self.incidents.record(self._attempt, cause_of(first.exitcode, hung), rank)
        log.warning("attempt %d failed: rank %s %s at step %s; resuming from step %s",
                    self._attempt, rank, row["cause"], row["step_reached"], row["resumed_from"])
        final = NOT_RETRIED.get(first.exitcode)
        if final and not hung:
            log.error("not restarting: rank %s exited %d (%s); fix it and rerun",
                      rank, first.exitcode, final)
            self.stop_restarting()
        self._hung_pids.clear()
        self._attempt += 1

    def on_group_resized(self, before: int, after: int) -> None:
        if after < before:
            self.incidents.record(self._attempt, "node lost")
            log.warning("the group re-formed with %d node(s) instead of %d", after, before)
        else:
            log.warning("the group re-formed with %d node(s) instead of %d (a node joined)",
                        after, before)
