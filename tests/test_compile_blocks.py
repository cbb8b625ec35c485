"""train.compile=blocks in one process (magneto_dist/parallel/compile.py), traced as torch's
aot_eager backend does: the forward and backward graphs torch.compile builds, run without
inductor's code generation, so every norm scheme and norm type traces whole (fullgraph) in a
second instead of a compile, and the graphs can be counted. Inductor's numerics and the
parallel layouts: tests/dist/test_layouts.py; the launcher's start-up line and resume:
tests/dist/test_compile.py."""
import functools

import pytest
import torch
import torch._dynamo
import torch._inductor.config
from torch._dynamo.backends.debugging import aot_eager, boxed_nop

from magneto_dist.config import load_config
from magneto_dist.dims import ParallelDims
from magneto_dist.model import build_model
from magneto_dist.parallel.compile import compile_blocks, transformer_blocks

VOCAB, SEQ, BATCH = 50, 8, 2
TINY = ["model.hidden_size=16", "model.num_heads=2", "model.ffn_hidden_size=32",
        f"model.vocab_size={VOCAB}", f"model.max_seq_len={SEQ}", "model.num_layers=2",
        f"train.micro_batch_size={BATCH}", f"train.global_batch_size={BATCH}"]


@pytest.fixture(autouse=True)
def fresh_compiler():
    """Each test compiles from nothing, and the settings compile_blocks changes are put back
    afterwards (one pytest process runs every test file)."""
    dynamo, inductor = torch._dynamo.config, torch._inductor.config
    torch.compiler.reset()
    with dynamo.patch(recompile_limit=dynamo.recompile_limit,
                      accumulated_recompile_limit=dynamo.accumulated_recompile_limit), \
            inductor.patch(fallback_random=inductor.fallback_random):
        yield
    torch.compiler.reset()


def counting_backend(graphs: dict):
    """aot_eager, counting the forward and backward graphs it is given."""
    def count(kind):
        def compiler(gm, example_inputs):
            graphs[kind] += 1
            return boxed_nop(gm, example_inputs)
        return compiler
    return functools.partial(aot_eager, fw_compiler=count("forward"),
                             bw_compiler=count("backward"))


def losses(cfg, graphs=None, steps: int = 3):
    """SGD steps on fixed random batches; compiled blocks when `graphs` (a dict to count
    them in) is given."""
    model = build_model(cfg.model, seed=5)
    if graphs is not None:
        note = compile_blocks(model, cfg, ParallelDims.of(cfg, 1),
                              backend=counting_backend(graphs))
        assert f"{len(transformer_blocks(model))} transformer blocks compile" in note, note
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(3)
    out = []
    for _ in range(steps):
        tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
        if cfg.model.arch == "encoder_decoder":
            logits = model(tokens[:, 1:], tokens[:, :-1])
        else:
            logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        out.append(loss.item())
    return out


# (overrides, distinct block graphs): identical blocks share one graph; LayerNorm Scaling's
# differ by their constant 1/sqrt(layer); an encoder-decoder has two kinds of block
MODELS = [([f"model.norm={norm}"], 1) for norm in
          ("post_ln", "pre_ln", "deepnorm", "magneto", "normformer")] + [
    (["model.norm=lns"], 2),
    (["model.norm_type=rmsnorm", "model.activation=swiglu", "model.position=rope",
      "model.tie_embeddings=false"], 1),
    (["model.arch=encoder", "model.dropout=0.1"], 1),
    (["model.arch=encoder_decoder", "model.norm=deepnorm", "model.num_decoder_layers=2"], 2)]


@pytest.mark.parametrize("overrides,distinct", MODELS,
                         ids=["-".join(x.split("=")[1] for x in o) for o, _ in MODELS])
def test_every_scheme_traces_whole_and_trains_as_eager(overrides, distinct):
    cfg = load_config(None, TINY + overrides)
    torch.manual_seed(0)  # dropout draws from torch's generator in both runs
    eager = losses(cfg)
    graphs = {"forward": 0, "backward": 0}
    torch.manual_seed(0)
    compiled = losses(cfg, graphs)
    assert graphs == {"forward": distinct, "backward": distinct}, graphs
    assert max(abs(a - b) for a, b in zip(eager, compiled)) < 1e-5, (eager, compiled)
    assert eager[-1] != eager[0]


def test_layernorm_scaling_deeper_than_dynamos_recompile_limit_compiles():
    """LNS blocks differ by their constant 1/sqrt(layer), so each compiles its own graph; the
    ninth went past dynamo's default limit of 8 versions and, with fullgraph, raised
    FailOnRecompileLimitHit at the first step of a 12-layer LNS run."""
    cfg = load_config(None, TINY + ["model.norm=lns", "model.num_layers=10"])
    eager = losses(cfg, steps=2)
    graphs = {"forward": 0, "backward": 0}
    compiled = losses(cfg, graphs, steps=2)
    assert graphs == {"forward": 10, "backward": 10}, graphs
    assert max(abs(a - b) for a, b in zip(eager, compiled)) < 1e-5, (eager, compiled)


@pytest.mark.parametrize("overrides,world,reason", [
    (["train.zero_stage=3"], 2, "ZeRO-3 gathers each submodule's parameters in forward hooks"),
    (["parallel.tensor_model_parallel_size=2", "model.dropout=0.1"], 2,
     "attention dropout under tensor parallelism swaps in the per-rank RNG stream")],
    ids=["zero3", "tp2_dropout"])
def test_layouts_that_cannot_compile_stay_eager_and_say_why(overrides, world, reason):
    """Both were compiled by hand to confirm the reason: ZeRO-3 raised dynamo's `Skip calling
    torch.compiler.disable()d function` on DeepSpeed's parameter-gathering hook, TP dropout
    `Attempted to call function marked as skipped` on torch.get_rng_state."""
    cfg = load_config(None, TINY + ["train.global_batch_size=4"] + overrides)
    model = build_model(cfg.model, seed=5)
    note = compile_blocks(model, cfg, ParallelDims.of(cfg, world))
    assert note.startswith("train.compile=blocks: the blocks run eager: " + reason), note
    assert all(block._compiled_call_impl is None for block in transformer_blocks(model))
