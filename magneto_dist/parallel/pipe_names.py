"""The pipeline's layer list and parameter names: facts that checkpoints need without building
a pipeline (so without importing DeepSpeed's pipeline or megatron's layers).

pipeline.py builds DeepSpeed LayerSpecs from `pipe_plan`; checkpoint/reshard.py maps the names a
PipelineModule gives its parameters to the full model's with `pipe_prefixes`.
"""
from __future__ import annotations

TIED_KEY = "word_embedding"  # DeepSpeed names a tied layer's parameters tied_modules.KEY.*


def pipe_plan(model) -> list:
    """The pipe layers in order: (kind, the full model's module name)."""
    cfg = model.config
    plan = [("word", "embed.word"), ("tail", None)]
    plan += [("layer", f"decoder.layers.{i}") for i in range(len(model.decoder.layers))]
    if model.decoder.final_norm is not None:
        plan.append(("submodule", "decoder.final_norm"))
    plan.append(("tied_head", "embed.word") if cfg.tie_embeddings else ("submodule", "lm_head"))
    return plan


def pipe_prefixes(model) -> dict:
    """Parameter-name prefix in the PipelineModule -> the same parameters' prefix in the full
    model ("5.layer." -> "decoder.layers.3."). Pipe indices count layers over all stages, so
    these names do not depend on the PP degree or the partition; checkpoints map by them."""
    prefixes = {}
    for index, (kind, name) in enumerate(pipe_plan(model)):
        if kind == "word":
            pipe = f"tied_modules.{TIED_KEY}.word." if model.config.tie_embeddings else "0.word."
            prefixes[pipe] = f"{name}."
        elif kind == "tail" and model.config.position == "learned":
            prefixes[f"{index}.position."] = "embed.position."
        elif kind in ("layer", "submodule"):
            prefixes[f"{index}.{'layer' if kind == 'layer' else name.rsplit('.', 1)[-1]}."] = \
                f"{name}."
    return prefixes
