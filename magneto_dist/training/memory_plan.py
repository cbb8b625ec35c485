"""Per-rank memory of a training layout, from the model's shapes alone (a meta-device skeleton,
so a 6.7B model costs nothing to plan): parameters, gradients, optimizer state by ZeRO stage,
activations with and without recompute, and the start-up peak.

The parameters a rank holds are counted exactly: the TP plan's slicing of every parameter
(vocabulary padding included) and DeepSpeed's own stage partition (deepspeed.runtime.utils.
partition_balanced over the pipe layers' parameter counts, as PipelineModule does). The model
states per parameter follow DeepSpeed's ZeRO (its estimators' multipliers for mixed precision:
16-bit weights and gradients, fp32 master weights, fp32 gradient partition, Adam's two fp32
moments); activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation"),
counted tensor by tensor for these blocks (Sub-LN's inner norms save the merged heads and the
FFN hidden a second time) with memory-efficient attention (no s x s scores saved, as SDPA's
flash and efficient kernels on GPU). Sequence parallelism splits the norms' inputs, the
dropout masks and the layer inputs over TP. Context parallelism divides every activation by CP (a
rank holds 1/CP of each sequence) and adds the ring attention's transient buffers (context_
parallel.py: the arriving keys and values, fp32 accumulators, a tile of fp32 scores), counted
once (one layer at a time computes them). ZeRO partitions over DP x CP. Not counted:
DeepSpeed's communication buckets, the CUDA allocator's fragmentation and the framework's own
context (DeepSpeed's estimators allow 1.5x for such buffers on the host side).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterator, List

from ..config import min_zero_stage
from ..model import model_skeleton
from ..model.config import ModelConfig
from ..dims import LayoutError, ParallelDims
from ..parallel.context_parallel import TILE_BYTES
from ..parallel.pipe_names import pipe_plan
from ..model.spec import SCHEMES
from ..parallel.tp_plan import REPLICATED, SHARD_DIM, VOCAB, padded_vocab_size, tp_kind

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
GiB = 2 ** 30


@dataclass(frozen=True)
class Layout:
    dims: ParallelDims
    recompute: bool          # parallel.activation_checkpointing
    micro_batch: int         # train.micro_batch_size
    partition: str = "parameters"  # parallel.pipeline_partition
    vocab_padding_multiple: int = 128
    sequence_parallel: bool = False  # parallel.sequence_parallel (with TP > 1)

    @classmethod
    def of(cls, cfg, dims: ParallelDims) -> "Layout":
        """The layout a run config (config.Config) runs on `dims`."""
        p = cfg.parallel
        return cls(dims=dims, recompute=p.activation_checkpointing,
                   micro_batch=cfg.train.micro_batch_size, partition=p.pipeline_partition,
                   vocab_padding_multiple=p.vocab_padding_multiple,
                   sequence_parallel=p.sequence_parallel)

    def describe(self) -> str:
        """For listings: TP2 x PP1 x DP4 (ZeRO-1) +SP recompute."""
        return (f"{self.dims.describe()}{' +SP' if self.sequence_parallel else ''}"
                f"{' recompute' if self.recompute else ''}")


def _local_numel(name: str, shape, tp: int, vocab_multiple: int) -> int:
    """Elements of one parameter on one TP rank, as tensor_parallel.py slices it."""
    numel = 1
    for size in shape:
        numel *= size
    kind = tp_kind(name) if tp > 1 else REPLICATED
    if SHARD_DIM[kind] is None:
        return numel
    rows = shape[0]
    if kind == VOCAB:  # padded, then split
        return padded_vocab_size(rows, vocab_multiple, tp) // tp * (numel // rows)
    return numel // tp


def activation_bytes_per_layer(cfg: ModelConfig, tokens: int, tp: int, elem: int,
                               sequence_parallel: bool = False) -> int:
    """Saved-for-backward bytes of one transformer layer for `tokens` = micro-batch x seq."""
    h, f, heads = cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_heads
    slots = SCHEMES[cfg.norm]
    # the norm inside a sublayer saves its output once more: Sub-LN on the merged heads or the
    # FFN hidden, NormFormer's on the attention output
    attention_norm = slots.attention.inner_norm or slots.attention.output_norm
    # each sublayer's norm input and the normalized input to its matmuls; sequence parallelism
    # splits the norm inputs (and the dropout masks) over TP, while the matmuls' input is saved
    # as gathered, once per sublayer (parallel/sequence_parallel.py keeps it for the weight
    # gradients rather than gathering again in backward, as Megatron does)
    sp = tp if sequence_parallel else 1
    replicated = 2 * h // sp + 2 * h
    # q, k, v as attention saves them (under GQA the core repeats k and v to every query head
    # before SDPA, so they are h wide all the same); the attention output; the inner norm;
    # QK-norm saves its inputs, the projections' outputs (q: h wide, k: kv_size)
    qk_norm = h + cfg.kv_size if cfg.qk_norm else 0
    attention = 3 * h + h + (h if attention_norm else 0) + qk_norm
    ffn_tensors = (5 if cfg.activation == "swiglu" else 2) + (1 if slots.ffn.inner_norm else 0)
    per_token = elem * (replicated + (attention + ffn_tensors * f) // tp) + 4 * heads // tp
    if cfg.dropout > 0:
        per_token += 2 * h // sp  # the two residual dropout masks (bool)
    return tokens * per_token


def ring_buffer_bytes(cfg: ModelConfig, micro_batch: int, local_tokens: int, tp: int,
                      elem: int) -> int:
    """The ring attention's transient bytes on one rank while one layer's attention runs
    (backward, its peak): the arriving keys and values, fp32 gradient accumulators of the held
    keys and values and the pair travelling beside them, the fp32 query gradient, and three
    fp32 tiles of scores (scores, probabilities, their gradient). Under GQA the ring carries
    the key/value groups (kv_size wide), repeated to the heads one key chunk at a time."""
    width, kv_width = cfg.hidden_size // tp, cfg.kv_size // tp  # this TP rank's heads, groups
    per_token = kv_width * (2 * elem + 4 * 4) + width * 4  # k, v arriving; dk, dv x 2; dq
    chunk = local_tokens // micro_batch // 2
    tile = min(TILE_BYTES, 4 * micro_batch * (cfg.num_heads // tp) * chunk * chunk)
    return local_tokens * per_token + 3 * tile


def _optimizer_bytes(zero: int, precision: str, dp: int) -> float:
    """Optimizer-state bytes per parameter: Adam's two fp32 moments, plus the fp32 master copy
    DeepSpeed keeps under ZeRO (also of fp32 weights, measured) and for 16-bit weights; ZeRO
    (and DeepSpeed's bf16 optimizer, which shards like ZeRO-1) divide it over the DP group."""
    per_param = 12.0 if zero > 0 or precision != "fp32" else 8.0
    return per_param / (dp if zero > 0 or precision == "bf16" else 1)


class MemoryPlanner:
    """One model's shapes (its meta-device skeleton, built once) planned in any layout."""

    def __init__(self, model_cfg: ModelConfig, precision: str, seq_len: int):
        self.cfg, self.precision, self.seq_len = model_cfg, precision, seq_len
        model = model_skeleton(model_cfg)
        self.shapes = {name: p.shape for name, p in model.named_parameters()}
        self.pipe_layers = pipe_plan(model) if model_cfg.arch == "decoder" else []
        self.largest_param = max(p.numel() for p in model.parameters())

    def stage_params(self, layout: Layout) -> List[int]:
        """Parameters held by one rank of each pipeline stage (one entry without PP)."""
        from deepspeed.runtime import utils as ds_utils

        tp, pp = layout.dims.tp, layout.dims.pp
        local = {name: _local_numel(name, shape, tp, layout.vocab_padding_multiple)
                 for name, shape in self.shapes.items()}
        if pp == 1:
            return [sum(local.values())]
        counts, is_layer = [], []
        for kind, module_name in self.pipe_layers:
            prefix = "embed.position" if kind == "tail" else module_name
            counts.append(sum(n for name, n in local.items()
                              if prefix and (name == prefix or name.startswith(prefix + "."))))
            is_layer.append(1 if kind == "layer" else 0)
        weights = counts if layout.partition == "parameters" else is_layer
        parts = ds_utils.partition_balanced(weights=weights, num_parts=pp)  # PipelineModule's
        return [sum(counts[parts[s]:parts[s + 1]]) for s in range(pp)]

    def plan(self, layout: Layout) -> Dict:
        """Per-rank bytes of the busiest rank (the stage with the most parameters)."""
        d, cfg = layout.dims, self.cfg
        params = max(self.stage_params(layout))
        elem, zero = BYTES[self.precision], d.zero_stage
        shards = d.grad_replicas  # ZeRO partitions over DP x CP
        grads = params * elem / (shards if zero >= 2 else 1)
        if self.precision == "bf16" and zero == 1:
            # DeepSpeed's BF16_Optimizer (ZeRO-1 with fp32 accumulation, training/engine.py)
            # accumulates every micro-batch into an fp32 buffer of the whole model
            grads += params * 4
        elif self.precision != "fp32" and zero > 0:
            grads += params * 4 / shards  # the fp32 gradient partition the optimizer steps on
        tokens = layout.micro_batch * self.seq_len // d.cp  # this rank's part of each sequence
        layers = -(-cfg.num_layers // d.pp)
        in_flight = min(d.pp, d.grad_accum) if d.pp > 1 else 1  # 1F1B: stage 0 holds pp
        sp = layout.sequence_parallel
        per_layer = activation_bytes_per_layer(cfg, tokens, d.tp, elem, sp)
        # a stage's input and each recomputed layer's saved input: split over TP under SP
        hidden = tokens * cfg.hidden_size * elem // (d.tp if sp else 1)
        logits = tokens * -(-cfg.vocab_size // d.tp) * (elem + 8)  # + fp32 copy and its grad
        # one layer's ring at a time: beside what is saved, not per layer
        ring = ring_buffer_bytes(cfg, layout.micro_batch, tokens, d.tp, elem) if d.cp > 1 else 0
        full = in_flight * (layers * per_layer + hidden) + logits + ring
        recomputed = in_flight * (layers + 1) * hidden + per_layer + logits + ring
        out = {"parameters": params * elem / (shards if zero >= 3 else 1), "gradients": grads,
               "optimizer": params * _optimizer_bytes(zero, self.precision, shards),
               "activations": recomputed if layout.recompute else full,
               "activations_no_recompute": full, "activations_recompute": recomputed,
               "cp_buffers": ring,
               # the shard is made in fp32 (materialize.py), beside one full fp32 parameter
               "startup_peak": (params + self.largest_param) * 4, "params_per_rank": params,
               "largest_param": self.largest_param}
        out["total"] = sum(out[k] for k in ("parameters", "gradients", "optimizer",
                                            "activations"))
        out["host_copy"] = self.host_copy(layout, out)
        return out

    def host_copy(self, layout: Layout, plan: Dict) -> float:
        """Host bytes of checkpoint.async_save's copy of this rank's checkpoint state: the
        tensors of the files it writes, i.e. the parameters it holds (DP rank 0 writes the
        model file) and its optimizer state, not the gradients. A tied embedding is in the
        model's state dict under both names (copied twice; each pipeline stage has it once)."""
        d, alias = layout.dims, 0.0
        if self.cfg.tie_embeddings and d.pp == 1:
            name = next(n for n in self.shapes if tp_kind(n) == VOCAB)
            alias = _local_numel(name, self.shapes[name], d.tp, layout.vocab_padding_multiple)
            alias *= BYTES[self.precision] / (d.grad_replicas if d.zero_stage >= 3 else 1)
        return plan["parameters"] + plan["optimizer"] + alias


def deepspeed_estimate(params_per_rank: int, largest_param: int, dims: ParallelDims) -> float:
    """DeepSpeed's own model-states estimate (GPU bytes, no offload; written for ZeRO-2 and 3
    in mixed precision), with the DP group standing in for the GPUs that share one shard."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    if dims.zero_stage == 3:
        return estimate_zero3_model_states_mem_needs(params_per_rank, largest_param,
                                                     dims.grad_replicas, 1,
                                                     cpu_offload=False)[1]
    return estimate_zero2_model_states_mem_needs(params_per_rank, dims.grad_replicas, 1,
                                                 cpu_offload=False)[1]


def _divisors(n: int) -> List[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def candidate_layouts(model_cfg: ModelConfig, world: int, gpus_per_node: int,
                      micro_batch: int, global_batch: int,
                      precision: str = "fp32") -> Iterator[Layout]:
    """Every layout the config validation would accept: TP within a node dividing the heads
    and the FFN (with and without sequence parallelism), CP splitting the sequence into 2 x CP
    chunks (decoder only), PP up to the depth (decoder only, ZeRO 0-1), each ZeRO stage,
    recompute on and off."""
    for tp in _divisors(gpus_per_node):
        if model_cfg.num_heads % tp or model_cfg.ffn_hidden_size % tp:
            continue
        for cp in _divisors(world // tp):
            if cp > 1 and (model_cfg.arch != "decoder" or model_cfg.max_seq_len % (2 * cp)):
                continue
            for pp in _divisors(world // (tp * cp)):
                if pp > model_cfg.num_layers or (pp > 1 and model_cfg.arch != "decoder"):
                    continue
                for zero in range(min_zero_stage(precision), 4 if pp == 1 else 2):
                    try:
                        dims = ParallelDims.build(world, tp, pp, micro_batch, global_batch, zero,
                                                  cp)
                    except LayoutError:
                        continue
                    for recompute in (False, True):
                        for sp in ((False, True) if tp > 1 else (False,)):
                            yield Layout(dims=dims, recompute=recompute, micro_batch=micro_batch,
                                         sequence_parallel=sp)
