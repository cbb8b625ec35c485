"""The rest of transformers' PreTrainedModel surface on the shipped model code, as users of an
export meet it after logits and generate(): hidden states and attention weights, return_dict,
resize_token_embeddings and the embedding accessors, num_parameters, gradient checkpointing,
fine-tuning through transformers' Trainer (with gradient accumulation), device_map loading and
the masked-LM export through pipeline("fill-mask"). Each is checked against the model's own
numbers, not only that it runs."""
import logging

import pytest
import torch
import torch.nn.functional as F

from magneto_dist.checkpoint.hf_export import export_hf
from magneto_dist.checkpoint.hf_model import modeling_magneto

from tests.hf_fixtures import VOCAB, project_tokenizer, safetensors_source
from tests.test_hf_model import EVERY, MUP, native_model, shipped_model, tokens

MAGNETO = dict(EVERY[0], norm="magneto", position="rope")  # has a final norm
# eager attention repeats the key/value groups and takes muP's scale, as sdpa is given them
MODERN = dict(MAGNETO, qk_norm=True, num_query_groups=2, **MUP)
POST_LN = dict(EVERY[0], norm="post_ln")                   # has none
TINY = ["model.num_layers=2", "model.hidden_size=32", "model.num_heads=4",
        "model.ffn_hidden_size=48", "model.max_seq_len=32"]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """{arch: (export directory, native model)} of two tiny perturbed models."""
    work = tmp_path_factory.mktemp("exports")
    model_file = project_tokenizer(work)
    out = {}
    for arch in ("decoder", "encoder"):
        source, _, native = safetensors_source(work / f"src_{arch}", TINY + [f"model.arch={arch}"],
                                               model_file)
        out[arch] = (export_hf(source, str(work / f"hf_{arch}")), native)
    return out


