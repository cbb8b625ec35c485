"""The sweep file: a grid of cells, the trainer keys every cell shares, and the verdict rules.

    grid:     {schemes, norm_types, depths, lrs, seeds, warmup, steps, ...}   what varies
    run:      {model: {...}, train: {...}, data: {...}, ...}                  pretrain_gpt.py keys
    verdict:  {above_start_steps, stuck_margin, ...}                          see verdicts.py

Command-line overrides use the same dotted form: `grid.depths=[6,24]`, `verdict.stuck_margin=0.2`,
and any trainer key (`model.hidden_size=128`) goes to every cell. Every cell's trainer config is
built and validated here, so a mistake stops the sweep before any cell starts.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import List, Optional

import yaml

from ..config import SECTIONS, Config, ConfigError, load_config, section_from_dict, validate
from ..launch_env import default_config
from ..model.config import NORM_SCHEMES, NORM_TYPES
from .verdicts import VerdictConfig

TRAINER_DEFAULTS = default_config("gpt")  # under every cell's keys


@dataclass
class GridConfig:
    schemes: List[str] = field(default_factory=lambda: ["post_ln", "pre_ln", "deepnorm",
                                                        "magneto"])
    norm_types: List[str] = field(default_factory=lambda: ["layernorm"])
    depths: List[int] = field(default_factory=lambda: [6, 24])
    lrs: List[float] = field(default_factory=lambda: [1e-3, 5e-3])
    seeds: List[int] = field(default_factory=lambda: [1])
    warmup: int = 0                    # warm-up steps of every cell (the papers' "no warm-up": 0)
    steps: int = 300                   # optimizer steps per cell
    min_lr_ratio: float = 0.1          # each cell's train.min_lr = lr x this
    diagnostics_interval: int = 10     # per-layer diagnostics every N steps (and at step 0)


@dataclass
class Cell:
    scheme: str
    norm_type: str
    depth: int
    lr: float
    seed: int
    warmup: int
    steps: int

    @property
    def name(self) -> str:
        return (f"{self.scheme}-{self.norm_type}-L{self.depth}-lr{self.lr:g}-s{self.seed}"
                f"-w{self.warmup}")

    def key(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Sweep:
    grid: GridConfig
    verdict: VerdictConfig
    run_overrides: List[str]           # trainer keys shared by every cell, in order
    out_dir: str

    def cells(self) -> List[Cell]:
        g = self.grid
        return [Cell(scheme, norm_type, depth, lr, seed, g.warmup, g.steps)
                for depth in g.depths for scheme in g.schemes for norm_type in g.norm_types
                for lr in g.lrs for seed in g.seeds]

    def cell_dir(self, cell: Cell) -> str:
        return os.path.join(self.out_dir, "cells", cell.name)

    def cell_overrides(self, cell: Cell) -> List[str]:
        g = self.grid
        return [*self.run_overrides, f"model.norm={cell.scheme}",
                f"model.norm_type={cell.norm_type}", f"model.num_layers={cell.depth}",
                f"train.lr={cell.lr!r}", f"train.min_lr={cell.lr * g.min_lr_ratio!r}",
                f"train.seed={cell.seed}", f"train.warmup_iters={cell.warmup}",
                f"train.train_iters={cell.steps}", "train.exit_at_step=null",
                "train.log_interval=1",  # the verdicts read every step's loss
                f"logging.diagnostics_interval={g.diagnostics_interval}",
                f"logging.run_dir={self.cell_dir(cell)}", "logging.sample_prompt=",
                "checkpoint.save_interval=0", "checkpoint.keep_last=1", "checkpoint.resume=auto"]

    def cell_config(self, cell: Cell) -> Config:
        return load_config(TRAINER_DEFAULTS, self.cell_overrides(cell))


def _flatten_run(run: dict) -> List[str]:
    """The `run:` mapping as trainer overrides; values as JSON, which YAML reads back exactly."""
    if not isinstance(run, dict):
        raise ConfigError("run: must be a mapping of trainer sections")
    out = []
    for section, values in run.items():
        if section not in SECTIONS or not isinstance(values, dict):
            raise ConfigError(f"run.{section}: expected one of the trainer's sections "
                              f"({', '.join(SECTIONS)}) holding key: value pairs")
        out += [f"{section}.{key}={json.dumps(value)}" for key, value in values.items()]
    return out


def _check_grid(g: GridConfig) -> None:
    for name, allowed in (("schemes", NORM_SCHEMES), ("norm_types", NORM_TYPES)):
        bad = [v for v in getattr(g, name) if v not in allowed]
        if bad or not getattr(g, name):
            raise ConfigError(f"grid.{name}={getattr(g, name)} must be a non-empty list of "
                              f"{', '.join(allowed)}")
    for name in ("depths", "lrs", "seeds"):
        if not getattr(g, name):
            raise ConfigError(f"grid.{name} is empty; give at least one value")
    for ok, message in ((g.steps >= 1, f"grid.steps={g.steps} must be at least 1"),
                        (g.warmup >= 0, f"grid.warmup={g.warmup} must be at least 0"),
                        (min(g.depths) >= 1, f"grid.depths={g.depths}: every depth must be >= 1"),
                        (min(g.lrs) > 0, f"grid.lrs={g.lrs}: every lr must be > 0")):
        if not ok:
            raise ConfigError(message)


def load_sweep(path: str, overrides: List[str], out_dir: Optional[str] = None) -> Sweep:
    """The sweep from its YAML and overrides, with every cell's trainer config validated."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f) or {}
    except OSError as err:
        raise ConfigError(f"sweep file {path}: {err.strerror}") from None
    unknown = set(raw) - {"grid", "run", "verdict", "name"}
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {sorted(unknown)}; sections are grid, "
                          "run, verdict, name")
    sections = {"grid": dict(raw.get("grid") or {}), "verdict": dict(raw.get("verdict") or {})}
    run_overrides = _flatten_run(raw.get("run") or {})
    for override in overrides:
        dotted, sep, text = override.partition("=")
        head, _, key = dotted.partition(".")
        if not sep or not key:
            raise ConfigError(f"override {override!r} is not section.key=value")
        if head in sections:
            sections[head][key] = yaml.safe_load(text) if text else ""
        else:
            run_overrides.append(override)
    grid = section_from_dict("grid", sections["grid"], GridConfig())
    _check_grid(grid)
    verdict = section_from_dict("verdict", sections["verdict"], VerdictConfig())
    name = raw.get("name") or os.path.splitext(os.path.basename(path))[0]
    sweep = Sweep(grid, verdict, run_overrides, out_dir or os.path.join("runs", "sweeps", name))
    for cell in sweep.cells():
        try:
            validate(sweep.cell_config(cell), world_size=1)
        except ConfigError as err:
            raise ConfigError(f"cell {cell.name}: {err}") from None
    return sweep
