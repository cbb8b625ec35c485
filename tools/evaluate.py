"""Evaluate a checkpoint with lm-evaluation-harness.

    python tools/evaluate.py --run RUN            [--tasks T1,T2] [--limit N] [--batch-size B]
    python tools/evaluate.py --checkpoint RUN/checkpoints/global_stepN [--through hf] ...
    python tools/evaluate.py --hf DIR             (an export of tools/convert_checkpoint.py --to hf)
    python tools/evaluate.py ... --include-path MY_TASKS --tasks my_task  (task YAMLs of your own)

--run takes the run's newest complete checkpoint. A checkpoint of any layout is scored by the
native model, rebuilt whole on one process from its consolidated weights, with the run's own
tokenizer (no export to write: the quickest path). --through hf exports it to a temporary Hugging
Face directory first and scores what a user of the export loads (AutoModelForCausalLM with
trust_remote_code, AutoTokenizer); the two agree (the export's logits equal the native ones).
Both run through one lm-eval LM class (training/eval_harness.py); lm-eval's own `hf` model scores
an export alike (`lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True`).

The default tasks are local and offline (configs/eval/: held-out documents of the built-in
corpus): magneto_stdlib_ppl (perplexity over rolling windows: word, byte, bits per byte) and
magneto_stdlib_cloze (next-word accuracy, as lambada_openai scores it). With Hub access, lm-eval's
standard tasks work too: --tasks lambada_openai,hellaswag,arc_easy,piqa. --include-path DIR (as
often as needed) adds a folder of task YAMLs of your own, as lm-eval's --include_path does.

A run's results go to RUN/eval/STEP.json and one {"split": "eval", "task": ...} row per task in
RUN/metrics.jsonl (and TensorBoard, eval/TASK/METRIC); --output FILE writes the JSON elsewhere
(the only place for --hf). Exit codes: 0 done, 2 an unknown task or a missing --include-path
folder, 3 a checkpoint that cannot be read or exported.
"""
import argparse
import json
import os
import sys
import tempfile
import time

import torch

from magneto_dist.checkpoint import tags as ckpt
from magneto_dist.checkpoint.export import check_input, load_full_model
from magneto_dist.checkpoint.hf_export import export_hf
from magneto_dist.checkpoint.resume import resume_point
from magneto_dist.config import ConfigError
from magneto_dist.data.corpus import builtin_corpus_paths
from magneto_dist.data.hf_tokenizer import tokenizer_of_tag
from magneto_dist.errors import MagnetoError
from magneto_dist.files import atomic_write
from magneto_dist.launch_env import ROOT
from magneto_dist.training.metrics import MetricsLogger

LOCAL_TASKS_DIR = os.path.join(ROOT, "configs", "eval")
LOCAL_TASKS = sorted(name[:-5] for name in os.listdir(LOCAL_TASKS_DIR) if name.endswith(".yaml"))
DEFAULT_TASKS = "magneto_stdlib_ppl,magneto_stdlib_cloze"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 2)[2])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="run directory: its newest complete checkpoint")
    source.add_argument("--checkpoint", help="a checkpoint tag: RUN/checkpoints/global_stepN")
    source.add_argument("--hf", help="a Hugging Face export (convert_checkpoint.py --to hf)")
    p.add_argument("--through", choices=["native", "hf"], default="native",
                   help="--run/--checkpoint: score the native model or its HF export")
    p.add_argument("--tasks", default=DEFAULT_TASKS, help=f"comma-separated (default "
                   f"{DEFAULT_TASKS}; local: {', '.join(LOCAL_TASKS)})")
    p.add_argument("--include-path", action="append", default=[], metavar="DIR",
                   help="a folder of lm-eval task YAMLs (lm-eval's --include_path); repeatable")
    p.add_argument("--limit", type=int, help="documents per task (for a quick look)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--output", help="results JSON (default RUN/eval/STEP.json)")
    return p.parse_args(argv)


def checkpoint_of(args) -> str:
    """The tag directory to evaluate (checked complete and undamaged)."""
    if args.checkpoint:
        check_input(args.checkpoint)
        return args.checkpoint.rstrip("/")
    ckpts = ckpt.CheckpointDir.of_run(args.run)
    tag = resume_point(ckpts, log=lambda m: print(m, file=sys.stderr))
    if tag is None:
        raise ckpt.CheckpointError(f"--run {args.run}: no complete checkpoint in {ckpts.path}")
    return tag.path


def task_metadata(tag_dir: str) -> dict:
    """What the local tasks read: the run's built-in corpus and split (a run on its own data
    is evaluated on the standard library's held-out documents with the default split)."""
    data = ckpt.saved_config(tag_dir).data
    if data.prefixes:
        return {}
    corpus = builtin_corpus_paths(data.cache_dir, data.builtin_vocab_size).jsonl
    return {"corpus_jsonl": corpus, "split": data.split} if os.path.isfile(corpus) else {}


