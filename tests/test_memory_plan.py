"""The memory planner's own arithmetic and its CLI (its figures against measured ones are in
tests/dist/test_layouts.py)."""
import pytest
import torch

from magneto_dist.config import load_config
from magneto_dist.model import ModelConfig, build_model, model_skeleton
from magneto_dist.dims import ParallelDims
from magneto_dist.training.memory_plan import (GiB, Layout, MemoryPlanner,
                                               activation_bytes_per_layer, candidate_layouts)
from tools import plan_memory

SMALL = ["model.num_layers=4", "model.hidden_size=64", "model.num_heads=4",
         "model.ffn_hidden_size=256", "model.vocab_size=1000", "model.max_seq_len=32",
         "train.micro_batch_size=1", "train.global_batch_size=8"]


def layout(cfg, world, recompute=False):
    return Layout(dims=ParallelDims.of(cfg, world), recompute=recompute, micro_batch=1)


def test_stages_together_hold_the_model_and_tp_splits_it():
    cfg = load_config(None, SMALL + ["model.tie_embeddings=false"])
    total = sum(p.numel() for p in model_skeleton(cfg.model).parameters())
    pp2 = load_config(None, SMALL + ["model.tie_embeddings=false",
                                     "parallel.pipeline_model_parallel_size=2"])
    planner = MemoryPlanner(cfg.model, "fp32", 32)
    assert planner.stage_params(layout(cfg, 1)) == [total]
    stages = planner.stage_params(layout(pp2, 2))
    assert len(stages) == 2 and sum(stages) == total and min(stages) > 0.3 * total
    tp2 = load_config(None, SMALL + ["parallel.tensor_model_parallel_size=2",
                                     "parallel.vocab_padding_multiple=8"])
    (half,) = planner.stage_params(layout(tp2, 2))
    assert 0.45 * total < half < 0.6 * total  # norms and biases stay whole on each rank


def test_zero_stages_divide_what_they_partition_and_recompute_saves_activations():
    cfg = load_config(None, SMALL)
    planner = MemoryPlanner(cfg.model, "bf16", 32)
    plans = {z: planner.plan(layout(load_config(None, SMALL + [f"train.zero_stage={z}"]), 4))
             for z in (1, 2, 3)}
    assert plans[3]["parameters"] == plans[1]["parameters"] / 4
    assert plans[2]["gradients"] < plans[1]["gradients"]
    assert plans[1]["optimizer"] == plans[3]["optimizer"]
    assert plans[1]["activations_recompute"] < plans[1]["activations_no_recompute"]


def test_cli_prints_the_configured_layout_and_alternatives(capsys):
    assert plan_memory.main(["--config", "configs/gpt_6.7b.yaml", "--nodes", "2",
                             "--gpus-per-node", "8", "--vocab-size", "50257"]) == 0
    out = capsys.readouterr().out
    assert "TP1 x PP1 x DP16 (ZeRO-2):" in out and "optimizer (ZeRO-2)" in out
    assert "layouts that fit 80 GiB" in out and "TP2 x PP1 x DP8" in out
    assert "(ZeRO-0)" not in out  # bf16 needs ZeRO (fp32 gradient accumulation)


def test_the_host_copy_of_async_saves_is_planned_and_printed(capsys):
    """The checkpoint's tensors: parameters (the tied embedding under both names) and optimizer
    state; tests/dist/test_async_save.py holds it against a measured copy."""
    cfg = load_config(None, SMALL)
    plan = MemoryPlanner(cfg.model, "fp32", 32).plan(layout(cfg, 2))
    embedding = 1000 * 64 * 4
    assert plan["host_copy"] == plan["parameters"] + plan["optimizer"] + embedding
    assert plan_memory.main(["--config", "configs/gpt_1.3b.yaml", "--vocab-size", "50257"]) == 0
    assert "host copy" not in capsys.readouterr().out
    assert plan_memory.main(["--config", "configs/gpt_1.3b.yaml", "--vocab-size", "50257",
                             "checkpoint.async_save=true"]) == 0
    assert "host copy, checkpoint.async_save" in capsys.readouterr().out


def test_cli_names_a_layout_the_devices_cannot_run_and_a_bad_config(capsys):
    assert plan_memory.main(["--config", "configs/gpt_1.3b.yaml", "--nodes", "1",
                             "--gpus-per-node", "1", "--device-memory", "1",
                             "parallel.tensor_model_parallel_size=2"]) == 0
    out = capsys.readouterr().out
    assert "the configured layout cannot run on 1 device(s): world size 1 is not divisible" in out
    assert "none: lower train.micro_batch_size, or use more devices" in out
    assert plan_memory.main(["--config", "configs/gpt_1.3b.yaml", "train.zero_stage=7"]) == 2
    assert "train.zero_stage" in capsys.readouterr().out


