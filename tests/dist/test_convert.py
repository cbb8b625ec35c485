"""tools/convert_checkpoint.py (--to safetensors and --to hf), checkpoint.init_from (from either
export), tools/generate.py and tools/evaluate.py on real checkpoints.

With train.lr=0 the weights stay at their initialization, which is the same in every layout,
so the consolidated exports of a TP1 and a TP2 x PP2 run must be equal bit for bit: any slice
merged in the wrong order or dimension, a padded vocabulary row, or a pipeline name mapped to
the wrong layer shows up as a difference.
"""
import json
import os
import shutil
import subprocess
import sys

import torch
from safetensors import safe_open

from magneto_dist.checkpoint.export import consolidated_weights
from magneto_dist.model import build_model

from .gpt_runs import check_ok, gpt, read_metrics
from .ranks import ROOT, run_ranks

FROZEN = ["train.lr=0", "train.min_lr=0", "train.train_iters=2", "data.builtin_vocab_size=1000"]
TP2 = "parallel.tensor_model_parallel_size=2"
PP2 = "parallel.pipeline_model_parallel_size=2"


# layout -> (ranks, its arguments); the TP1 run saves in the background (its export must still
# be the TP2 x PP2 run's, bit for bit)
FROZEN_LAYOUTS = {"tp1": (1, ["checkpoint.async_save=true"]), "tp2_pp2": (4, [TP2, PP2])}


def frozen_run(shared_run, cache_dir, layout):
    """The session's frozen run of a layout (tests/dist/test_precision.py reads the same)."""
    ranks, args = FROZEN_LAYOUTS[layout]
    return shared_run(lambda run_dir: gpt(run_dir, cache_dir, *FROZEN, *args), ranks)


