"""Block-level checks run inside layout_worker.py's rank group (TP = the whole world)."""
import copy
import gc
import os
import weakref

import torch
import torch.distributed as dist
import torch.nn.functional as F

from magneto_dist.compat.torch_groups import live_process_groups
from magneto_dist.config import load_config
from magneto_dist.model import ModelConfig, build_model
from magneto_dist.parallel import state
from magneto_dist.dims import ParallelDims
from magneto_dist.parallel.pipe_names import pipe_prefixes
from magneto_dist.parallel.pipeline import TransformerLayerPipe
from magneto_dist.parallel.random import (StreamDropout, TensorParallelRNG,
                                          apply_activation_checkpointing, use_tensor_parallel_rng)
from magneto_dist.parallel.setup import parallelize
from magneto_dist.parallel.tensor_parallel import (ShardedLayerNorm, ShardedRMSNorm,
                                                   apply_tensor_parallel)
from magneto_dist.training.tasks import GPTTask


def _tiny(**kw):
    cfg = dict(num_layers=2, hidden_size=32, num_heads=4, ffn_hidden_size=64, vocab_size=100,
               max_seq_len=16)
    cfg.update(kw)
    torch.manual_seed(5)
    return build_model(ModelConfig(**cfg))


def _full_slice(full: torch.Tensor, tp_param: torch.Tensor) -> torch.Tensor:
    if not getattr(tp_param, "tensor_model_parallel", False):
        return full
    return full.chunk(state.tp_size(), dim=tp_param.partition_dim)[state.tp_rank()]


def sub_ln_block(norm: str, norm_type: str) -> dict:
    """Outputs and all gradients of one layer under TP equal the unsharded layer's."""
    full_model = _tiny(norm=norm, norm_type=norm_type, activation="swiglu")
    tp_model = copy.deepcopy(full_model)
    apply_tensor_parallel(tp_model, vocab_padding_multiple=8)
    full, tp = full_model.decoder.layers[1], tp_model.decoder.layers[1]
    sharded = (ShardedLayerNorm, ShardedRMSNorm)
    assert isinstance(tp.ffn.inner_norm, sharded), type(tp.ffn.inner_norm)
    g = torch.Generator().manual_seed(0)  # same input and output weighting on every rank
    x = torch.randn(3, 7, 32, generator=g)
    weight = torch.randn(3, 7, 32, generator=g)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    outs = [layer(xi) for layer, xi in zip((full, tp), xs)]
    for out in outs:
        (out * weight).sum().backward()
    grads = dict(full.named_parameters())
    # relative for large gradients, absolute for tiny ones (k_proj.bias has a true gradient of
    # exactly zero: softmax ignores a shift shared by all keys)
    param_diff = max(((p.grad - _full_slice(grads[name].grad, p)).abs().max()
                      / grads[name].grad.abs().max().clamp(min=1.0)).item()
                     for name, p in tp.named_parameters())
    return {"output": (outs[0] - outs[1]).abs().max().item(),
            "input_grad": (xs[0].grad - xs[1].grad).abs().max().item(),
            "param_grads_scaled": param_diff, "params": sum(1 for _ in tp.parameters())}


def _gather(t: torch.Tensor):
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t)
    return parts


def dropout_streams() -> dict:
    rng = TensorParallelRNG(seed=7, tp_rank=state.tp_rank())
    with rng.fork():
        tp_mask = F.dropout(torch.ones(4096), 0.5)
    torch.manual_seed(11)  # the default stream: seeded alike on every TP rank
    default_mask = F.dropout(torch.ones(4096), 0.5)
    tp_masks, default_masks = _gather(tp_mask), _gather(default_mask)
    return {"tp_masks_differ": not torch.equal(tp_masks[0], tp_masks[1]),
            "default_masks_equal": torch.equal(default_masks[0], default_masks[1]),
            **_recompute(rng), **_sequence_parallel_masks()}


def _loss_and_grads(model, rng_state, default_seed):
    torch.manual_seed(default_seed)
    tracker = model.tp_rng
    tracker.state = rng_state.clone()
    tokens = torch.arange(32).view(2, 16) % 100
    loss = model(tokens).float().square().mean()
    model.zero_grad()
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters()]


def _dropout_models(sequence_parallel: bool) -> list:
    """The same TP model with dropout, without and with recompute."""
    models = []
    for recompute in (False, True):
        model = _tiny(norm="magneto", dropout=0.3)
        apply_tensor_parallel(model, vocab_padding_multiple=8,
                              sequence_parallel=sequence_parallel)
        model.tp_rng = TensorParallelRNG(seed=7, tp_rank=state.tp_rank())
        use_tensor_parallel_rng(model, model.tp_rng, sequence_parallel)
        if recompute:
            apply_activation_checkpointing(model.decoder.layers, model.tp_rng)
        models.append(model)
    return models


def _sequence_parallel_masks() -> dict:
    """Under SP every dropout (embeddings, residual branches) acts on this rank's part of the
    sequence and draws from the TP stream: its masks differ across TP ranks, and recompute
    draws each layer's masks again, equal to the forward pass's."""
    calls = []  # per model: (dropout module name, its drop mask) per call, in call order
    for model in _dropout_models(sequence_parallel=True):
        seen = []
        for name, module in model.named_modules():
            if isinstance(module, StreamDropout):
                module.register_forward_hook(lambda m, args, out, name=name: seen.append(
                    (name, (out == 0) & (args[0] != 0))))
        _loss_and_grads(model, model.tp_rng.state, 3)
        calls.append(seen)
    plain, recomputed = calls
    forward = dict(plain)
    replayed = recomputed[len(plain):]  # the layers' dropouts again, in backward's order
    first = _gather(plain[1][1].contiguous())  # the first residual dropout, on each TP rank
    return {"sp_dropouts": len(plain),
            "sp_masks_differ": not torch.equal(first[0], first[1]),
            "sp_recompute_forward_equal": [n for n, _ in plain] == [n for n, _ in
                                                                   recomputed[:len(plain)]]
            and all(torch.equal(m, forward[n]) for n, m in recomputed[:len(plain)]),
            "sp_replayed": sorted(n for n, _ in replayed),
            "sp_replays_equal": all(torch.equal(m, forward[n]) for n, m in replayed)}