def layer_outputs(model, ids, **kwargs):
    """(what each layer returned, the model output with hidden states) via forward hooks."""
    seen = []
    hooks = [layer.register_forward_hook(lambda m, a, out: seen.append(out))
             for layer in model.model.stack.layers]
    try:
        out = model(ids, output_hidden_states=True, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    return seen, out


@torch.no_grad()
@pytest.mark.parametrize("arch", ["decoder", "encoder"])
@pytest.mark.parametrize("variant", [MAGNETO, POST_LN], ids=["magneto", "post_ln"])
def test_hidden_states_are_the_embeddings_each_layers_output_and_the_final_norm(arch, variant):
    """transformers' contract: num_layers + 1 tensors, the embeddings first, then each layer's
    output, the last one after the final norm where the scheme has one (LlamaModel's)."""
    cfg, native = native_model(arch, variant)
    model = shipped_model(cfg, native)
    ids = tokens(cfg.vocab_size, length=12)
    seen, out = layer_outputs(model, ids)
    states = out.hidden_states
    assert isinstance(states, tuple) and len(states) == cfg.num_layers + 1
    positions = torch.arange(12)[None].expand(2, 12)
    assert torch.equal(states[0], model.model.embed(ids, positions))
    for i in range(1, cfg.num_layers):
        assert torch.equal(states[i], seen[i - 1])
    final_norm = model.model.stack.final_norm
    assert (final_norm is not None) == (variant is MAGNETO)
    last = final_norm(seen[-1]) if final_norm is not None else seen[-1]
    assert torch.equal(states[-1], last)
    head = model.lm_head if arch == "decoder" else (
        lambda h: model.lm_head(model.mlm_norm(F.gelu(model.mlm_dense(h)))))
    assert torch.equal(head(states[-1]), out.logits)
    assert model(ids).hidden_states is None  # asked for only


@torch.no_grad()
def test_generate_returns_the_hidden_states_of_every_step():
    cfg, native = native_model("decoder", MAGNETO)
    model = shipped_model(cfg, native)
    out = model.generate(tokens(cfg.vocab_size, length=6), max_new_tokens=3, do_sample=False,
                         output_hidden_states=True, return_dict_in_generate=True,
                         pad_token_id=0, eos_token_id=None)
    assert len(out.hidden_states) == 3  # per step: the layers' tuple
    assert [h[-1].shape[1] for h in out.hidden_states] == [6, 1, 1]  # prompt, then one token
    assert all(len(h) == cfg.num_layers + 1 for h in out.hidden_states)


def eager(model):
    model.config._attn_implementation = "eager"  # what attn_implementation="eager" loads
    return model


@torch.no_grad()
@pytest.mark.parametrize("arch", ["decoder", "encoder"])
@pytest.mark.parametrize("variant", [MAGNETO, MODERN], ids=["magneto", "gqa_qk_norm_mup"])
def test_eager_attention_returns_the_probabilities_and_the_same_logits(arch, variant):
    cfg, native = native_model(arch, variant)
    sdpa = shipped_model(cfg, native)
    model = eager(shipped_model(cfg, native))
    ids = tokens(cfg.vocab_size, length=10)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # the second row is padded
    out = model(ids, attention_mask=mask, output_attentions=True)
    expected = sdpa(ids, attention_mask=mask).logits
    assert (out.logits - expected)[mask.bool()].abs().max() <= 1e-5
    assert len(out.attentions) == cfg.num_layers
    for probs in out.attentions:
        assert probs.shape == (2, cfg.num_heads, 10, 10)
        assert torch.allclose(probs.sum(-1), torch.ones(2, cfg.num_heads, 10), atol=1e-6)
        assert probs[1, :, :7, 7:].abs().max() == 0  # nobody attends to padding
        if arch == "decoder":  # nobody attends to a later position
            assert probs[0].triu(1).abs().max() == 0
        else:  # ... in an encoder, everybody attends to every position
            assert probs[0].min() > 0


@torch.no_grad()
@pytest.mark.parametrize("variant", [MAGNETO, MODERN], ids=["magneto", "gqa_qk_norm_mup"])
def test_eager_attention_with_a_kv_cache_gives_each_new_tokens_row(variant):
    cfg, native = native_model("decoder", variant)
    model = eager(shipped_model(cfg, native))
    ids = tokens(cfg.vocab_size, length=9)
    full = model(ids, output_attentions=True)
    prefill = model(ids[:, :8], use_cache=True)
    step = model(ids[:, 8:], past_key_values=prefill.past_key_values, use_cache=True,
                 output_attentions=True)
    assert (step.logits[:, 0] - full.logits[:, 8]).abs().max() <= 1e-5
    for cached, whole in zip(step.attentions, full.attentions):
        assert cached.shape == (2, cfg.num_heads, 1, 9)
        assert (cached[:, :, 0] - whole[:, :, 8]).abs().max() <= 1e-6


@torch.no_grad()
def test_sdpa_attention_warns_and_returns_no_weights_as_transformers_models_do(caplog):
    """transformers' own models (LlamaModel under SDPA) log a warning and return an empty
    tuple: scaled_dot_product_attention never forms the probabilities."""
    cfg, native = native_model("decoder", MAGNETO)
    model = shipped_model(cfg, native)
    modeling_magneto.logger.warning_once.cache_clear()  # once per process otherwise
    with caplog.at_level(logging.WARNING):
        out = model(tokens(cfg.vocab_size), output_attentions=True)
    assert out.attentions == ()
    assert 'attn_implementation="eager" to get the attention weights' in caplog.text


@torch.no_grad()
def test_return_dict_false_gives_the_outputs_as_a_tuple():
    cfg, native = native_model("decoder", MAGNETO)
    model = shipped_model(cfg, native)
    ids = tokens(cfg.vocab_size)
    as_dict = model(ids, labels=ids, output_hidden_states=True)
    loss, logits, cache, states = model(ids, labels=ids, output_hidden_states=True,
                                        return_dict=False)
    assert torch.equal(loss, as_dict.loss) and torch.equal(logits, as_dict.logits)
    assert cache.get_seq_length() == ids.shape[1] and len(states) == cfg.num_layers + 1


def grads_of(model, ids, seed):
    torch.manual_seed(seed)  # the same dropout masks in both runs
    model.zero_grad()
    model(ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("enable", ["gradient_checkpointing_enable",
                                    "activation_checkpointing_enable"])
def test_gradient_checkpointing_recomputes_each_layer_with_the_same_gradients(enable):
    """Refused before ("does not support activation checkpointing"). With dropout on, the
    recompute draws the forward's masks again (torch's checkpoint keeps the RNG state)."""
    cfg, native = native_model("decoder", dict(MAGNETO, dropout=0.1))
    model = shipped_model(cfg, native).train()
    ids = tokens(cfg.vocab_size)
    calls = []  # a pre-hook: the recompute stops early, once it has what backward needs
    for layer in model.model.stack.layers:
        layer.register_forward_pre_hook(lambda m, args: calls.append(m))
    plain = grads_of(model, ids, seed=5)
    assert len(calls) == cfg.num_layers
    getattr(model, enable)()
    assert model.is_gradient_checkpointing
    calls.clear()
    checkpointed = grads_of(model, ids, seed=5)
    assert len(calls) == 2 * cfg.num_layers  # forward, then the recompute in backward
    assert plain.keys() == checkpointed.keys() and len(plain) == len(list(model.parameters()))
    for name, grad in plain.items():
        assert torch.allclose(checkpointed[name], grad, atol=1e-6), name
    assert model(ids, use_cache=True).past_key_values is None  # no cache in a recompute
    model.gradient_checkpointing_disable()
    calls.clear()
    grads_of(model, ids, seed=5)
    assert len(calls) == cfg.num_layers


@pytest.mark.parametrize("arch,tied", [("decoder", True), ("decoder", False), ("encoder", True)])
def test_resize_token_embeddings_keeps_the_old_logits_the_tie_and_saves(tmp_path, arch, tied):
    cfg, native = native_model(arch, dict(MAGNETO, tie_embeddings=tied))
    model = shipped_model(cfg, native)
    ids = tokens(cfg.vocab_size)
    with torch.no_grad():
        before = model(ids).logits
    model.resize_token_embeddings(cfg.vocab_size + 7)
    assert model.config.vocab_size == cfg.vocab_size + 7
    assert model.get_input_embeddings().weight.shape == (cfg.vocab_size + 7, cfg.hidden_size)
    assert model.get_output_embeddings().weight.shape == (cfg.vocab_size + 7, cfg.hidden_size)
    assert (model.lm_head.weight is model.model.embed.word.weight) == tied
    with torch.no_grad():
        after = model(ids).logits
    assert torch.allclose(after[..., :cfg.vocab_size], before, atol=1e-5)
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).eval()
    assert type(model).config_class.from_pretrained(tmp_path).vocab_size == cfg.vocab_size + 7
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, after)


