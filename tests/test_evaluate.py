"""lm-evaluation-harness on exported and native models (training/eval_harness.py,
tools/evaluate.py, configs/eval/): the scores are the model's own log-likelihoods, the native
model and its Hugging Face export score the same, and the local tasks run offline on held-out
documents. tests/dist/test_convert.py runs tools/evaluate.py on real checkpoints."""
import importlib.util
import json
import os
import sys

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


# A multiple-choice task of a user's own over a local jsonl, as lm-eval's docs write one.
CHOICE_TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: question
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
CHOICES = [("def add(a, b):\n    return a", ["+ b", "- b", "* b"], 0),
           ("for i in range(10):\n    print(i", [")", "]", "}"], 0),
           ("import os\npath = os.path", [".join(a, b)", "[0]", ".x"], 1),
           ("class Point:\n    def __init__(self,", ["x, y):", "):", "lambda"], 2),
           ("with open(name) as", ["f:", "g", "("], 0),
           ("if x is", ["None:", "not None:", "True"], 1)]


def choice_task(folder, name, items):
    """A task folder with one multiple-choice YAML over a jsonl of `items`."""
    folder.mkdir()
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n"
                            for q, c, a in items))
    (folder / f"{name}.yaml").write_text(CHOICE_TASK.format(name=name, data=data))
    return folder


def expected_choice_scores(lm, items):
    """acc and acc_norm as lm-eval defines them: the choice of highest log-likelihood after the
    question and a space (and per character of the choice), against the answer."""
    requests_ = requests("loglikelihood", *[(q, " " + c) for q, choices, _ in items
                                            for c in choices])
    scores = iter(lm.loglikelihood(requests_))
    acc = norm = 0
    for _, choices, answer in items:
        lls = [next(scores)[0] for _ in choices]
        acc += max(range(len(lls)), key=lls.__getitem__) == answer
        norm += max(range(len(lls)), key=lambda i: lls[i] / len(choices[i])) == answer
    return {"acc": acc / len(items), "acc_norm": norm / len(items)}


def test_include_path_runs_tasks_of_the_users_own(models, tmp_path, capsys):
    """Refused before ("lm-eval knows no task"): two folders, a task in each, scored with the
    model's own log-likelihoods."""
    native_lm, hf_dir = models[0], models[4]
    first = choice_task(tmp_path / "tasks_a", "my_choice", CHOICES[:3])
    second = choice_task(tmp_path / "tasks_b", "my_other_choice", CHOICES[3:])
    out = tmp_path / "eval.json"
    code = evaluate.main(["--hf", hf_dir, "--include-path", str(first), "--include-path",
                          str(second), "--tasks", "my_choice,my_other_choice",
                          "--output", str(out)])
    assert code == 0, capsys.readouterr().err
    scores = json.loads(out.read_text())["tasks"]
    assert scores["my_choice"] == pytest.approx(expected_choice_scores(native_lm, CHOICES[:3]))
    assert scores["my_other_choice"] == pytest.approx(
        expected_choice_scores(native_lm, CHOICES[3:]))


def test_a_missing_include_path_is_a_config_error(models, tmp_path, capsys):
    assert evaluate.main(["--hf", models[4], "--include-path", str(tmp_path / "nowhere"),
                          "--tasks", "my_choice"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"config error: --include-path {tmp_path / 'nowhere'}: not a "
                          "directory; pass a folder of lm-eval task YAML files")


def test_unknown_task_is_a_one_line_config_error_naming_the_local_ones(models, tmp_path,
                                                                      capsys):
    """Looked up in lm-eval's own tasks too (an index of thousands of YAML files, built only
    for a task that no local folder has)."""
    folder = choice_task(tmp_path / "tasks", "my_choice", CHOICES)
    assert evaluate.main(["--hf", models[4], "--include-path", str(folder),
                          "--tasks", "my_choice,no_such_task"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("config error: --tasks: lm-eval knows no task no_such_task (local: "
                          "magneto_stdlib_cloze, magneto_stdlib_ppl, my_choice; `lm_eval ls "
                          "tasks` lists the others)"), err
    assert err.count("\n") == 1


def test_lm_evals_own_hf_model_scores_an_export_as_evaluate_does(models, tmp_path, capsys,
                                                                 monkeypatch,
                                                                 accelerate_process_group):
    """`lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True` (the command
    lm-eval's users type first; it stopped on a missing accelerate), offline, on the local
    tasks and a task of the user's own: the scores are tools/evaluate.py's."""
    import shutil

    from lm_eval.__main__ import cli_evaluate

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    folder = choice_task(tmp_path / "tasks", "my_choice", CHOICES)
    tasks = "magneto_stdlib_ppl,magneto_stdlib_cloze,my_choice"
    ours = tmp_path / "evaluate.json"
    assert evaluate.main(["--hf", models[4], "--include-path", str(folder), "--tasks", tasks,
                          "--limit", "3", "--output", str(ours)]) == 0, capsys.readouterr().err
    for name in ("magneto_stdlib_ppl.yaml", "magneto_stdlib_cloze.yaml", "stdlib_heldout.py"):
        shutil.copy(os.path.join(evaluate.LOCAL_TASKS_DIR, name), folder)  # one --include_path
    monkeypatch.setattr(sys, "argv", [
        "lm_eval", "--model", "hf", "--model_args",
        f"pretrained={models[4]},trust_remote_code=True,dtype=float32", "--tasks", tasks,
        "--include_path", str(folder), "--limit", "3", "--batch_size", "4",
        "--output_path", str(tmp_path / "lm_eval")])
    cli_evaluate()
    (written,) = (tmp_path / "lm_eval").rglob("results_*.json")
    theirs = evaluate.summary(json.loads(written.read_text()))
    expected = json.loads(ours.read_text())["tasks"]
    assert sorted(theirs) == sorted(expected) == sorted(tasks.split(","))
    for task, values in expected.items():
        assert theirs[task].keys() == values.keys()
        for metric, value in values.items():
            assert theirs[task][metric] == pytest.approx(value, rel=1e-4), (task, metric)
