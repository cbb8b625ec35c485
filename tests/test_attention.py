"""Document masking (packed sequences) and the context-parallel layout, in one process: the
mask is right (a packed sequence's logits equal each document run alone), the GPU kernel
(FlexAttention) equals the CPU one, the head-and-tail chunks balance the causal work, and the
configurations that cannot run are refused by name before any process starts."""
import pytest
import torch

from magneto_dist.config import ConfigError, load_config, validate
from magneto_dist.dims import ParallelDims, describe
from magneto_dist.model import ModelConfig, build_model
from magneto_dist.model.attention import Documents, DotProductAttention, documents_from_tokens
from magneto_dist.parallel.context_parallel import (block_kind, chunk_bounds, local_positions,
                                                    shard_batch)
from magneto_dist.training.tasks import GPTTask

EOD = 3


def _packed(position: str):
    torch.manual_seed(0)
    model = build_model(ModelConfig(num_layers=2, hidden_size=32, num_heads=4, vocab_size=50,
                                    max_seq_len=24, position=position), seed=1).eval()
    lengths = [7, 5, 12]  # each document ends with its eod token
    docs = []
    for n in lengths:
        doc = torch.randint(4, 50, (n,))
        doc[-1] = EOD
        docs.append(doc)
    return model, docs


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_a_packed_sequence_computes_each_document_as_if_alone(position):
    """Block-causal attention plus positions restarting: the logits of each document inside the
    packed sequence equal that document's logits run by itself, and so its per-token losses."""
    model, docs = _packed(position)
    tokens = torch.cat(docs)[None]                                     # [1, 24]
    batch = GPTTask(50, document_eod=EOD, reset_positions=True).prepare(
        {"tokens": tokens, "position_ids": torch.cat([torch.arange(len(d)) for d in docs])[None]})
    with torch.no_grad():
        packed = model(tokens, batch["position_ids"], batch["document_ids"])
        alone = [model(doc[None]) for doc in docs]
        unmasked = model(tokens)
    start = 0
    for doc, logits in zip(docs, alone):
        got = packed[:, start:start + len(doc)]
        assert (got - logits).abs().max() < 1e-5, (start, (got - logits).abs().max())
        start += len(doc)
    assert (packed - unmasked).abs().max() > 1e-2  # the mask really changes later documents


def test_document_ids_close_each_document_with_its_eod():
    tokens = torch.tensor([[5, EOD, 6, 7, EOD, EOD, 8]])
    assert documents_from_tokens(tokens, EOD).tolist() == [[0, 0, 1, 1, 1, 2, 3]]