@torch.no_grad()
def test_embedding_accessors_swap_what_the_model_uses():
    cfg, native = native_model("decoder", dict(MAGNETO, tie_embeddings=False))
    model = shipped_model(cfg, native)
    ids = tokens(cfg.vocab_size)
    assert model.get_input_embeddings() is model.model.embed.word
    assert model.get_output_embeddings() is model.lm_head
    before = model(ids).logits
    model.set_input_embeddings(torch.nn.Embedding(cfg.vocab_size, cfg.hidden_size))
    assert not torch.allclose(model(ids).logits, before)
    zero_head = torch.nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
    torch.nn.init.zeros_(zero_head.weight)
    model.set_output_embeddings(zero_head)
    assert model(ids).logits.abs().max() == 0


@pytest.mark.parametrize("tied", [True, False])
def test_num_parameters_counts_the_native_models_parameters(tied):
    cfg, native = native_model("decoder", dict(EVERY[0], tie_embeddings=tied))  # learned pos.
    model = shipped_model(cfg, native)
    total = sum(p.numel() for p in native.parameters())  # a tied head once
    assert model.num_parameters() == total
    embeddings = cfg.vocab_size * cfg.hidden_size + cfg.max_seq_len * cfg.hidden_size
    assert model.num_parameters(exclude_embeddings=True) == total - embeddings
    model.model.requires_grad_(False)
    assert model.num_parameters(only_trainable=True) == (0 if tied else cfg.vocab_size
                                                          * cfg.hidden_size)


