"""A sweep's files and shared inputs: results.jsonl (one row per finished cell), the cells'
metrics.jsonl as the verdicts read them, and the data every cell trains on, prepared once.

Cells run in the local pool (pool.py) or as cluster jobs (cluster.py); both append rows here.
results.jsonl is only ever appended to (with fsync), by the one sweep process that holds
OUT/sweep.lock; a line cut short by a kill, or any line that is not a result row, is moved
aside to results.jsonl.quarantine (with a warning naming file:line) before the next append, so
nothing is lost and no later run trips over it.
"""
from __future__ import annotations

import json
import os
from typing import List, Optional

import numpy as np

from ..files import atomic_write, read_jsonl
from ..training.metrics_file import current_rows, last_per_step
from .verdicts import unigram_entropy

RESULTS = "results.jsonl"
QUARANTINE = ".quarantine"     # suffix of the side file that keeps lines moved out of a jsonl
ROW_KEYS = ("cell", "verdict")  # a result row has at least these
ENTROPY_TOKENS = 2 ** 28        # the unigram entropy counts at most this many tokens per prefix


def read_rows(path: str, log=None) -> List[dict]:
    """JSON lines; a line that is not JSON (cut short by a kill, or garbage) is skipped, with a
    warning naming file:line when `log` is given."""
    warn = (lambda number, line: log(f"WARNING: {path}:{number}: not a JSON line, skipped: "
                                     f"{line[:80]!r}")) if log else None
    return read_jsonl(path, warn)


def _is_result_row(row) -> bool:
    return isinstance(row, dict) and all(isinstance(row.get(k), str) for k in ROW_KEYS)


def load_results(path: str, log=print) -> List[dict]:
    """The result rows of results.jsonl in file order; other lines are skipped with a warning
    (quarantine_bad_lines moves them aside before the sweep appends)."""
    rows = []
    for row in read_rows(path, log):
        if _is_result_row(row):
            rows.append(row)
        else:
            log(f"WARNING: {path}: a JSON line that is not a result row, skipped: "
                f"{json.dumps(row)[:80]}")
    return rows


def quarantine_bad_lines(path: str, log=print) -> int:
    """Move every line that is not a result row (a line cut short by a kill, garbage, a stray
    value) from `path` to `path`.quarantine, each named in a warning as file:line; -> how many.
    The good lines are rewritten atomically, so a crash here loses nothing."""
    if not os.path.exists(path):
        return 0
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    good, bad = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            ok = _is_result_row(json.loads(line))
        except ValueError:
            ok = False
        (good if ok else bad).append((number, line))
    if not bad:
        return 0
    with open(path + QUARANTINE, "a", encoding="utf-8") as side:
        for number, line in bad:
            side.write(line + "\n")
            log(f"WARNING: {path}:{number} is not a result row; moved to {path + QUARANTINE}: "
                f"{line[:80]!r}")
        side.flush()
        os.fsync(side.fileno())
    atomic_write(path, "".join(line + "\n" for _, line in good))
    return len(bad)


def drop_partial_line(path: str) -> None:
    """Cut a last line left unfinished by a killed writer, so the next row starts a line."""
    if not os.path.exists(path):
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


def append_row(path: str, row: dict) -> None:
    """One line, flushed and fsynced: a row on disk is a cell that is never run again."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def losses_of(rows: List[dict]) -> List[float]:
    """Per-step training losses from a run's rows (metrics_file.current_rows)."""
    return [r["loss"] for r in last_per_step(rows, "train")]


def grad_norms_of(rows: List[dict]) -> List[Optional[float]]:
    """Per-step grad norms, aligned with losses_of (None where a row has none)."""
    return [r.get("grad_norm") for r in last_per_step(rows, "train")]


def train_losses(run_dir: str) -> List[float]:
    """Per-step training losses of a run directory, the last occurrence of each step."""
    return losses_of(current_rows(run_dir))


def corpus_entropy(prefixes: List[str], vocab_size: int) -> float:
    """Unigram entropy (nats) of the corpus: counted over every token of a prefix up to
    ENTROPY_TOKENS, beyond that over 64 evenly spaced chunks of that many tokens in all (a
    100B-token corpus would otherwise be read whole on the submitting machine)."""
    from ..data.checks import token_ids  # megatron-core: not imported by a job (cell.py)
    counts = np.zeros(vocab_size, dtype=np.int64)
    for prefix in prefixes:
        tokens = token_ids(prefix)
        chunk = ENTROPY_TOKENS // 64
        starts = (range(0, len(tokens), chunk) if len(tokens) <= ENTROPY_TOKENS else
                  np.linspace(0, len(tokens) - chunk, 64).astype(np.int64))
        for start in starts:
            counts += np.bincount(tokens[int(start):int(start) + chunk], minlength=vocab_size)
    return unigram_entropy(counts)


def prepare_data(sweep, log=print) -> float:
    """Build the corpus and index caches once per distinct seed before any cell starts (cells
    starting together would build the same caches at once); -> the corpus's unigram entropy."""
    from ..data.setup import load_tokenizer, prepare_data as prepare_run_data
    from ..launch_env import RankInfo
    ranks = RankInfo()
    cells = sweep.cells()
    for seed in sorted({cell.seed for cell in cells}):
        cfg = sweep.cell_config(next(c for c in cells if c.seed == seed))
        tokenizer, prefixes = load_tokenizer(cfg, ranks)
        prepare_run_data(cfg, "gpt", tokenizer, prefixes, ranks)
    entropy = corpus_entropy(prefixes, tokenizer.vocab_size)
    log(f"sweep: data ready; unigram entropy of the corpus {entropy:.3f} nats")
    return entropy


def results_by_cell(path: str, cell_names: List[str], log=print,
                    skip_crashed: bool = False) -> dict:
    """The newest row of each named cell ({} for none); crashed rows left out with
    skip_crashed (--retry-crashed)."""
    rows = {r["cell"]: r for r in load_results(path, log)}
    return {name: rows[name] for name in cell_names if name in rows
            and not (skip_crashed and rows[name]["verdict"] == "crashed")}


def ordered_results(path: str, cell_names: List[str], log=print) -> List[dict]:
    """One row per cell of the grid that has one (the newest), in grid order."""
    rows = results_by_cell(path, cell_names, log)
    return [rows[name] for name in cell_names if name in rows]


def write_sweep_record(out_dir: str, sweep) -> None:
    atomic_write(os.path.join(out_dir, "sweep.json"),
                 json.dumps({"grid": sweep.grid.__dict__, "run_overrides": sweep.run_overrides},
                            indent=1))


def median_step_seconds(rows: List[dict]) -> Optional[float]:
    """The median time between consecutive logged training steps (start-up excluded)."""
    train = sorted(((r["step"], r["time"]) for r in rows
                    if r.get("split") == "train" and "time" in r), key=lambda x: x[0])
    gaps = [(t1 - t0) / (s1 - s0) for (s0, t0), (s1, t1) in zip(train, train[1:]) if s1 > s0]
    return float(np.median(gaps)) if gaps else None
