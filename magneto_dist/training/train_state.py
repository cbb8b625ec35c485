"""The training loop's own state: what a checkpoint's client state holds beside DeepSpeed's, and
what resuming (training/run.py) or rolling back in place (training/rollback.py) restores."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple


@dataclass
class TrainState:
    step: int = 0                 # optimizer steps done
    consumed_samples: int = 0     # global sample index of the next sample
    nonfinite_streak: int = 0     # consecutive steps skipped for a non-finite loss / grad norm
    # the spike detector's window (training/spikes.py): recent steps' (loss, grad norm)
    loss_window: List[Tuple[float, Optional[float]]] = field(default_factory=list)
    # data windows skipped past a spike, [first, end) global sample indices
    skipped_samples: List[Tuple[int, int]] = field(default_factory=list)

    def client_state(self) -> dict:
        """What a checkpoint records of it."""
        return {"step": self.step, "consumed_samples": self.consumed_samples,
                "loss_window": [list(w) for w in self.loss_window],
                "skipped_samples": [list(s) for s in self.skipped_samples]}

    @classmethod
    def from_client(cls, client: dict) -> "TrainState":
        """The state a checkpoint's client state describes (checkpoints older than the spike
        detector have no window: it fills again)."""
        return cls(step=client["step"], consumed_samples=client["consumed_samples"],
                   loss_window=[tuple(w) for w in client.get("loss_window", [])],
                   skipped_samples=[tuple(s) for s in client.get("skipped_samples", [])])