def test_flex_attention_equals_the_dense_mask():
    """The GPU path (FlexAttention with a block mask, compiled) against the CPU path (SDPA with
    the dense block-causal mask), here on the CPU, where FlexAttention compiles its forward
    (its backward is GPU-only in torch 2.13, so the gradients are torch's to get right)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 32, 16, generator=g) for _ in range(3))
    ids = torch.stack([torch.tensor([0] * 9 + [1] * 15 + [2] * 8), torch.zeros(32).long()])
    dense, flex = (DotProductAttention(flex=use)(q, k, v, causal=True, documents=Documents(ids))
                   for use in (False, True))
    assert (dense - flex).abs().max() < 1e-5
    plain = DotProductAttention()(q, k, v, causal=True)
    assert (dense - plain)[0].abs().max() > 1e-2  # the documents mattered
    assert (dense - plain)[1].abs().max() < 1e-6  # one document: plain causal


def test_the_task_adds_document_ids_and_keeps_positions_only_when_they_matter():
    tokens = torch.tensor([[5, EOD, 6, 7]])
    positions = torch.tensor([[0, 1, 0, 1]])
    plain = GPTTask(50).prepare({"tokens": tokens, "position_ids": positions})
    assert "position_ids" not in plain and "document_ids" not in plain
    packed = GPTTask(50, document_eod=EOD).prepare({"tokens": tokens})
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3]]  # beside the documents
    assert packed["document_ids"].tolist() == [[0, 0, 1, 1]]
    reset = GPTTask(50, reset_positions=True).prepare({"tokens": tokens, "position_ids": positions})
    assert reset["position_ids"].tolist() == positions.tolist()


@pytest.mark.parametrize("cp", [2, 4, 8])
def test_head_and_tail_chunks_cover_the_sequence_and_balance_the_causal_work(cp):
    seq = 16 * cp
    held = sorted(p for r in range(cp) for p in local_positions(r, cp, seq).tolist())
    assert held == list(range(seq))
    work = []
    for rank in range(cp):
        blocks = [block_kind(q, k, causal=True) for source in range(cp)
                  for q in chunk_bounds(rank, cp, seq) for k in chunk_bounds(source, cp, seq)]
        work.append(sum({"full": 2, "diagonal": 1, None: 0}[b] for b in blocks))  # half-blocks
    assert len(set(work)) == 1, work  # every rank the same work: 2 x CP + 1 chunk pairs
    assert work[0] == 2 * (2 * cp + 1) - 2  # two diagonal halves


def test_shard_batch_gives_each_rank_its_chunks_with_their_global_positions():
    tokens = torch.arange(8)[None]
    batch = {"tokens": tokens, "labels": tokens + 1, "loss_mask": torch.ones(1, 8),
             "meta": "kept"}
    rank1 = shard_batch(batch, 1, 2)
    assert rank1["tokens"].tolist() == [[2, 3, 4, 5]]  # chunks 1 and 2 of 4
    assert rank1["labels"].tolist() == [[3, 4, 5, 6]]
    assert rank1["position_ids"].tolist() == [[2, 3, 4, 5]]
    assert rank1["meta"] == "kept"
    assert shard_batch(batch, 0, 2)["tokens"].tolist() == [[0, 1, 6, 7]]


def test_context_parallel_dims_and_checkpoint_layouts():
    dims = ParallelDims.build(world=8, tp=2, pp=1, micro_batch=1, global_batch=4, zero_stage=1,
                              cp=2)
    assert (dims.dp, dims.grad_replicas, dims.grad_accum) == (2, 4, 2)
    assert dims.layout == {"tp": 2, "pp": 1, "dp": 2, "cp": 2, "zero_stage": 1}
    assert describe(dims.layout) == "TP2 x CP2 x PP1 x DP2 (ZeRO-1)"
    old = {"tp": 1, "pp": 1, "dp": 2, "zero_stage": 1}  # a marker from before CP
    assert ParallelDims.build(2, 1, 1, 1, 2, 1).layout == old  # recorded as before
    assert describe(old) == "TP1 x PP1 x DP2 (ZeRO-1)"


def _validate(world, *overrides):
    return validate(load_config(None, ["model.max_seq_len=32", "train.micro_batch_size=2",
                                       "train.global_batch_size=8", *overrides]), world)


@pytest.mark.parametrize("overrides,world,message", [
    (["parallel.context_parallel_size=3"], 3,
     "model.max_seq_len=32 must split into 2 x CP = 6 equal chunks"),
    (["parallel.context_parallel_size=2", "model.arch=encoder"], 2,
     "context parallelism supports model.arch='decoder' only"),
    (["parallel.context_parallel_size=2", "model.arch=encoder_decoder"], 2,
     "context parallelism supports model.arch='decoder' only"),
    (["parallel.context_parallel_size=2", "model.dropout=0.1"], 2,
     "ring attention computes attention block by block and has no attention dropout"),
    (["parallel.context_parallel_size=2"], 3,
     "world size 3 is not divisible by tensor x context x pipeline parallel size 1 x 2 x 1"),
    (["parallel.context_parallel_size=0"], 2, "parallel.context_parallel_size=0"),
    (["data.reset_attention_mask=true", "model.arch=encoder"], 1,
     "are for packed GPT sequences"),
    (["data.reset_attention_mask=true", "model.dropout=0.1"], 1,
     "FlexAttention) has no attention dropout"),
])
def test_layouts_context_parallelism_cannot_run_are_refused_by_name(overrides, world, message):
    with pytest.raises(ConfigError, match=None) as err:
        _validate(world, *overrides)
    assert message in str(err.value), str(err.value)
