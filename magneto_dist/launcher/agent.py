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
import signal
from typing import Collection, Dict, Tuple

from ..compat.elastic import HookedElasticAgent
from ..errors import NOT_RETRIED, ExitCode
from .incidents import IncidentLog, cause_of

log = logging.getLogger("ft_launch")


def culprit(failures: Dict[int, object], hung_pids: Collection[int] = ()) -> Tuple[int, object]:
    """(rank, ProcessFailure) of the failure that caused the others. When one rank fails, its
    peers fail after it (a broken collective: exit 1) or are stopped by the agent (SIGTERM,
    then SIGKILL), often within the same second, and torch elastic's timestamps are whole
    seconds (from an error file, which our ranks do not write, else when the agent saw the
    exit), so the earliest is ambiguous: the first by timestamp ties with its peers and went to
    the lowest rank (a hang of rank 1 was blamed on rank 0). So: a rank the step watchdog
    killed; then the earliest; among those, an exit code that is not retried (every rank hit
    the same config or data error), then a signal the agent does not send when it stops a
    group (kill -9, a crash), then an exit code other than 1, then exit 1 (what a rank whose
    collective broke exits with), then SIGTERM (the agent's own)."""
    def kind(exitcode: int) -> int:
        if exitcode in NOT_RETRIED:
            return 0
        if exitcode < 0:
            return 4 if -exitcode == signal.SIGTERM else 1
        return 3 if exitcode == ExitCode.FAILED else 2

    return min(failures.items(), key=lambda item: (item[1].pid not in hung_pids,
                                                   item[1].timestamp, kind(item[1].exitcode),
                                                   item[0]))


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
        rank, first = culprit(result.failures, self._hung_pids)
        hung = first.pid in self._hung_pids
        row = self.incidents.record(self._attempt, cause_of(first.exitcode, hung), rank)
        log.warning("attempt %d failed: rank %s %s at step %s (%.0f s after its last progress);"
                    " resuming from step %s (%.0f s of training to redo)", self._attempt, rank,
                    row["cause"], row["step_reached"], row["seconds_stalled"],
                    row["resumed_from"], row["seconds_lost"])
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
