"""tools/convert_checkpoint.py, checkpoint.init_from and tools/generate.py on real checkpoints.

With train.lr=0 the weights stay at their initialization, which is the same in every layout,
so the consolidated exports of a TP1 and a TP2 x PP2 run must be equal bit for bit: any slice
merged in the wrong order or dimension, a padded vocabulary row, or a pipeline name mapped to
the wrong layer shows up as a difference.
"""
import subprocess
import sys

import torch
from safetensors import safe_open

from .gpt_runs import check_ok, gpt, read_metrics
from .ranks import ROOT, run_ranks

FROZEN = ["train.lr=0", "train.min_lr=0", "train.train_iters=2", "data.builtin_vocab_size=1000"]
TP2 = "parallel.tensor_model_parallel_size=2"
PP2 = "parallel.pipeline_model_parallel_size=2"


def convert(*args):
    proc = subprocess.run([sys.executable, "tools/convert_checkpoint.py", *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def weights(export_dir):
    with safe_open(str(export_dir / "model.safetensors"), framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def files_of(directory):
    return {str(p): p.stat().st_size for p in directory.rglob("*") if p.is_file()}


def generate(run_dir):
    proc = subprocess.run([sys.executable, "tools/generate.py", "--run", str(run_dir), "--prompt",
                           "def ", "--temperature", "0", "--max-new-tokens", "12"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.splitlines()[-1]  # the sample (DeepSpeed may log a line before it)


def test_exports_of_tp1_and_tp2_pp2_are_equal_and_round_trip(tmp_path, cache_dir):
    tp1, tp2_pp2 = tmp_path / "tp1", tmp_path / "tp2_pp2"
    check_ok(run_ranks(gpt(tp1, cache_dir, *FROZEN), 1))
    check_ok(run_ranks(gpt(tp2_pp2, cache_dir, *FROZEN, TP2, PP2), 4))
    source = tp2_pp2 / "checkpoints" / "global_step2"
    before = files_of(source)
    out = convert("--input", source, "--to", "safetensors", "--output", tmp_path / "export")
    assert "peak RSS" in out
    convert("--input", tp1 / "checkpoints" / "global_step2", "--to", "safetensors",
            "--output", tmp_path / "export_tp1")
    assert files_of(source) == before  # the input is only read
    exported, reference = weights(tmp_path / "export"), weights(tmp_path / "export_tp1")
    assert sorted(exported) == sorted(reference) and "embed.word.weight" in exported
    assert exported["embed.word.weight"].shape == (1000, 64)  # TP padding (1024) dropped
    for name, tensor in reference.items():
        assert torch.equal(exported[name], tensor), name
    # bf16 export: the same weights rounded
    convert("--input", source, "--to", "safetensors", "--output", tmp_path / "export_bf16",
            "--dtype", "bf16")
    bf16 = weights(tmp_path / "export_bf16")
    assert all(torch.equal(bf16[n], t.bfloat16()) for n, t in reference.items())
    # Import into a TP2 run with another seed (so its own init differs): what it trains from
    # and saves is exactly the export.
    imported = tmp_path / "imported"
    log = check_ok(run_ranks(gpt(imported, cache_dir, *FROZEN, TP2, "train.seed=7",
                                 f"checkpoint.init_from={tmp_path / 'export'}"), 2))
    assert f"weights from {tmp_path / 'export'} (fresh optimizer, step 0)" in log
    assert [r["step"] for r in read_metrics(imported)] == [1, 2]
    convert("--input", imported / "checkpoints" / "global_step2", "--to", "safetensors",
            "--output", tmp_path / "export_again")
    again = weights(tmp_path / "export_again")
    assert all(torch.equal(again[n], t) for n, t in reference.items())
    # ... and into PP2, whose stages read only their own layers' tensors from the export
    piped = tmp_path / "imported_pp2"
    check_ok(run_ranks(gpt(piped, cache_dir, *FROZEN, PP2, "train.seed=9",
                           f"checkpoint.init_from={tmp_path / 'export'}"), 2))
    convert("--input", piped / "checkpoints" / "global_step2", "--to", "safetensors",
            "--output", tmp_path / "export_pp2")
    again = weights(tmp_path / "export_pp2")
    assert all(torch.equal(again[n], t) for n, t in reference.items())
    # tools/generate.py reads any layout: the same greedy text from both runs
    assert generate(tp2_pp2) == generate(tp1)


def test_universal_output_and_a_model_mismatch_on_init_from(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    check_ok(run_ranks(gpt(run_dir, cache_dir, *FROZEN, TP2), 2))
    source = run_dir / "checkpoints" / "global_step2"
    convert("--input", source, "--to", "universal", "--output", tmp_path / "universal")
    merged = torch.load(tmp_path / "universal" / "zero" / "embed.word.weight" / "fp32.pt",
                        weights_only=False)["param"]
    assert merged.shape == (1000, 64)
    convert("--input", source, "--to", "safetensors", "--output", tmp_path / "export")
    other = tmp_path / "other"
    for res in run_ranks(gpt(other, cache_dir, *FROZEN, "model.num_layers=3",
                             f"checkpoint.init_from={tmp_path / 'export'}"), 1):
        assert res.returncode == 3, res.output[-3000:]
        assert "holds another model: model.num_layers: checkpoint 2, config 3" in res.output
    assert not (other / "checkpoints").exists()
