"""lm-evaluation-harness on exported and native models (training/eval_harness.py,
tools/evaluate.py, configs/eval/): the scores are the model's own log-likelihoods, the native
model and its Hugging Face export score the same, and the local tasks run offline on held-out
documents. tests/dist/test_convert.py runs tools/evaluate.py on real checkpoints."""
import importlib.util
import json
import os

import pytest
import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance
from transformers import AutoModelForCausalLM, AutoTokenizer

from magneto_dist.checkpoint.hf_export import export_hf
from magneto_dist.data.tokenizer_types import sentencepiece_tokenizer
from magneto_dist.training.eval_harness import CausalLMAdapter

from tests.hf_fixtures import VOCAB, project_tokenizer, safetensors_source
from tools import evaluate

TINY = ["model.num_layers=2", "model.hidden_size=32", "model.num_heads=4",
        "model.ffn_hidden_size=48", "model.max_seq_len=32"]

def _local_task_module():
    """configs/eval/stdlib_heldout.py, loaded from its file as lm-eval loads it for its YAML."""
    path = os.path.join(evaluate.LOCAL_TASKS_DIR, "stdlib_heldout.py")
    spec = importlib.util.spec_from_file_location("stdlib_heldout", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


stdlib_heldout = _local_task_module()

TEXT = "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n" * 6


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(native adapter, HF adapter, native model, tokenizer) of one tiny model and its export."""
    work = tmp_path_factory.mktemp("models")
    model_file = project_tokenizer(work)
    source, cfg, native = safetensors_source(work / "src", TINY, model_file)
    export_hf(source, str(work / "hf"))
    hf = AutoModelForCausalLM.from_pretrained(str(work / "hf"), trust_remote_code=True).eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(str(work / "hf"), trust_remote_code=True)
    tokenizer = sentencepiece_tokenizer(model_file)
    native_lm = CausalLMAdapter(native, tokenizer.encode, tokenizer.decode, tokenizer.eod,
                                cfg.max_seq_len, VOCAB, batch_size=3)
    hf_lm = CausalLMAdapter(lambda ids: hf(ids).logits,
                            lambda text: hf_tokenizer(text, add_special_tokens=False)["input_ids"],
                            hf_tokenizer.decode, hf_tokenizer.eos_token_id,
                            hf.config.max_position_embeddings, VOCAB, batch_size=5)
    return native_lm, hf_lm, native, tokenizer, str(work / "hf")


def requests(kind, *arguments):
    return [Instance(kind, {}, args, i) for i, args in enumerate(arguments)]


@torch.no_grad()
def test_rolling_loglikelihood_is_the_models_own_sum(models):
    """A text within one window: eod, then every token predicted from all before it."""
    native_lm, _, native, tokenizer, _ = models
    text = "def f(x):\n    return x"
    ids = tokenizer.encode(text)
    assert len(ids) < 32
    logprobs = F.log_softmax(native(torch.tensor([[tokenizer.eod] + ids[:-1]]))[0], -1)
    expected = float(logprobs.gather(1, torch.tensor(ids)[:, None]).sum())
    (got,) = native_lm.loglikelihood_rolling(requests("loglikelihood_rolling", (text,)))
    assert got == pytest.approx(expected, abs=1e-4)


def test_native_model_and_its_export_score_alike(models):
    """Rolling windows across a text several windows long, and context/continuation pairs in
    batches of different sizes (3 and 5: other padding) give the same numbers either way."""
    native_lm, hf_lm, _, _, _ = models
    rolling = requests("loglikelihood_rolling", (TEXT,), (TEXT[:50],))
    assert len(native_lm.tok_encode(TEXT)) > 3 * 32
    for a, b in zip(native_lm.loglikelihood_rolling(rolling), hf_lm.loglikelihood_rolling(rolling)):
        assert a == pytest.approx(b, abs=1e-3)
    pairs = requests("loglikelihood", *[(TEXT[:k], TEXT[k:k + 9]) for k in range(20, 300, 25)])
    for (a, greedy_a), (b, greedy_b) in zip(native_lm.loglikelihood(pairs),
                                            hf_lm.loglikelihood(pairs)):
        assert a == pytest.approx(b, abs=1e-4) and greedy_a == greedy_b


def test_generate_until_stops_at_the_stop_string(models):
    native_lm, hf_lm, _, _, _ = models
    calls = requests("generate_until", ("def f(x):", {"until": ["\n"], "max_gen_toks": 12}))
    (native_text,) = native_lm.generate_until(calls)
    assert native_text == hf_lm.generate_until(calls)[0] and "\n" not in native_text


def test_local_tasks_run_offline_on_an_export(models, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out = tmp_path / "eval.json"
    code = evaluate.main(["--hf", models[4], "--limit", "3", "--output", str(out)])
    assert code == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    ppl, cloze = result["tasks"]["magneto_stdlib_ppl"], result["tasks"]["magneto_stdlib_cloze"]
    assert set(ppl) == {"word_perplexity", "byte_perplexity", "bits_per_byte"}
    assert 0 < ppl["bits_per_byte"] < 20 and 0 <= cloze["acc"] <= 1
    assert result["n-samples"]["magneto_stdlib_ppl"]["effective"] == 3


def test_unknown_task_is_a_one_line_config_error(models, capsys):
    assert evaluate.main(["--hf", models[4], "--tasks", "no_such_task"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("config error: --tasks: lm-eval knows no task no_such_task")


def test_held_out_documents_are_those_after_the_training_split(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(10)))
    assert stdlib_heldout.heldout_documents(str(corpus), "8,1,1") == ["document 8", "document 9"]
    assert stdlib_heldout.heldout_documents(str(corpus), "7,3,0") == [
        "document 7", "document 8", "document 9"]
    with pytest.raises(ValueError, match="trains on all 10 documents"):
        stdlib_heldout.heldout_documents(str(corpus), "1,0,0")
    items = stdlib_heldout.cloze_items(corpus_jsonl=str(corpus), split="8,1,1")["test"]
    for context, target in zip(items["context"], items["target"]):
        assert target.startswith(" ") and not context[-1].isspace()