@pytest.mark.parametrize("precision,per_param", [("fp32", 4), ("bf16", 2)])
def test_parameter_bytes_follow_precision(precision, per_param):
    cfg = load_config(None, SMALL)
    plan = MemoryPlanner(cfg.model, precision, 32).plan(layout(cfg, 1))
    assert plan["parameters"] == plan["params_per_rank"] * per_param
    assert plan["total"] < GiB


def test_bf16_zero1_counts_the_bf16_optimizers_whole_fp32_gradient_buffer():
    """With fp32 accumulation DeepSpeed steps bf16 ZeRO-1 through its BF16_Optimizer, which
    accumulates into an fp32 buffer of all the rank's parameters (bf16_optimizer.py,
    fp32_groups_gradients_flat), not only its partition; ZeRO-2 keeps the partition."""
    planner = MemoryPlanner(load_config(None, SMALL).model, "bf16", 32)
    plans = {z: planner.plan(layout(load_config(None, SMALL + [f"train.zero_stage={z}"]), 4))
             for z in (1, 2)}
    params = plans[1]["params_per_rank"]
    assert plans[1]["gradients"] == params * (2 + 4)
    assert plans[2]["gradients"] == params * (2 + 4) / 4


def saved_activation_bytes(cfg, batch: int, seq: int) -> int:
    """What one transformer layer's forward saves for its backward, parameters excluded,
    measured with autograd's saved-tensor hooks (each storage once, at its largest)."""
    model = build_model(cfg, seed=0)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(tensor):
        ptr = tensor.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = max(storages.get(ptr, 0), tensor.numel() * tensor.element_size())
        return tensor

    x = torch.randn(batch, seq, cfg.hidden_size, requires_grad=True)
    rope = model.rope(seq)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model.decoder.layers[0](x, rope=rope)
    return sum(storages.values())


@pytest.mark.parametrize("variant", [
    {"norm": "pre_ln"}, {"norm": "magneto"}, {"norm": "pre_ln", "qk_norm": True},
    {"norm": "pre_ln", "num_query_groups": 1},
    {"norm": "magneto", "qk_norm": True, "num_query_groups": 2, "position": "rope"}],
    ids=lambda v: "-".join(map(str, v.values())))
def test_activations_per_layer_are_what_autograd_saves(variant):
    """The planner's per-layer count against the tensors a layer really saves (this CPU's SDPA
    kernel, like the GPU's flash and efficient ones, keeps no s x s scores): QK-norm adds its
    inputs; grouped-query attention saves as much as multi-head (k and v are repeated before
    the attention call), only its parameters are fewer. (RMSNorm and SwiGLU are left out: on
    this CPU torch's rms_norm saves its intermediates, ~1.3x the planner's count, and SwiGLU
    saves less than it counts.)"""
    cfg = ModelConfig(num_layers=1, hidden_size=64, num_heads=4, ffn_hidden_size=256,
                      vocab_size=50, max_seq_len=16, **variant)
    planned = activation_bytes_per_layer(cfg, 2 * 16, 1, 4)
    assert abs(planned / saved_activation_bytes(cfg, 2, 16) - 1) < 0.03, planned


def test_sequence_parallelism_splits_the_norm_and_layer_inputs_and_is_offered_with_tp_only():
    """Per layer and token, SP keeps 1/TP of the two norm inputs (the gathered matmul inputs
    stay whole), and each stage's input is split too: at TP2, h/2 x 2 per layer plus h/2 once."""
    cfg = load_config(None, SMALL + ["parallel.tensor_model_parallel_size=2"])
    planner = MemoryPlanner(cfg.model, "fp32", 32)
    dims = ParallelDims.of(cfg, 2)
    plain, split = (planner.plan(Layout(dims=dims, recompute=False, micro_batch=1,
                                        sequence_parallel=sp)) for sp in (False, True))
    tokens, h, layers = 32, 64, 4
    saved = plain["activations_no_recompute"] - split["activations_no_recompute"]
    assert saved == 4 * tokens * (h * layers + h // 2)
    assert plain["parameters"] == split["parameters"]
    layouts = list(candidate_layouts(cfg.model, 4, 4, 1, 8))
    assert any(lay.sequence_parallel for lay in layouts)
    assert all(lay.dims.tp > 1 for lay in layouts if lay.sequence_parallel)
    assert "TP2 x PP1 x DP2 (ZeRO-1) +SP" in {lay.describe() for lay in layouts}