def convert(*args):
    """tools/convert_checkpoint.py as a user runs it."""
    proc = subprocess.run([sys.executable, "tools/convert_checkpoint.py", *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def convert_here(*args):
    """The same command in this process (an interpreter's start-up and imports saved); the
    subprocess form is run above on every kind of output."""
    from tools import convert_checkpoint

    assert convert_checkpoint.main([str(a) for a in args]) == 0


def weights(export_dir):
    with safe_open(str(export_dir / "model.safetensors"), framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def files_of(directory):
    return {str(p): p.stat().st_size for p in directory.rglob("*") if p.is_file()}


def evaluate(*args):
    proc = subprocess.run([sys.executable, "tools/evaluate.py", *map(str, args), "--limit", "2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


GENERATE = ["--prompt", "def ", "--temperature", "0", "--max-new-tokens", "12"]


def generate(run_dir):
    proc = subprocess.run([sys.executable, "tools/generate.py", "--run", str(run_dir), *GENERATE],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.splitlines()[-1]  # the sample (DeepSpeed may log a line before it)


def generate_here(run_dir, capsys):
    """The same command in this process."""
    from tools import generate as generate_tool

    capsys.readouterr()
    assert generate_tool.main(["--run", str(run_dir), *GENERATE]) == 0
    return capsys.readouterr().out.splitlines()[-1]


def evaluate_here(*args):
    """The same command in this process (local tasks: it goes offline by itself)."""
    from tools import evaluate as evaluate_tool

    assert evaluate_tool.main([*map(str, args), "--limit", "2"]) == 0


def test_exports_of_tp1_and_tp2_pp2_are_equal_and_round_trip(tmp_path, cache_dir, shared_run,
                                                             capsys):
    # copies: the evaluations below write into their runs
    tp1, tp2_pp2 = tmp_path / "tp1", tmp_path / "tp2_pp2"
    shutil.copytree(frozen_run(shared_run, cache_dir, "tp1"), tp1)
    shutil.copytree(frozen_run(shared_run, cache_dir, "tp2_pp2"), tp2_pp2)
    source = tp2_pp2 / "checkpoints" / "global_step2"
    before = files_of(source)
    out = convert("--input", source, "--to", "safetensors", "--output", tmp_path / "export")
    assert "peak RSS" in out
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["config.json",
                                                                       "model.safetensors"]
    convert_here("--input", tp1 / "checkpoints" / "global_step2", "--to", "safetensors",
                 "--output", tmp_path / "export_tp1")
    assert files_of(source) == before  # the input is only read
    exported, reference = weights(tmp_path / "export"), weights(tmp_path / "export_tp1")
    assert sorted(exported) == sorted(reference) and "embed.word.weight" in exported
    assert exported["embed.word.weight"].shape == (1000, 64)  # TP padding (1024) dropped
    for name, tensor in reference.items():
        assert torch.equal(exported[name], tensor), name
    # bf16 export: the same weights rounded
    convert_here("--input", source, "--to", "safetensors", "--output",
                 tmp_path / "export_bf16", "--dtype", "bf16")
    bf16 = weights(tmp_path / "export_bf16")
    assert all(torch.equal(bf16[n], t.bfloat16()) for n, t in reference.items())
    # Import into a TP2 run with another seed (so its own init differs): what it trains from
    # and saves is exactly the export.
    imported = tmp_path / "imported"
    log = check_ok(run_ranks(gpt(imported, cache_dir, *FROZEN, TP2, "train.seed=7",
                                 f"checkpoint.init_from={tmp_path / 'export'}"), 2))
    assert f"weights from {tmp_path / 'export'} (fresh optimizer, step 0)" in log
    assert [r["step"] for r in read_metrics(imported)] == [1, 2]
    convert_here("--input", imported / "checkpoints" / "global_step2", "--to", "safetensors",
                 "--output", tmp_path / "export_again")
    again = weights(tmp_path / "export_again")
    assert all(torch.equal(again[n], t) for n, t in reference.items())
    # The Hugging Face export of the TP2 x PP2 checkpoint: the same weights, under the shipped
    # model code, giving the native logits
    convert("--input", source, "--to", "hf", "--output", tmp_path / "hf")
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == [
        "config.json", "configuration_magneto.py", "generation_config.json", "model.safetensors",
        "modeling_magneto.py", "tokenizer.json", "tokenizer_config.json"]
    from_hf = consolidated_weights(str(tmp_path / "hf"))
    assert all(torch.equal(from_hf(n), t) for n, t in reference.items())
    check_hf_logits(tmp_path / "hf", tp1, reference)
    # ... and it goes back into PP2, whose stages read only their own layers' tensors
    piped = tmp_path / "imported_pp2"
    log = check_ok(run_ranks(gpt(piped, cache_dir, *FROZEN, PP2, "train.seed=9",
                                 f"checkpoint.init_from={tmp_path / 'hf'}"), 2))
    assert f"weights from {tmp_path / 'hf'} (fresh optimizer, step 0)" in log
    convert_here("--input", piped / "checkpoints" / "global_step2", "--to", "safetensors",
                 "--output", tmp_path / "export_pp2")
    again = weights(tmp_path / "export_pp2")
    assert all(torch.equal(again[n], t) for n, t in reference.items())
    # tools/generate.py reads any layout: the same greedy text from both runs
    assert generate(tp2_pp2) == generate_here(tp1, capsys)
    # tools/evaluate.py: the native model of a TP2 x PP2 checkpoint and the HF export of the
    # TP1 one score alike; the run gets eval/STEP.json and a metrics row per task
    evaluate("--run", tp2_pp2)
    evaluate_here("--checkpoint", tp1 / "checkpoints" / "global_step2", "--through", "hf")
    native, exported = (json.loads((run / "eval" / "2.json").read_text())["tasks"]
                        for run in (tp2_pp2, tp1))
    for task, scores in native.items():
        for metric, value in scores.items():
            assert abs(value - exported[task][metric]) <= 1e-4 * max(1.0, abs(value)), metric
    rows = read_metrics(tp1, split="eval")
    assert {r["task"] for r in rows} == set(native) and {r["step"] for r in rows} == {2}


@torch.no_grad()
def check_hf_logits(hf_dir, run_dir, weights):
    """from_pretrained(trust_remote_code=True) gives the native model's logits."""
    from transformers import AutoModelForCausalLM

    from magneto_dist.checkpoint.tags import saved_config

    model = build_model(saved_config(str(run_dir / "checkpoints" / "global_step2")).model)
    for name, param in model.named_parameters():  # the tied head is embed.word.weight
        param.copy_(weights[name])
    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), trust_remote_code=True)
    tokens = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(0))
    assert (hf(tokens).logits - model(tokens)).abs().max() <= 1e-5


def test_universal_output_and_a_model_mismatch_on_init_from(tmp_path, cache_dir, shared_run):
    source = frozen_run(shared_run, cache_dir, "tp2_pp2") / "checkpoints" / "global_step2"
    before = files_of(source.parent.parent)
    convert("--input", source, "--to", "universal", "--output", tmp_path / "universal")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["universal"]  # nothing beside it
    assert files_of(source.parent.parent) == before  # ... nor in the run
    merged = torch.load(tmp_path / "universal" / "zero" / "embed.word.weight" / "fp32.pt",
                        weights_only=False)["param"]
    assert merged.shape == (1000, 64)  # TP2's padded rows (1024) dropped
    convert_here("--input", source, "--to", "safetensors", "--output", tmp_path / "export")
    other = tmp_path / "other"
    for res in run_ranks(gpt(other, cache_dir, *FROZEN, "model.num_layers=3",
                             f"checkpoint.init_from={tmp_path / 'export'}"), 1):
        assert res.returncode == 3, res.output[-3000:]
        assert "holds another model: model.num_layers: checkpoint 2, config 3" in res.output
    assert not (other / "checkpoints").exists()