def _recompute(rng) -> dict:
    """Recompute replays both dropout streams: same loss and grads with and without it."""
    models = _dropout_models(sequence_parallel=False)
    start = models[0].tp_rng.state
    plain_loss, plain_grads = _loss_and_grads(models[0], start, 3)
    re_loss, re_grads = _loss_and_grads(models[1], start, 3)
    other = TensorParallelRNG(seed=8, tp_rank=state.tp_rank()).state
    other_loss, _ = _loss_and_grads(models[0], other, 3)
    return {"recompute_loss_diff": abs(plain_loss - re_loss),
            "recompute_grad_diff": max((a - b).abs().max().item()
                                       for a, b in zip(plain_grads, re_grads)),
            "other_tp_seed_loss_diff": abs(plain_loss - other_loss)}


def pipeline_frees_other_stages() -> dict:
    """After set-up, a stage holds its own transformer layers and no others (DeepSpeed keeps
    every LayerSpec for the whole run)."""
    cfg = load_config(None, ["model.num_layers=4", "model.hidden_size=32", "model.num_heads=4",
                             "model.vocab_size=100", "model.max_seq_len=16",
                             f"parallel.pipeline_model_parallel_size={dist.get_world_size()}",
                             "train.micro_batch_size=1", "train.global_batch_size=2"])
    model = build_model(cfg.model)
    layers = [weakref.ref(layer) for layer in model.decoder.layers]
    par = parallelize(model, cfg, ParallelDims.of(cfg, dist.get_world_size()),
                      pipeline_loss=GPTTask(100).pipeline_loss)
    del model
    gc.collect()
    local = sum(isinstance(m, TransformerLayerPipe) for m in par.module.modules())
    draws = _gather(torch.rand(64))  # each stage's first dropout draw
    return {"alive": sum(ref() is not None for ref in layers), "local": local,
            "total": len(layers), "stage_draws_differ": not torch.equal(draws[0], draws[1])}


def pipe_names_map_to_model_names() -> dict:
    """Every parameter of a PP stage, renamed by pipe_prefixes, is a parameter of the full
    model with the same shape, and the stages together cover the model (tied and untied,
    learned and rotary positions, with and without a final norm)."""
    results = {}
    for variant in (["model.tie_embeddings=true", "model.position=rope"],
                    ["model.tie_embeddings=false", "model.position=learned"],
                    ["model.norm=deepnorm"]):
        cfg = load_config(None, ["model.num_layers=4", "model.hidden_size=32",
                                 "model.num_heads=4", "model.vocab_size=100",
                                 "model.max_seq_len=16", "train.micro_batch_size=1",
                                 "train.global_batch_size=2",
                                 f"parallel.pipeline_model_parallel_size={dist.get_world_size()}",
                                 *variant])
        model = build_model(cfg.model)
        full = {name: tuple(p.shape) for name, p in model.named_parameters()}
        prefixes = pipe_prefixes(model)
        par = parallelize(model, cfg, ParallelDims.of(cfg, dist.get_world_size()),
                          pipeline_loss=GPTTask(100).pipeline_loss)
        mapped = {}
        for name, param in par.module.named_parameters():
            match = [p for p in prefixes if name.startswith(p)]
            mapped[prefixes[match[0]] + name[len(match[0]):] if len(match) == 1 else name] = \
                tuple(param.shape)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mapped)
        union = {k: v for stage in gathered for k, v in stage.items()}
        results[" ".join(variant)] = {"equal": union == full,
                                      "unmapped": sorted(set(union) - set(full)),
                                      "missing": sorted(set(full) - set(union))}
    return results


def groups_released() -> list:
    """Live process groups and native threads after each of three layouts built in turn
    (TP=world, TP=1, TP=world again): megatron's destroy_model_parallel forgets its groups
    without destroying them, and each gloo group keeps its threads, so a worker that builds
    layout after layout grew by 17 groups and 51 threads a layout before initialize_groups
    destroyed them."""
    counts = []
    for tp in (dist.get_world_size(), 1, dist.get_world_size()):
        state.initialize_groups(tp, 1)
        counts.append({"groups": len(live_process_groups()),
                       "threads": len(os.listdir("/proc/self/task"))})
    return counts


def run_check(case: dict):
    if case["check"] == "groups_released":
        return groups_released()
    if case["check"] == "pipeline_memory":
        return pipeline_frees_other_stages()
    if case["check"] == "pipe_names":
        return pipe_names_map_to_model_names()
    if case["check"] == "ring_attention":
        from cp_checks import ring_attention_matches_full  # beside this file
        return ring_attention_matches_full()
    if case["check"] == "shard_only":
        from shard_checks import shard_only_startup  # beside this file
        return shard_only_startup(case["tp"], case["pp"])
    state.initialize_groups(dist.get_world_size(), 1)
    if case["check"] == "sub_ln":
        return sub_ln_block(case["norm"], case["norm_type"])
    return dropout_streams()
