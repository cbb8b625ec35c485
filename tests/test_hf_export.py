"""convert_checkpoint.py --to hf as users meet it: the directory loads with
from_pretrained(trust_remote_code=True) alone and gives the native logits and greedy text;
bf16; sharding; checkpoint.init_from back (bit-identical); every refusal (exit 3, one line,
nothing written). Sources here are safetensors exports of tiny models; tests/dist/test_convert.py
exports real checkpoints of other layouts.

The variants loaded through from_pretrained are a covering set: every value of every axis
(6 schemes, both norms, both positions, both activations, tied and untied, decoder and encoder)
appears; tests/test_hf_model.py checks all 192 combinations on the shipped classes directly.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from magneto_dist.checkpoint import export, hf_export, hf_format
from magneto_dist.checkpoint import tags as ckpt
from magneto_dist.config import load_config
from magneto_dist.training.generate import sample

from tests.hf_fixtures import VOCAB, other_tokenizer, project_tokenizer, safetensors_source
from tools import convert_checkpoint

TINY = ["model.num_layers=2", "model.hidden_size=32", "model.num_heads=4",
        "model.ffn_hidden_size=48", "model.max_seq_len=64"]
COVERING = [  # (arch, norm, norm_type, position, activation, tie_embeddings)
    ("decoder", "magneto", "layernorm", "rope", "gelu", True),
    ("decoder", "post_ln", "rmsnorm", "learned", "swiglu", False),
    ("decoder", "deepnorm", "layernorm", "learned", "swiglu", True),
    ("decoder", "normformer", "rmsnorm", "rope", "gelu", False),
    ("decoder", "lns", "rmsnorm", "learned", "gelu", True),
    ("decoder", "pre_ln", "layernorm", "rope", "swiglu", False),
    ("encoder", "magneto", "layernorm", "rope", "gelu", True),
    ("encoder", "deepnorm", "rmsnorm", "learned", "swiglu", False),
]
AUTO = {"decoder": "AutoModelForCausalLM", "encoder": "AutoModelForMaskedLM"}


def overrides(variant):
    arch, norm, norm_type, position, activation, tied = variant
    return TINY + [f"model.arch={arch}", f"model.norm={norm}", f"model.norm_type={norm_type}",
                   f"model.position={position}", f"model.activation={activation}",
                   f"model.tie_embeddings={str(tied).lower()}"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return project_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def load(directory, arch="decoder", **kwargs):
    import transformers

    return getattr(transformers, AUTO[arch]).from_pretrained(
        str(directory), trust_remote_code=True, **kwargs).eval()


def ids(length=24, seed=1):
    return torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
@pytest.mark.parametrize("variant", COVERING, ids=lambda v: "-".join(map(str, v)))
def test_export_loads_in_transformers_with_the_native_logits_and_greedy_text(
        tmp_path, tokenizer, variant):
    source, cfg, native = safetensors_source(tmp_path / "src", overrides(variant), tokenizer)
    out = tmp_path / "hf"
    hf_export.export_hf(source, str(out))
    config = json.loads((out / "config.json").read_text())
    head, auto = hf_format.HEAD_CLASSES[cfg.arch]
    assert config["model_type"] == "magneto" and config["architectures"] == [head]
    assert config["auto_map"][auto] == f"modeling_magneto.{head}"
    for name in hf_export.TEMPLATE_FILES:  # shipped verbatim
        assert (out / name).read_bytes() == (
            open(os.path.join(hf_export.TEMPLATE_DIR, name), "rb").read())
    assert (out / "generation_config.json").exists() == (cfg.arch == "decoder")
    model = load(out, cfg.arch)
    tokens = ids()
    if cfg.arch == "encoder":
        assert (model(tokens).logits - native(tokens)).abs().max() <= 1e-5
        return
    assert (model(tokens).logits - native(tokens)).abs().max() <= 1e-5
    prompt = tokens[0, :8]
    expected = sample(native, prompt.tolist(), 32, VOCAB, cfg.max_seq_len, temperature=0,
                      eod=config["eos_token_id"])
    generated = model.generate(prompt[None], max_new_tokens=32, do_sample=False)
    assert generated[0].tolist() == expected


def test_the_export_needs_neither_this_project_nor_the_network(tmp_path, tokenizer):
    """Loaded in a fresh interpreter, offline, from another directory: the model generates and
    the tokenizer round-trips text, and magneto_dist was never imported. (transformers 5's
    AutoTokenizer reads config.json through AutoConfig, so a model with remote code needs
    trust_remote_code=True there too, or it asks.)"""
    source, _, _ = safetensors_source(tmp_path / "src", TINY, tokenizer)
    hf_export.export_hf(source, str(tmp_path / "hf"))
    script = ("import sys; from transformers import AutoModelForCausalLM, AutoTokenizer; "
              f"d = {str(tmp_path / 'hf')!r}; "
              "m = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True); "
              "t = AutoTokenizer.from_pretrained(d, trust_remote_code=True); "
              "x = t('def f(x):\\n    return x', return_tensors='pt'); "
              "y = m.generate(**x, max_new_tokens=5, do_sample=False); "
              "assert t.decode(x['input_ids'][0]) == 'def f(x):\\n    return x'; "
              "assert y.shape[1] > x['input_ids'].shape[1]; "
              "assert not [k for k in sys.modules if k.startswith('magneto_dist')]; print('ok')")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
    assert "custom code" not in proc.stdout + proc.stderr  # nothing asked


@torch.no_grad()
def test_bf16_export_is_the_fp32_one_rounded(tmp_path, tokenizer):
    source, cfg, native = safetensors_source(tmp_path / "src", TINY, tokenizer)
    hf_export.export_hf(source, str(tmp_path / "bf16"), dtype="bf16")
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), framework="pt") as f:
        for name, param in native.named_parameters():
            assert torch.equal(f.get_tensor(hf_format.hf_name(name)), param.bfloat16())
    model = load(tmp_path / "bf16")
    assert model.dtype == torch.bfloat16  # config.json's dtype: loaded as exported
    tokens = ids()
    reference = native(tokens)
    # The same weights in bf16 through the trainer's own model: the export adds no error of
    # its own, and both stay within bf16 rounding of fp32 (8 mantissa bits, a few ops deep).
    same_dtype = native.bfloat16()(tokens).float()
    got = model(tokens).logits.float()
    scale = reference.abs().max()
    assert (got - same_dtype).abs().max() <= 1e-2 * scale
    assert (got - reference).abs().max() <= 5e-2 * scale


@torch.no_grad()
def test_sharded_export_round_trips_bit_for_bit_and_through_init_from(tmp_path, tokenizer):
    source, cfg, native = safetensors_source(tmp_path / "src", TINY, tokenizer)
    out = tmp_path / "sharded"
    hf_export.export_hf(source, str(out), max_shard_size="20KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (out / "model.safetensors").exists()
    assert (load(out)(ids()).logits - native(ids())).abs().max() <= 1e-5
    run_cfg = load_config(None, TINY + [f"model.vocab_size={VOCAB}"])
    export.check_consolidated(str(out), run_cfg)
    weights = export.consolidated_weights(str(out))
    for name, param in native.named_parameters():
        assert torch.equal(weights(name), param), name
    # ... and an HF export is itself an input: the weights and the tokenizer carry over
    again = tmp_path / "again"
    hf_export.export_hf(str(out), str(again))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (again / name).read_bytes() == (out / name).read_bytes()
    weights = export.consolidated_weights(str(again))
    assert all(torch.equal(weights(n), p) for n, p in native.named_parameters())


def test_init_from_refuses_an_hf_export_that_does_not_fit(tmp_path, tokenizer):
    source, _, _ = safetensors_source(tmp_path / "src", TINY, tokenizer)
    out = tmp_path / "hf"
    hf_export.export_hf(source, str(out), max_shard_size="20KB")
    wider = load_config(None, TINY + [f"model.vocab_size={VOCAB}", "model.ffn_hidden_size=64"])
    with pytest.raises(ckpt.CheckpointError, match="holds another model: model.ffn_hidden_size: "
                       "checkpoint 48, config 64"):
        export.check_consolidated(str(out), wider)
    index_path = out / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = sorted(index["weight_map"].values())[0]
    index["weight_map"]["model.decoder.layers.2.ffn.fc1.weight"] = first
    index_path.write_text(json.dumps(index))
    run_cfg = load_config(None, TINY + [f"model.vocab_size={VOCAB}"])
    with pytest.raises(ckpt.CheckpointError, match="puts 'model.decoder.layers.2.ffn.fc1.weight' "
                       f"in .*{first}, which does not hold it"):
        export.check_consolidated(str(out), run_cfg)


def convert(capsys, *argv):
    code = convert_checkpoint.main([str(a) for a in argv])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("case,expected", [
    ("not_a_checkpoint", "is not a checkpoint of this project (no config.yaml); pass "
                         "RUN/checkpoints/global_stepN or an export"),
    ("output_exists", "already exists; choose a new directory"),
    ("encoder_decoder", "model.arch='encoder_decoder' cannot be exported to Hugging Face"),
    ("inexact_tokenizer", "its Hugging Face conversion gives other ids on"),
    ("no_tokenizer_record", "does not record its tokenizer"),
    ("tokenizer_gone", "gone.model) cannot be read (tokenizer model "),
    ("other_vocabulary", "has 600 tokens but the model's vocabulary is 512"),
    ("bad_shard_size", "--max-shard-size 5 apples"),
])
def test_hf_export_refusals_exit_3_in_one_line_and_write_nothing(tmp_path, capsys, tokenizer,
                                                                 case, expected):
    arch = "encoder_decoder" if case == "encoder_decoder" else "decoder"
    source, _, _ = safetensors_source(
        tmp_path / "src", TINY + [f"model.arch={arch}"],
        {"no_tokenizer_record": None, "tokenizer_gone": str(tmp_path / "gone.model")}.get(
            case, tokenizer))
    args = ["--input", source, "--to", "hf", "--output", tmp_path / "out"]
    if case == "not_a_checkpoint":
        args[1] = tmp_path / "src" / "empty"
        os.makedirs(args[1])
    elif case == "output_exists":
        (tmp_path / "out").mkdir()
    elif case == "inexact_tokenizer":  # Unigram: transformers' lattice picks other pieces
        args += ["--tokenizer", other_tokenizer(tmp_path, "unigram", model_type="unigram")]
    elif case == "other_vocabulary":
        args += ["--tokenizer", project_tokenizer_of_size(tmp_path, 600)]
    elif case == "bad_shard_size":
        args += ["--max-shard-size", "5 apples"]
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    code, err = convert(capsys, *args)
    assert code == 3 and expected in err, err
    if case == "tokenizer_gone":  # a run's relative data.cache_dir seen from elsewhere
        assert err.rstrip().endswith("; pass --tokenizer MODEL_OR_DIR")
    assert err.startswith("checkpoint error: ") and err.count("\n") == 1, err
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # no output, no temp left


def project_tokenizer_of_size(directory, vocab):
    from magneto_dist.data.tokenizer_training import train_sentencepiece

    from tests.hf_fixtures import stdlib_text
    return train_sentencepiece(stdlib_text(directory), os.path.join(directory, f"v{vocab}"),
                               vocab)