def trainer_run(directory, batch, accumulation, data, tmp_path):
    """2 optimizer steps of transformers' Trainer on CPU (plain SGD: the update is the
    gradient); returns (model, logged losses)."""
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True)
    args = TrainingArguments(
        output_dir=str(tmp_path / f"trainer{accumulation}"), per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation, max_steps=2, learning_rate=0.05,
        lr_scheduler_type="constant", optim="sgd", max_grad_norm=0, use_cpu=True, seed=0,
        logging_steps=1, save_strategy="no", report_to=[], dataloader_num_workers=0,
        disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    return model, [row["loss"] for row in trainer.state.log_history if "loss" in row]


def test_trainer_fine_tunes_the_export_alike_with_and_without_gradient_accumulation(
        exports, tmp_path, accelerate_process_group):
    """Trainer passes num_items_in_batch to a model whose forward takes **kwargs and then does
    not divide the loss by the accumulation steps: the model ignored it, so with 2 steps of
    accumulation the logged loss and every gradient were doubled. Now 2 x 2 samples train
    exactly as 1 x 4 (the padding label -100 is not counted)."""
    directory, native = exports["decoder"]
    generator = torch.Generator().manual_seed(0)
    data = []
    for row in torch.randint(0, VOCAB, (8, 16), generator=generator):
        labels = row.clone()
        labels[-3:] = -100  # e.g. padding
        data.append({"input_ids": row, "labels": labels})
    whole, whole_losses = trainer_run(directory, 4, 1, data, tmp_path)
    accumulated, accumulated_losses = trainer_run(directory, 2, 2, data, tmp_path)
    assert accumulated_losses == pytest.approx(whole_losses, abs=1e-5)
    with torch.no_grad():
        first = native(data[0]["input_ids"][None])
        ids = data[0]["input_ids"][None]
        assert not torch.allclose(whole(ids).logits, first, atol=1e-3)  # it trained
    for (name, a), b in zip(whole.named_parameters(), accumulated.parameters()):
        assert torch.allclose(a, b, atol=1e-6), name


@torch.no_grad()
@pytest.mark.parametrize("device_map", ["cpu", "auto"])
def test_device_map_loading_through_accelerate_gives_the_native_logits(exports, device_map):
    from transformers import AutoModelForCausalLM

    directory, native = exports["decoder"]
    model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True,
                                                 device_map=device_map).eval()
    assert model.device.type == "cpu" and model.lm_head.weight is model.model.embed.word.weight
    ids = tokens(VOCAB)
    assert (model(ids).logits - native(ids)).abs().max() <= 1e-5


@torch.no_grad()
def test_fill_mask_pipeline_ranks_by_the_native_models_probabilities(exports):
    """The encoder export's tokenizer names its mask token (the pipeline refused it: "does not
    define a mask_token") and wraps a text in <cls> ... <sep> as the training samples were."""
    from transformers import AutoTokenizer, pipeline

    directory, native = exports["encoder"]
    tokenizer = AutoTokenizer.from_pretrained(directory)
    text = "def f(x):\n    return <mask> + 1"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    assert ids.count(tokenizer.mask_token_id) == 1
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == ids[1:-1]
    fill = pipeline("fill-mask", model=directory, trust_remote_code=True, top_k=3)
    predictions = fill(text)
    logits = native(torch.tensor([ids]))[0, ids.index(tokenizer.mask_token_id)]
    probs, best = F.softmax(logits, -1).topk(3)
    assert [p["token"] for p in predictions] == best.tolist()
    assert [p["score"] for p in predictions] == pytest.approx(probs.tolist(), abs=1e-6)
