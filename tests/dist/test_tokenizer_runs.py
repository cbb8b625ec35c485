"""A run on data made with a Hugging Face tokenizer: the tokenizer is logged, kept in the run
directory (tools/generate.py uses the copy after the original is gone), and a resume with
another tokenizer is refused naming both."""
import os
import shutil
import subprocess
import sys

from magneto_dist.data.preprocess import preprocess
from magneto_dist.data.tokenizer import TokenizerSpec
from magneto_dist.data.tokenizer_types import build_tokenizer
from magneto_dist.data.tokenizer_training import train_byte_level_bpe

from ..tokenizer_files import stdlib_docs, write_jsonl
from .gpt_runs import check_ok, gpt, read_metrics
from .ranks import ROOT, run_ranks


def test_a_run_with_a_hugging_face_tokenizer_keeps_it_and_refuses_another(tmp_path):
    docs = stdlib_docs(300)
    bpe = train_byte_level_bpe(docs[:80], str(tmp_path / "bpe"), 512)
    # the same size, other merges: the model fits, the ids mean other things
    other = train_byte_level_bpe(docs[100:180], str(tmp_path / "other"), 512)
    preprocess([write_jsonl(tmp_path / "docs.jsonl", docs)], TokenizerSpec(model=bpe),
               str(tmp_path / "data"), append_eod=True, progress=False)
    run_dir, prefix = tmp_path / "run", str(tmp_path / "data_text_document")
    args = gpt(run_dir, tmp_path / "cache", "train.train_iters=4", "data.split=98,1,1",
               f"data.prefixes=[{prefix}]")
    out = check_ok(run_ranks(args + [f"data.tokenizer_model={bpe}"], 1))
    assert f"tokenizer: HuggingFaceTokenizer {bpe} (vocabulary 512, eod 0 '<|endoftext|>')" in out
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4]
    (res,) = run_ranks([a.replace("train_iters=4", "train_iters=6") for a in args]
                       + [f"data.tokenizer_model={other}"], 1)
    assert res.returncode == 3, res.output[-3000:]
    assert (f"checkpoint error: run {run_dir} was trained with tokenizer HuggingFaceTokenizer "
            f"{bpe} (vocabulary 512, eod 0") in res.output
    assert f"this run's tokenizer is HuggingFaceTokenizer {other} (vocabulary 512" in res.output
    shutil.rmtree(bpe)  # the run's copy is what sampling uses
    proc = subprocess.run([sys.executable, "tools/generate.py", "--run", str(run_dir),
                           "--prompt", "def ", "--max-new-tokens", "8"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    copy = build_tokenizer(TokenizerSpec(model=os.path.join(run_dir, "tokenizer",
                                                            "tokenizer_model")))
    assert proc.stdout.splitlines()[-1].startswith("def ") and copy.vocab_size == 512
