"""The sweep file: a grid of cells, the trainer keys every cell shares, and the verdict rules.

    grid:     {schemes, norm_types, depths, hidden_sizes, lrs, seeds, warmup, steps, ...}
    run:      {model: {...}, train: {...}, data: {...}, ...}                  pretrain_gpt.py keys
    verdict:  {above_start_steps, stuck_margin, ...}                          see verdicts.py

Command-line overrides use the same dotted form: `grid.depths=[6,24]`, `verdict.stuck_margin=0.2`,
and any trainer key (`model.hidden_size=128`) goes to every cell. Every cell's trainer config is
built and validated here (for the number of GPUs a cell gets), so a mistake stops the sweep
before any cell starts.

The width axis: a cell of width d has d / head_dim heads and an FFN of ffn_ratio x d; both
default to the ratios of the run's own model section (GPT-medium's 1024/16 heads and 4x FFN:
head dimension 64, ratio 4), so widths scale the model the way the papers' model families do.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import yaml

from ..config import SECTIONS, Config, ConfigError, load_config, section_from_dict, validate
from ..launch_env import default_config
from ..model.config import NORM_SCHEMES, NORM_TYPES
from .verdicts import VerdictConfig

# Verdict keys that became trainer keys, which a cell's run and its verdict both read.
MOVED_TO_TRAINER = {"spike_threshold": "train.spike_loss_rise",
                    "spike_window": "train.spike_window"}

TRAINER_DEFAULTS = default_config("gpt")  # under every cell's keys


@dataclass
class GridConfig:
    schemes: List[str] = field(default_factory=lambda: ["post_ln", "pre_ln", "deepnorm",
                                                        "magneto"])
    norm_types: List[str] = field(default_factory=lambda: ["layernorm"])
    depths: List[int] = field(default_factory=lambda: [6, 24])
    hidden_sizes: List[int] = field(default_factory=list)  # widths; empty: model.hidden_size
    head_dim: Optional[int] = None     # width rule: heads = width / head_dim (None: the run's)
    ffn_ratio: Optional[float] = None  # width rule: FFN = ffn_ratio x width (None: the run's)
    lrs: List[float] = field(default_factory=lambda: [1e-3, 5e-3])
    seeds: List[int] = field(default_factory=lambda: [1])
    warmup: int = 0                    # warm-up steps of every cell (the papers' "no warm-up": 0)
    steps: int = 300                   # optimizer steps per cell
    min_lr_ratio: float = 0.1          # each cell's train.min_lr = lr x this
    diagnostics_interval: int = 10     # per-layer diagnostics every N steps (and at step 0)
    save_interval: int = 0             # checkpoint every N steps (0: at the end only); a cell
                                       # whose job died resumes from its newest checkpoint
    # Today's options as axes (empty: the run's own value, one per cell)
    qk_norm: List[bool] = field(default_factory=list)          # model.qk_norm
    z_loss: List[float] = field(default_factory=list)          # train.z_loss
    parametrization: List[str] = field(default_factory=list)   # model.parametrization
    num_query_groups: List[Optional[int]] = field(default_factory=list)  # GQA (null: MHA)
    schedules: List[str] = field(default_factory=list)         # train.lr_decay_style
    wsd_decay_fraction: float = 0.2    # wsd cells: the cooldown's share of grid.steps
    # cells left out: a cell matching every key of one mapping, e.g. {scheme: magneto,
    # qk_norm: true}, is not run (to compare recipes without their whole product)
    exclude: List[dict] = field(default_factory=list)


@dataclass
class Cell:
    scheme: str
    norm_type: str
    depth: int
    hidden_size: int
    lr: float
    seed: int
    warmup: int
    steps: int
    qk_norm: bool = False
    z_loss: float = 0.0
    parametrization: str = "standard"
    num_query_groups: Optional[int] = None
    schedule: str = ""                 # train.lr_decay_style ("": the run's, recorded before)

    @property
    def name(self) -> str:
        """Today's options appear only where set, so cells named before them keep their name."""
        options = ("-qk" * self.qk_norm + (f"-z{self.z_loss:g}" if self.z_loss else "")
                   + ("-mup" if self.parametrization == "mup" else "")
                   + (f"-g{self.num_query_groups}" if self.num_query_groups else "")
                   + (f"-{self.schedule}" if self.schedule == "wsd" else ""))
        return (f"{self.scheme}-{self.norm_type}-L{self.depth}-d{self.hidden_size}-lr{self.lr:g}"
                f"-s{self.seed}-w{self.warmup}{options}")

    def key(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Width:
    """A cell's model width with the heads and FFN the width rule gives it."""
    hidden_size: int
    num_heads: int
    ffn_hidden_size: int


@dataclass
class Sweep:
    grid: GridConfig
    verdict: VerdictConfig
    run_overrides: List[str]           # trainer keys shared by every cell, in order
    out_dir: str
    name: str = "sweep"                # the sweep file's name: (cluster) job names start with it
    widths: Dict[int, Width] = field(default_factory=dict)  # hidden_size -> its heads and FFN
    options: Dict[str, list] = field(default_factory=dict)  # Cell option field -> its values

    def cells(self) -> List[Cell]:
        g = self.grid
        names = list(self.options)
        cells = [Cell(scheme, norm_type, depth, width, lr, seed, g.warmup, g.steps,
                      **dict(zip(names, values)))
                 for width in self.widths for depth in g.depths for scheme in g.schemes
                 for values in itertools.product(*self.options.values())
                 for norm_type in g.norm_types for lr in g.lrs for seed in g.seeds]
        return [c for c in cells if not any(_matches(c, rule) for rule in g.exclude)]

    def cell_dir(self, cell: Cell) -> str:
        return os.path.join(self.out_dir, "cells", cell.name)

    def cell_overrides(self, cell: Cell) -> List[str]:
        g, w = self.grid, self.widths[cell.hidden_size]
        return [*self.run_overrides, f"model.norm={cell.scheme}",
                f"model.norm_type={cell.norm_type}", f"model.num_layers={cell.depth}",
                f"model.hidden_size={w.hidden_size}", f"model.num_heads={w.num_heads}",
                f"model.ffn_hidden_size={w.ffn_hidden_size}",
                f"train.lr={cell.lr!r}", f"train.min_lr={cell.lr * g.min_lr_ratio!r}",
                f"train.seed={cell.seed}", f"train.warmup_iters={cell.warmup}",
                *self._option_overrides(cell),
                f"train.train_iters={cell.steps}", "train.exit_at_step=null",
                "train.log_interval=1",  # the verdicts read every step's loss
                f"logging.diagnostics_interval={g.diagnostics_interval}",
                f"logging.run_dir={self.cell_dir(cell)}", "logging.sample_prompt=",
                f"checkpoint.save_interval={g.save_interval}", "checkpoint.keep_last=1",
                "checkpoint.resume=auto"]

    def _option_overrides(self, cell: Cell) -> List[str]:
        out = [f"model.qk_norm={json.dumps(cell.qk_norm)}", f"train.z_loss={cell.z_loss!r}",
               f"model.parametrization={cell.parametrization}",
               f"model.num_query_groups={json.dumps(cell.num_query_groups)}"]
        if cell.schedule:
            wsd = cell.schedule == "wsd"
            decay = max(1, round(cell.steps * self.grid.wsd_decay_fraction)) if wsd else None
            out += [f"train.lr_decay_style={cell.schedule}",
                    f"train.wsd_decay_iters={json.dumps(decay)}"]
        return out

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


AXES = ("schemes", "norm_types", "depths", "hidden_sizes", "lrs", "seeds", "qk_norm", "z_loss",
        "parametrization", "num_query_groups", "schedules")
# grid option axis -> (the Cell field, the run's key it sets when the axis is empty)
OPTION_AXES = {"qk_norm": ("qk_norm", "model"), "z_loss": ("z_loss", "train"),
               "parametrization": ("parametrization", "model"),
               "num_query_groups": ("num_query_groups", "model"),
               "schedules": ("schedule", None)}


def _matches(cell: Cell, rule: dict) -> bool:
    return all(getattr(cell, key) == value for key, value in rule.items())


def _base_config(g: GridConfig, run_overrides: List[str]) -> Config:
    """The run's config with each option axis at its first value (the run may rely on one: a
    muP base width in run: for grid.parametrization=[mup])."""
    firsts = [f"{section}.{field_name}={json.dumps(getattr(g, axis)[0])}"
              for axis, (field_name, section) in OPTION_AXES.items()
              if section and getattr(g, axis)]
    return load_config(TRAINER_DEFAULTS, run_overrides + firsts)


def _options(g: GridConfig, run_overrides: List[str]) -> Dict[str, list]:
    """Each option field of a cell with its values: the grid's, else the run's own one."""
    base = _base_config(g, run_overrides)
    options = {}
    for axis, (field_name, section) in OPTION_AXES.items():
        values = getattr(g, axis)
        if not values:
            values = [getattr(getattr(base, section), field_name)] if section else [""]
        options[field_name] = list(values)
    return options


def _check_exclude(g: GridConfig) -> None:
    fields = set(Cell.__dataclass_fields__)
    for rule in g.exclude:
        if not isinstance(rule, dict) or not rule or set(rule) - fields:
            raise ConfigError(f"grid.exclude: {rule!r} must be a mapping of cell keys "
                              f"({', '.join(sorted(fields))}) to values")


def _check_grid(g: GridConfig) -> None:
    for name, allowed in (("schemes", NORM_SCHEMES), ("norm_types", NORM_TYPES)):
        bad = [v for v in getattr(g, name) if v not in allowed]
        if bad or not getattr(g, name):
            raise ConfigError(f"grid.{name}={getattr(g, name)} must be a non-empty list of "
                              f"{', '.join(allowed)}")
    for name in ("depths", "lrs", "seeds"):
        if not getattr(g, name):
            raise ConfigError(f"grid.{name} is empty; give at least one value")
    for name in AXES:  # two equal values make two cells of one name, run at once
        values = getattr(g, name)
        twice = sorted({v for v in values if values.count(v) > 1}, key=values.index)
        if twice:
            raise ConfigError(f"grid.{name}={values} lists {', '.join(map(str, twice))} more "
                              "than once (1e-3 and 0.001 are one value); give each value once")
    names = [f"{lr:g}" for lr in g.lrs]  # a cell's name holds 6 significant digits of its LR
    if len(set(names)) < len(names):
        raise ConfigError(f"grid.lrs={g.lrs}: values that agree to 6 significant digits give "
                          "cells of one name; make them differ within 6 digits")
    for ok, message in ((g.steps >= 1, f"grid.steps={g.steps} must be at least 1"),
                        (g.warmup >= 0, f"grid.warmup={g.warmup} must be at least 0"),
                        (g.save_interval >= 0, f"grid.save_interval={g.save_interval} must be "
                                               "at least 0"),
                        (min(g.depths) >= 1, f"grid.depths={g.depths}: every depth must be >= 1"),
                        (min(g.lrs) > 0, f"grid.lrs={g.lrs}: every lr must be > 0")):
        if not ok:
            raise ConfigError(message)


def _widths(g: GridConfig, run_overrides: List[str]) -> Dict[int, Width]:
    """Each width of the grid with its heads and FFN (the width rule in the module docstring)."""
    base = _base_config(g, run_overrides).model
    if not g.hidden_sizes:
        return {base.hidden_size: Width(base.hidden_size, base.num_heads, base.ffn_hidden_size)}
    head_dim = g.head_dim or base.hidden_size // base.num_heads
    ratio = g.ffn_ratio or base.ffn_hidden_size / base.hidden_size
    if head_dim < 1 or ratio <= 0:
        raise ConfigError(f"grid.head_dim={head_dim} and grid.ffn_ratio={ratio} must be positive")
    widths = {}
    for width in g.hidden_sizes:
        if width < 1 or width % head_dim:
            raise ConfigError(f"grid.hidden_sizes: {width} is not a positive multiple of the "
                              f"head dimension {head_dim} (grid.head_dim); use multiples of it "
                              "or set grid.head_dim")
        widths[width] = Width(width, width // head_dim, max(1, round(ratio * width)))
    return widths


def load_sweep(path: str, overrides: List[str], out_dir: Optional[str] = None,
               world_size: int = 1, has_cuda: bool = False) -> Sweep:
    """The sweep from its YAML and overrides, with every cell's trainer config validated for
    `world_size` ranks (the GPUs one cell gets; has_cuda: its ranks have GPUs)."""
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
            try:
                sections[head][key] = yaml.safe_load(text) if text else ""
            except yaml.YAMLError as err:
                raise ConfigError(f"override {override!r}: value is not valid YAML "
                                  f"({str(err).splitlines()[0]})") from None
        else:
            run_overrides.append(override)
    grid = section_from_dict("grid", sections["grid"], GridConfig())
    _check_grid(grid)
    for key, trainer_key in MOVED_TO_TRAINER.items():
        if key in sections["verdict"]:
            raise ConfigError(f"{path}: verdict.{key} is the trainer's {trainer_key} now (one "
                              "spike rule for the sweep's verdict and the runs' own detector): "
                              f"set it under run: {{train: {{{trainer_key.split('.')[1]}: ...}}}}")
    verdict = section_from_dict("verdict", sections["verdict"], VerdictConfig())
    name = raw.get("name") or os.path.splitext(os.path.basename(path))[0]
    out_dir = os.path.abspath(out_dir or os.path.join("runs", "sweeps", name))  # cells run in ROOT
    _check_exclude(grid)
    sweep = Sweep(grid, verdict, run_overrides, out_dir, name, _widths(grid, run_overrides),
                  _options(grid, run_overrides))
    if not sweep.cells():
        raise ConfigError("grid.exclude leaves no cell to run; narrow its mappings")
    for cell in sweep.cells():
        cfg = sweep.cell_config(cell)
        if cfg.train.spike_policy == "rollback":
            raise ConfigError(f"{path}: run.train.spike_policy=rollback: a cell that rolls its "
                              "spikes back hides the instability the sweep measures; use warn "
                              "(a row per spike, the default) or off")
        try:
            validate(cfg, world_size=world_size, has_cuda=has_cuda)
        except ConfigError as err:
            raise ConfigError(f"cell {cell.name}: {err}") from None
    return sweep
