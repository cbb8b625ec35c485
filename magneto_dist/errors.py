"""Exit codes and the project's own error types: the one home of both.

A run, the fault-tolerant launcher, the stability sweep and the tools all exit with these codes,
and the launcher decides from them whether a restart can help. Only the error types below turn
into a one-line message and their code; anything else is a bug or an unexpected failure, which
keeps its traceback and exits FAILED (the launcher retries it, since a restart may get past a
flaky node).
"""
from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    OK = 0            # done, or already finished (a rerun of a finished command)
    FAILED = 1        # an unexpected error (traceback printed); retried by the launcher
    CONFIG = 2        # config or data error: the same command fails the same way, not retried
    CHECKPOINT = 3    # a checkpoint cannot be read, resumed or converted: not retried
    NONFINITE = 4     # stopped on train.max_nonfinite_steps non-finite steps in a row: a replay
                      # of the same data reproduces it, not retried
    SPIKES = 5        # stopped on a third loss spike within train.spike_skip_steps steps (or no
                      # room left to skip one): the data or the model keeps spiking, not retried
    HARDWARE = 6      # a step replayed from a checkpoint gave another result than its first run,
                      # or the data-parallel replicas' parameters disagree with no checkpoint to
                      # go back to: a rank computed or held something wrong; retried (the restart
                      # resumes from a good checkpoint, a scheduler may replace the node)
    NO_SPACE = 74     # EX_IOERR: no space left for a checkpoint; not retried until freed
    INTERRUPTED = 75  # EX_TEMPFAIL: stopped on a signal after saving; rerun (requeue) to resume

    @property
    def retried(self) -> bool:
        """Whether the fault-tolerant launcher restarts the group after a rank exits so."""
        return self in (ExitCode.FAILED, ExitCode.INTERRUPTED, ExitCode.HARDWARE)


# Why a code is not retried, as the launcher says it.
NOT_RETRIED = {
    ExitCode.CONFIG: "config or data error",
    ExitCode.CHECKPOINT: "checkpoint error",
    ExitCode.NONFINITE: "non-finite loss",
    ExitCode.SPIKES: "the loss kept spiking",
    ExitCode.NO_SPACE: "no space left on the checkpoint filesystem",
}


class MagnetoError(Exception):
    """An expected failure whose message says what to do; ends the process with `exit_code`
    and a one-line `label: message` (no traceback)."""
    exit_code = ExitCode.FAILED
    label = "error"


class ConfigError(MagnetoError, ValueError):
    """A bad config value, command-line flag or run directory; the message names the key."""
    exit_code = ExitCode.CONFIG
    label = "config error"


class DataError(MagnetoError, ValueError):
    """Input data that cannot be used; the message names the file (and line) and the fix."""
    exit_code = ExitCode.CONFIG
    label = "data error"


class CheckpointError(MagnetoError, RuntimeError):
    """A checkpoint that cannot be read, resumed, converted or written."""
    exit_code = ExitCode.CHECKPOINT
    label = "checkpoint error"


class RestartNeeded(MagnetoError):
    """The ranks started from different views of the run directory, in a way a fresh start of
    every rank resolves (one rank found the chosen checkpoint damaged and marked it, or a
    directory listing was stale): one line and exit FAILED, which the launcher retries."""
    exit_code = ExitCode.FAILED
    label = "restart needed"


class NoSpaceError(CheckpointError):
    """The checkpoint filesystem is full; the message names the directory and the size needed."""
    exit_code = ExitCode.NO_SPACE
    label = "no space"

