"""Where a run starts, decided in one place: every rank decides alone, before any process group
forms (the data's size and a layout change's universal form depend on it), and the ranks check
that they agree once the group has formed (storage.agree_on_resume). The decision is a
ResumePlan:

- the tag to resume from (checkpoint.resume: `auto` takes the newest complete tag whose files
  still have their recorded sizes and contents, warning about every tag it skips; `none` starts
  over; a tag's name takes that tag or fails), checked against this run: a model field that
  differs and another tokenizer are refused by name, a layout DeepSpeed cannot load is refused
  with the route that works, a setting that reorders the samples is warned about;
- where the state comes from: the tag itself (the same layout), its universal form (another
  layout; built by `load_source` once the data is ready), a consolidated export's weights
  (checkpoint.init_from, when no tag is resumed) or a fresh start;
- the data position and the training split's size from there;
- whether the tag already reached the last step (a rerun of a finished command writes nothing);
- the warnings to print.

The tools, the launcher's incident rows and the sweep's cells ask `resume_point` for the tag a
run would resume from, as one process sees it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional, Tuple

import yaml

from ..config import Config, TrainConfig, config_to_dict
from ..data.datasets import train_samples
from ..data.run_tokenizer import check_resume_tokenizer
from ..dims import ParallelDims, describe
from ..errors import MagnetoError
from ..resilience.faults import NO_FAULTS, Faults
from .export import check_consolidated
from .reshard import refusal, universal_source
from .tags import COMPLETE, DAMAGED, CheckpointDir, CheckpointError, Tag, model_differences

# Where a run's state comes from (ResumePlan.source).
FRESH = "fresh"                   # the seeded init, step 0
INIT_FROM = "init_from"           # checkpoint.init_from's weights, a fresh optimizer, step 0
SAME_LAYOUT = "same layout"       # the tag's own files
UNIVERSAL_FORM = "universal form"  # the tag's universal form: another layout
# Settings that decide which sample comes at each global index: changing one on resume
# silently repeats some samples and skips others.
DATA_ORDER_KEYS = (("train", "seed"), ("data", "split"), ("data", "prefixes"),
                   ("data", "weights"))


@dataclass(frozen=True)
class ResumePlan:
    """Where a run starts (see the module docstring)."""
    ckpts: CheckpointDir            # the run's checkpoint directory
    source: str                     # FRESH | INIT_FROM | SAME_LAYOUT | UNIVERSAL_FORM
    train_samples: int              # the training split's size (data.datasets.train_samples)
    tag: Optional[Tag] = None       # the checkpoint resumed (SAME_LAYOUT, UNIVERSAL_FORM)
    step: int = 0                   # its step: optimizer steps done
    consumed_samples: int = 0       # its data position: the global index of the next sample
    finished: Optional[str] = None  # why there is nothing to do (the tag is at the last step)
    warnings: Tuple[str, ...] = ()  # what the decision found, in order, for rank 0 to print
    layouts: Optional[Tuple[dict, dict]] = None  # UNIVERSAL_FORM: (the tag's, this run's)


def find_resume_tag(ckpts: CheckpointDir, resume: str, log=print,
                    share: Optional[Tuple[int, int]] = (0, 1), warn=None,
                    at_most: Optional[int] = None) -> Optional[str]:
    """The tag to resume from: None for a fresh start. Every tag's files are checked for size;
    the chosen one's contents too, this rank's `share` of them (Tag.damage; None: sizes
    only). A tag found damaged in content is marked damaged (Tag.mark_damaged): the other
    ranks, each checking another share, may have chosen it. `warn` says what this rank alone
    found (default: log). `at_most`: only tags of that step or earlier (a rollback's bound,
    rollback_point)."""
    if resume == "none":
        return None
    if resume != "auto":
        chosen = ckpts.tag(resume)
        if not chosen.is_complete():
            raise CheckpointError(f"checkpoint.resume={resume!r}: {chosen.label} is missing or "
                                  f"incomplete (no {COMPLETE}); complete tags: "
                                  f"{ckpts.complete_tags()}")
        problem = chosen.damage(share, log)
        if problem:
            raise CheckpointError(f"checkpoint.resume={resume!r} is damaged: {problem}; resume "
                                  "from another tag (checkpoint.resume=auto takes the newest "
                                  "good one)")
        return resume
    for tag in map(ckpts.tag, ckpts.tag_names()):
        if at_most is not None and tag.step > at_most:
            continue
        if not tag.is_complete():
            damaged = tag.is_damaged()
            log(f"WARNING: skipping {'damaged' if damaged else 'incomplete'} checkpoint "
                f"{tag.label} " + (f"(marked in {DAMAGED})" if damaged else
                                   f"(no {COMPLETE}; a save was interrupted)"))
            continue
        problem = tag.damage(None)
        if problem:
            log(f"WARNING: skipping damaged checkpoint {tag.label}: {problem}")
            continue
        problem = tag.damage(share, log)
        if problem is None:
            return tag.name
        tag.mark_damaged(problem)
        (warn or log)(f"WARNING: skipping damaged checkpoint {tag.label}: {problem} (marked "
                      f"damaged: {DAMAGED})")
    return None


def rollback_point(ckpts: CheckpointDir, at_most: int, share: Tuple[int, int],
                   log=print) -> Optional[Tag]:
    """The newest complete tag of step `at_most` or earlier, its contents checked as a resume
    checks them (this rank's `share`): where a rollback in the running process goes back to
    (training/rollback.py)."""
    name = find_resume_tag(ckpts, "auto", log=log, share=share, at_most=at_most)
    return ckpts.tag(name) if name else None


def skip_room(cfg: Config) -> int:
    """Samples a fresh run's training split holds beyond its steps' own: the data windows
    train.spike_policy=rollback may skip (resumed runs keep their split's size, and so what
    is left of the room)."""
    t = cfg.train
    if t.spike_policy != "rollback":
        return 0
    return t.spike_max_skips * t.spike_skip_steps * t.global_batch_size


def manual_skip(cfg: Config, tag: Optional[str]) -> int:
    """Global batches to skip on resuming `tag` (checkpoint.resume_skip_batches, which applies
    to the tag checkpoint.resume names only)."""
    c = cfg.checkpoint
    return c.resume_skip_batches if tag and tag == c.resume else 0


def resume_point(ckpts: CheckpointDir, resume: str = "auto", log=None,
                 contents: bool = True) -> Optional[Tag]:
    """The tag a run with checkpoint.resume=`resume` would resume from, as this process sees
    it (the tools' "newest complete checkpoint", the launcher's incident rows, the sweep's
    cells). `log` gets the warnings (default: none); `contents`: verify the tag's contents
    too (and mark it damaged when they differ), else its files' sizes only (reads nothing)."""
    name = find_resume_tag(ckpts, resume, log=log or (lambda line: None),
                           share=(0, 1) if contents else None)
    return ckpts.tag(name) if name else None


def check_compatible(tag: Tag, cfg: Config) -> None:
    """Refuse a checkpoint whose model differs from the configured one, naming the fields."""
    with open(os.path.join(tag.path, "config.yaml"), encoding="utf-8") as f:
        diffs = model_differences(yaml.safe_load(f)["model"], cfg)
    if diffs:
        raise CheckpointError(f"checkpoint {tag.label} was written by a different model; "
                              f"{'; '.join(diffs)}. Use a new logging.run_dir, or "
                              "checkpoint.resume=none to start over")


def data_order_changes(tag: Tag, cfg: Config) -> List[str]:
    """"KEY: checkpoint X, config Y" for each setting that orders the samples (DATA_ORDER_KEYS)
    and differs: the data position (a global sample index) then points into another order."""
    saved, current = config_to_dict(tag.config()), config_to_dict(cfg)
    return [f"{section}.{key}: checkpoint {saved[section][key]!r}, config "
            f"{current[section][key]!r}"
            for section, key in DATA_ORDER_KEYS if saved[section][key] != current[section][key]]


def finished_message(run_dir: str, tag: str, step: int, train: TrainConfig) -> Optional[str]:
    """Why there is nothing to do (the resume tag already reached the end), or None."""
    if step < train.last_step:
        return None
    reached = (f"train.exit_at_step={train.exit_at_step}" if train.exit_at_step
               else f"train.train_iters={train.train_iters}")
    return (f"run {run_dir} is finished: {tag} is at step {step}, {reached}; nothing to do. "
            "Raise train.train_iters to train further, or use a new logging.run_dir")


def layout_change(tag: Tag, cfg: Config, dims: ParallelDims,
                  say) -> Optional[Tuple[dict, dict]]:
    """The tag checked against this run's model and layout: None for the same layout, else
    (the tag's layout, this run's), or CheckpointError when DeepSpeed cannot load it so.
    `say` gets a warning per setting that reorders the samples."""
    check_compatible(tag, cfg)
    for change in data_order_changes(tag, cfg):
        say(f"WARNING: {change}: the samples come in another order than the checkpoint's run "
            "drew them, so resuming at its data position repeats some samples and skips "
            "others; set the checkpoint's value to continue exactly")
    before, now = tag.layout(), dims.layout
    if before == now:
        return None
    why_not = refusal(before, now)
    if why_not:
        raise CheckpointError(f"checkpoint {tag.label} was written by layout {describe(before)} "
                              f"and this run is {describe(now)}: {why_not}")
    return before, now


def data_position(cfg: Config, tag: Tag) -> Tuple[int, int, Optional[str]]:
    """(consumed samples, the training split's size, a note when the global batch changed)
    from the tag's data position on: with another global batch than the checkpoint's, its
    steps left take another number of samples; never smaller than the size that tag's run
    used (which keeps the order)."""
    t, marker, saved = cfg.train, tag.marker(), tag.config()
    consumed = marker.get("consumed_samples") or marker["step"] * saved.train.global_batch_size
    skipped = manual_skip(cfg, tag.name) * t.global_batch_size  # the split holds them too
    note = None
    if saved.train.global_batch_size != t.global_batch_size:
        note = (f"train.global_batch_size: checkpoint {saved.train.global_batch_size}, config "
                f"{t.global_batch_size}: continuing at sample {consumed}, "
                f"{t.global_batch_size} per step")
    size = train_samples(t.train_iters, t.global_batch_size, marker["step"], consumed + skipped,
                         at_least=marker.get("train_samples") or
                         saved.train.train_iters * saved.train.global_batch_size)
    return consumed, size, note


def _decide(cfg: Config, dims: ParallelDims, tokenizer, share, warn, found: List[str]
            ) -> ResumePlan:
    ckpts, t = CheckpointDir.of_run(cfg.logging.run_dir), cfg.train
    name = find_resume_tag(ckpts, cfg.checkpoint.resume, log=found.append, share=share,
                           warn=warn)
    if name is None:
        if cfg.checkpoint.init_from:
            check_consolidated(cfg.checkpoint.init_from, cfg)
        return ResumePlan(ckpts, INIT_FROM if cfg.checkpoint.init_from else FRESH,
                          train_samples(t.train_iters, t.global_batch_size) + skip_room(cfg),
                          warnings=tuple(found))
    tag = ckpts.tag(name)
    layouts = layout_change(tag, cfg, dims, found.append)
    check_resume_tokenizer(cfg.logging.run_dir, tokenizer)
    step = tag.marker()["step"]
    finished = finished_message(cfg.logging.run_dir, name, step, t)
    consumed, size, note = data_position(cfg, tag)
    if note and not finished:
        found.append(note)
    return ResumePlan(ckpts, SAME_LAYOUT if layouts is None else UNIVERSAL_FORM, size, tag,
                      step, consumed, finished, tuple(found), layouts)


def plan_resume(cfg: Config, dims: ParallelDims, tokenizer,
                share: Optional[Tuple[int, int]] = (0, 1), warn=None, log=print) -> ResumePlan:
    """Where this run starts. Every rank calls it before torch.distributed starts: `share`
    (rank, world) is this rank's part of the chosen tag's contents to verify, `warn` says
    what this rank alone found (default: into the warnings). The plan's warnings are the
    caller's to print; a refusal (CheckpointError, or the tokenizer's) says them through `log`
    first."""
    found: List[str] = []
    try:
        return _decide(cfg, dims, tokenizer, share, warn, found)
    except MagnetoError:
        for line in found:
            log(line)
        raise


def load_source(plan: ResumePlan, local_rank: int, log=print, faults: Faults = NO_FAULTS,
                rank: int = 0) -> Optional[Tag]:
    """What the engine loads: the tag itself, or (another layout) its universal form, built
    here before torch.distributed starts (reshard.universal_source); None when no tag is
    resumed."""
    if plan.source == SAME_LAYOUT:
        return plan.tag
    if plan.source != UNIVERSAL_FORM:
        return None
    before, now = plan.layouts
    log(f"changing layouts: {plan.tag.name} was written by {describe(before)}, this run is "
        f"{describe(now)}; resuming through the universal checkpoint")
    return universal_source(plan.tag, local_rank, log=log, faults=faults, rank=rank)