def native_model(tag_dir: str, batch_size: int, device: str):
    """The checkpoint's own model and the run's tokenizer."""
    from magneto_dist.training.eval_harness import CausalLMAdapter

    cfg = ckpt.saved_config(tag_dir)
    if cfg.model.arch != "decoder":
        raise ConfigError(f"{tag_dir} holds a model.arch={cfg.model.arch!r} model; lm-eval "
                          "scores causal (decoder) models")
    model = load_full_model(tag_dir, log=lambda m: print(m, file=sys.stderr)).to(device)
    tokenizer = tokenizer_of_tag(tag_dir, cfg)
    return CausalLMAdapter(model, tokenizer.encode, tokenizer.decode, tokenizer.eod,
                           cfg.model.max_seq_len, cfg.model.vocab_size, batch_size, device)


def hf_model(hf_dir: str, batch_size: int, device: str):
    """A Hugging Face causal LM directory, loaded as its users load it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from magneto_dist.training.eval_harness import CausalLMAdapter

    model = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True,
                                                 dtype=torch.float32).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    return CausalLMAdapter(lambda ids: model(ids).logits,
                           lambda text: tokenizer(text, add_special_tokens=False)["input_ids"],
                           tokenizer.decode, tokenizer.eos_token_id,
                           model.config.max_position_embeddings, model.config.vocab_size,
                           batch_size, device)


def task_manager(tasks, metadata: dict, include_paths=()):
    """lm-eval's task index with the local tasks and the user's folders; every task name
    checked before a model loads. lm-eval's own tasks (thousands of YAML files) are indexed
    only when a task is in none of the local folders."""
    from lm_eval.tasks import TaskManager

    for path in include_paths:
        if not os.path.isdir(path):
            raise ConfigError(f"--include-path {path}: not a directory; pass a folder of "
                              "lm-eval task YAML files")
    folders = [LOCAL_TASKS_DIR, *include_paths]
    manager = TaskManager(include_path=folders, metadata=metadata, include_defaults=False)
    local = manager.all_tasks
    if not set(tasks) <= set(local):
        manager = TaskManager(include_path=folders, metadata=metadata)
    unknown = sorted(set(tasks) - set(manager.all_tasks))
    if unknown:
        raise ConfigError(f"--tasks: lm-eval knows no task {', '.join(unknown)} (local: "
                          f"{', '.join(local)}; `lm_eval ls tasks` lists the others)")
    return manager


def run_lm_eval(lm, tasks, limit, manager) -> dict:
    import lm_eval

    results = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit,
                                      task_manager=manager, log_samples=False)
    return {"results": results["results"], "versions": results.get("versions"),
            "n-samples": results.get("n-samples")}


def summary(results: dict) -> dict:
    """{task: {metric: value}}: lm-eval's "metric,filter" keys without the filter; stderr
    and aliases dropped."""
    return {task: {key.split(",")[0]: value for key, value in metrics.items()
                   if "," in key and "_stderr" not in key and isinstance(value, (int, float))}
            for task, metrics in results["results"].items()}


def record(run_dir: str, step: int, tag_dir: str, scores: dict) -> None:
    cfg = ckpt.saved_config(tag_dir)
    metrics = MetricsLogger(run_dir, True, cfg.logging.tensorboard, 0.0, 1, None)
    for task, values in scores.items():
        metrics.evaluation(step, task, values)
    metrics.close()


def main(argv=None) -> int:
    args = parse_args(argv)
    tasks = [t for t in args.tasks.split(",") if t]
    if set(tasks) <= set(LOCAL_TASKS):  # nothing to download: never wait on a network
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    start = time.monotonic()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        with tempfile.TemporaryDirectory() as work:
            tag_dir = None if args.hf else checkpoint_of(args)
            manager = task_manager(tasks, task_metadata(tag_dir) if tag_dir else {},
                                   args.include_path)
            if tag_dir and args.through == "native":
                lm = native_model(tag_dir, args.batch_size, device)
            else:
                hf_dir = args.hf or export_hf(tag_dir, os.path.join(work, "hf"),
                                              log=lambda m: print(m, file=sys.stderr))
                lm = hf_model(hf_dir, args.batch_size, device)
            results = run_lm_eval(lm, tasks, args.limit, manager)
    except MagnetoError as err:
        print(f"{err.label}: {err}", file=sys.stderr)
        return err.exit_code
    scores = summary(results)
    step = ckpt.Tag.at(tag_dir).marker()["step"] if tag_dir else None
    output = args.output or (os.path.join(os.path.dirname(os.path.dirname(tag_dir)), "eval",
                                          f"{step}.json") if tag_dir else None)
    if output:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        atomic_write(output, json.dumps({"step": step, "checkpoint": tag_dir or args.hf,
                                         "tasks": scores, **results}, indent=1) + "\n")
    if tag_dir:
        record(os.path.dirname(os.path.dirname(tag_dir)), step, tag_dir, scores)
    for task, values in scores.items():
        print(f"{task}: " + ", ".join(f"{k} {v:.4f}" for k, v in values.items()))
    print(f"evaluated {tag_dir or args.hf} in {time.monotonic() - start:.0f} s"
          + (f"; wrote {output}" if output else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
