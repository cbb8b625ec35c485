"""torch 2.13's torch.distributed.elastic internals the fault-tolerant launcher hooks into.

torch elastic supervises a node's workers, restarts the group and re-forms the rendezvous, but
offers no hook to observe a failure, a watchdog kill or a change of the group's size, no way to
stop restarting for good, and no way to choose the agent or timer-server class torchrun builds.
`HookedElasticAgent` turns the private methods it overrides into named hooks (`on_failure`,
`on_group_resized`, `on_watchdog_expiry`, `on_watchdog_kill`, `stop_restarting`), and the
launcher writes policies against those only. The watchdog hooks come from the events the timer
server logs through `_log_watchdog_event`: "timer expired" before it kills a worker, "kill
worker process" after.
- `launch_agent` builds `LocalElasticAgent` by that name: `install_agent` rebinds it.
- `LocalElasticAgent._setup_local_watchdog` builds `timer.FileTimerServer` by that name; stock
  FileTimerServer SIGKILLs the agent itself when a timer expires ("Terminating the server
  process ... because of expired timers": exit 137, no restart). `AgentSafeFileTimerServer`
  kills the expired worker only, and is handed in for that one call.
- The rendezvous endpoint parsing (`rendezvous_hosted_here`) uses elastic's private helpers, so
  the launcher decides as torch does whether this node hosts the store.
"""
from __future__ import annotations

import os

import torch.distributed.elastic.timer as timer
from torch.distributed.elastic.agent.server import api as agent_api
from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
from torch.distributed.elastic.rendezvous import utils as rdzv_utils
from torch.distributed.launcher import api as launcher_api

from . import require_attribute, require_parameters, require_source

LIBRARY = "torch"


class AgentSafeFileTimerServer(timer.FileTimerServer):
    """Kills expired workers, never the agent that hosts it."""

    def _reap_worker(self, worker_pid: int, signal: int) -> bool:
        if worker_pid == os.getpid():
            return True
        return super()._reap_worker(worker_pid, signal)


class HookedElasticAgent(LocalElasticAgent):
    """LocalElasticAgent with named hooks; subclasses override the `on_*` methods."""

    def on_failure(self, result) -> None:
        """The group failed (result: a RunResult with per-rank failures); before any restart."""

    def on_group_resized(self, before: int, after: int) -> None:
        """The rendezvous re-formed with `after` nodes instead of `before`."""

    def on_watchdog_expiry(self, worker_pid: int) -> None:
        """A worker's timer expired; the step watchdog kills it when this returns."""

    def on_watchdog_kill(self, worker_pid: int) -> None:
        """The step watchdog killed a worker that overran its timer."""

    def stop_restarting(self) -> None:
        """Let the current failure end the launch instead of restarting the group."""
        self._remaining_restarts = 0

    def _setup_local_watchdog(self, envs) -> None:
        stock = timer.FileTimerServer
        timer.FileTimerServer = AgentSafeFileTimerServer
        try:
            super()._setup_local_watchdog(envs)
        finally:
            timer.FileTimerServer = stock

    def _log_watchdog_event(self, name, request) -> None:
        if name == "timer expired" and request is not None:
            self.on_watchdog_expiry(request.worker_pid)
        if name == "kill worker process" and request is not None:
            self.on_watchdog_kill(request.worker_pid)
        super()._log_watchdog_event(name, request)

    def _monitor_workers(self, worker_group):
        result = super()._monitor_workers(worker_group)
        if result.state in (agent_api.WorkerState.FAILED, agent_api.WorkerState.UNHEALTHY) \
                and result.failures:
            self.on_failure(result)
        return result

    def _rendezvous(self, worker_group) -> None:
        before = worker_group.group_world_size
        super()._rendezvous(worker_group)
        if before is not None and worker_group.group_world_size != before:
            self.on_group_resized(before, worker_group.group_world_size)


def install_agent(agent_class) -> None:
    """Make torchrun's launch_agent build `agent_class` instead of LocalElasticAgent."""
    launcher_api.LocalElasticAgent = agent_class


def rendezvous_hosted_here(endpoint: str, conf: str):
    """-> (host, port, hosted_here, parsed conf) for a c10d --rdzv-endpoint and --rdzv-conf,
    as torch elastic reads them."""
    host, port = rdzv_utils.parse_rendezvous_endpoint(endpoint, default_port=29400)
    parsed = rdzv_utils._parse_rendezvous_config(conf)
    hosting = (parsed.get("is_host", "").lower() not in ("false", "0")
               and rdzv_utils._matches_machine_hostname(host))
    return host, port, hosting, parsed


def check() -> None:
    """What this module relies on is still there (run at import)."""
    for name, params in (("_setup_local_watchdog", ["self", "envs"]),
                         ("_log_watchdog_event", ["self", "name", "request"]),
                         ("_monitor_workers", ["self", "worker_group"]),
                         ("_rendezvous", ["self", "worker_group"])):
        require_attribute(LIBRARY, LocalElasticAgent, name)
        require_parameters(LIBRARY, getattr(LocalElasticAgent, name), params,
                           f"LocalElasticAgent.{name}")
    require_source(LIBRARY, agent_api.SimpleElasticAgent._invoke_run, "self._remaining_restarts",
                   "the agent's restart budget (SimpleElasticAgent._remaining_restarts)")
    require_source(LIBRARY, LocalElasticAgent._setup_local_watchdog, "timer.FileTimerServer(",
                   "the agent's timer server construction (_setup_local_watchdog)")
    require_parameters(LIBRARY, timer.FileTimerServer._reap_worker,
                       ["self", "worker_pid", "signal"], "FileTimerServer._reap_worker")
    for event in ('"timer expired"', '"kill worker process"'):  # before and after a kill
        require_source(LIBRARY, timer.FileTimerServer._run_watchdog, event,
                       f"the timer server's {event} event (FileTimerServer._run_watchdog)")
    require_source(LIBRARY, launcher_api.launch_agent, "LocalElasticAgent(",
                   "torchrun's agent construction (launcher.api.launch_agent)")
    for name in ("_parse_rendezvous_config", "_matches_machine_hostname",
                 "parse_rendezvous_endpoint"):
        require_attribute(LIBRARY, rdzv_utils, name)


check()
