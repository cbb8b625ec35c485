"""A run directory as the report reads it: the resolved config (config.yaml), the metrics rows as
they stand after any resume (metrics.jsonl, training/metrics.py says what each split holds), and
the launcher's incidents (restarts.jsonl). Everything is placed on one x axis, tokens trained,
so that runs of other batch sizes, or a run whose batch changed on resume, line up."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np
import yaml

from ..dims import describe, world_of
from ..errors import ConfigError
from ..files import read_jsonl
from ..launcher.incidents import RESTARTS
from ..training.metrics_file import METRICS, current_rows, last_per_step

CONFIG = "config.yaml"  # in the run directory (training/run.py writes it)


@dataclass
class Run:
    path: str
    label: str                  # what the report calls it (its directory's name, made unique)
    config: dict                # config.yaml as written ({} when absent)
    rows: List[dict]            # metrics.jsonl as it stands: a resumed attempt's replay counts
    incidents: List[dict] = field(default_factory=list)  # restarts.jsonl

    def split(self, name: str) -> List[dict]:
        """The rows of one split in the order written."""
        return [r for r in self.rows if r.get("split") == name]

    @property
    def train(self) -> List[dict]:
        return last_per_step(self.rows, "train")

    @property
    def valid(self) -> List[dict]:
        return last_per_step(self.rows, "valid")

    def _section(self, name: str) -> dict:
        return self.config.get(name) or {}

    def tokens(self, steps) -> np.ndarray:
        """Tokens trained by the end of each step: from the train rows' consumed samples (which
        follow a batch size changed on resume), else from the config's batch."""
        seq = self._section("model").get("max_seq_len", 1)
        steps = np.asarray(steps, dtype=float)
        logged = [(r["step"], r["consumed_samples"]) for r in self.train
                  if r.get("consumed_samples") is not None]
        if not logged:
            return steps * self._section("train").get("global_batch_size", 1) * seq
        known_steps, samples = zip(*([(0, 0)] + logged))
        per_step = samples[-1] / known_steps[-1]  # past the last row: at its average batch
        values = np.interp(steps, known_steps, samples)
        beyond = steps > known_steps[-1]
        values[beyond] = samples[-1] + (steps[beyond] - known_steps[-1]) * per_step
        return values * seq

    def layouts(self) -> List[str]:
        """Each attempt's layout, from its startup row (in order, repeats folded)."""
        seen: List[str] = []
        for r in self.split("startup"):
            layout = r.get("layout")
            if layout:
                world = world_of(layout)
                text = f"{describe(layout)}, {world} rank{'s' if world > 1 else ''}"
                if not seen or seen[-1] != text:
                    seen.append(text)
        return seen

    def restarts(self) -> List[dict]:
        """Where an attempt resumed: {"step", "tag", "cause"}; the cause from the launcher's
        incident just before it, when the launcher ran the run ("rerun" otherwise)."""
        out = []
        for r in self.split("resume"):
            before = [i for i in self.incidents if i.get("time", 0) <= r.get("time", 0)]
            cause = before[-1]["cause"] if before else "rerun"
            out.append({"step": r["step"], "tag": r.get("tag"), "cause": cause})
        return out


def unique_labels(paths: List[str]) -> List[str]:
    """Each run's directory name, with as many parent directories as it takes to tell them
    apart."""
    parts = [os.path.normpath(os.path.abspath(p)).split(os.sep) for p in paths]
    depth = 1
    while depth < max(len(p) for p in parts):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
        depth += 1
    return ["/".join(p) for p in parts]


def load_run(path: str, label: Optional[str] = None) -> Run:
    """A run directory; ConfigError (exit 2) when it has no metrics.jsonl."""
    metrics = os.path.join(path, METRICS)
    if not os.path.isfile(metrics):
        raise ConfigError(f"{path} is not a run directory: it has no {METRICS} (give the "
                          "logging.run_dir of a run that has taken a step)")
    config = {}
    if os.path.isfile(os.path.join(path, CONFIG)):
        with open(os.path.join(path, CONFIG), encoding="utf-8") as f:
            config = yaml.safe_load(f) or {}
    incidents = read_jsonl(os.path.join(path, RESTARTS))
    return Run(path=path, label=label or os.path.basename(os.path.normpath(path)),
               config=config, rows=current_rows(path), incidents=incidents)


def load_runs(paths: List[str]) -> List[Run]:
    return [load_run(p, label) for p, label in zip(paths, unique_labels(paths))]
