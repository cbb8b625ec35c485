"""torchrun's elastic agent with the policies it lacks.

torch.distributed.elastic already supervises a node's workers, restarts the group on a failure,
re-forms the rendezvous with fewer or more nodes and forwards SIGTERM. Added here, through the
named hooks of compat.elastic.HookedElasticAgent (which also keeps the step watchdog from
killing the agent itself):
- every failure is recorded in RUN_DIR/restarts.jsonl (incidents.py), its cause told apart
  (exit code, signal, a hang killed by the step watchdog, a lost node) and blamed on the rank
  that failed, not its peers; for a hang, every rank's stacks are taken before the kill (its
  peers' timers expire too, waiting for it in a collective);
- exit codes that a restart cannot fix (errors.NOT_RETRIED: config or data, checkpoint,
  non-finite loss and the loss kept spiking, which a replay of the same data reproduces, no
  space) are not retried; a hardware fault (a replayed step that differs) is.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from typing import Collection, Dict, List, Optional, Tuple

from ..compat.elastic import HookedElasticAgent
from ..errors import NOT_RETRIED, ExitCode
from ..resilience.parent_watch import parent_of
from ..resilience.watchdog import DUMP_SIGNAL, main_thread_frames, stacks_path, waiting_for_peers
from .incidents import IncidentLog, cause_of

DUMP_WAIT_S = 2.0  # how long the agent waits for its ranks' stacks before the watchdog kills

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
    # set by the launcher (cli.py) before torchrun builds the agent
    incidents: IncidentLog
    stacks_dir: str  # where this node's ranks write their stacks (watchdog.STACKS_ENV)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._hung_pids = set()
        self._attempt = 0
        self._dumped_at = -DUMP_WAIT_S

    def on_watchdog_expiry(self, worker_pid: int) -> None:
        """Every rank of this node writes its stacks, once per watchdog pass: the first kill
        would change what the others are doing."""
        if time.monotonic() - self._dumped_at < 2 * DUMP_WAIT_S:
            return
        self._dumped_at = time.monotonic()
        asked = []
        for name in os.listdir(self.stacks_dir):
            pid = int(name.split(".")[0])
            if parent_of(pid) == os.getpid():  # a live rank of this agent, not a reused pid
                with contextlib.suppress(ProcessLookupError):  # it exited meanwhile
                    os.kill(pid, DUMP_SIGNAL)
                    asked.append(stacks_path(self.stacks_dir, pid))
        deadline = time.monotonic() + DUMP_WAIT_S
        while any(os.path.getsize(path) == 0 for path in asked) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.1)  # the last dump's remaining lines

    def _stacks(self, pid: int) -> List[str]:
        """A rank's main-thread frames from its last dump ([] if none)."""
        try:
            with open(stacks_path(self.stacks_dir, pid), encoding="utf-8") as f:
                return main_thread_frames(f.read())
        except OSError:
            return []

    def _hang_suspects(self) -> Collection[int]:
        """The watchdog-killed ranks that were not waiting for a peer (all, if none or every
        one was)."""
        return {pid for pid in self._hung_pids if not waiting_for_peers(self._stacks(pid))} \
            or self._hung_pids

    def on_watchdog_kill(self, worker_pid: int) -> None:
        self._hung_pids.add(worker_pid)
        log.warning("step watchdog: worker pid %s made no progress in time; killed it",
                    worker_pid)

    def on_failure(self, result) -> None:
        rank, first = culprit(result.failures, self._hang_suspects())
        hung = first.pid in self._hung_pids
        where = _innermost(self._stacks(first.pid)) if hung else None
        row = self.incidents.record(self._attempt, cause_of(first.exitcode, hung), rank, where)
        if where:
            log.warning("rank %s hung at %s", rank, where)
        for slow in row["slow"]:
            log.warning("before it, the straggler check at step %s named rank %s on %s: %.2fx "
                        "the step time, behind in %s", slow["step"], slow["rank"], slow["host"],
                        slow["slowdown"], slow["section"])
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
        for name in os.listdir(self.stacks_dir):  # this attempt's ranks are gone
            os.remove(os.path.join(self.stacks_dir, name))
        self._attempt += 1

    def on_group_resized(self, before: int, after: int) -> None:
        if after < before:
            self.incidents.record(self._attempt, "node lost")
            log.warning("the group re-formed with %d node(s) instead of %d", after, before)
        else:
            log.warning("the group re-formed with %d node(s) instead of %d (a node joined)",
                        after, before)


def _innermost(frames: List[str]) -> Optional[str]:
    """'path:line in function' of the innermost frame."""
    if not frames:
        return None
    path, _, rest = frames[0][len('File "'):].partition('", line ')
    line, _, function = rest.partition(" in ")
    return f"{path}:{line} in {function}"
