"""Sample from a checkpoint of launch/pretrain_gpt.py, on one process (CPU or one GPU).

    python tools/generate.py --run runs/gpt_tiny --prompt "def fib(n):" [--tag global_step200]

Reads the run's newest complete checkpoint (or --tag) of any TP x PP x DP x ZeRO layout,
rebuilds the model from the config saved beside it, and loads its full fp32 weights.
"""
import argparse
import sys

from magneto_dist.checkpoint import tags as ckpt
from magneto_dist.checkpoint.export import load_full_model
from magneto_dist.checkpoint.resume import resume_point
from magneto_dist.data.run_tokenizer import run_tokenizer
from magneto_dist.errors import ExitCode, MagnetoError
from magneto_dist.training.generate import sample


def bad_argument(args) -> str:
    """Why the sampling flags cannot work (checked before any checkpoint is read), or ""."""
    if not args.prompt:
        return "--prompt is empty: give the text to continue (e.g. --prompt 'def main():')"
    if args.top_k < 1:
        return (f"--top-k {args.top_k}: sample from at least 1 token (--temperature 0 takes "
                "the most likely one)")
    if args.max_new_tokens < 1:
        return f"--max-new-tokens {args.max_new_tokens}: generate at least 1 token"
    if args.temperature < 0:
        return f"--temperature {args.temperature:g}: must be at least 0 (0 for greedy)"
    return ""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--run", required=True, help="run directory (logging.run_dir)")
    p.add_argument("--tag", default="auto", help="checkpoint tag (default: newest complete)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0 for greedy")
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    problem = bad_argument(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return ExitCode.CONFIG
    ckpts = ckpt.CheckpointDir.of_run(args.run)
    try:
        tag = resume_point(ckpts, args.tag, log=lambda m: print(m, file=sys.stderr))
        if tag is None:
            raise ckpt.CheckpointError(f"no complete checkpoint in {ckpts.path}")
    except ckpt.CheckpointError as err:
        print(f"{err.label}: {err}", file=sys.stderr)
        return err.exit_code
    cfg = tag.config()
    try:
        tokenizer = run_tokenizer(args.run, cfg)  # the run's copy, else what its config names
    except MagnetoError as err:
        print(f"{err.label}: {err}", file=sys.stderr)
        return err.exit_code
    try:
        model = load_full_model(tag.path, log=lambda m: print(m, file=sys.stderr))
    except ckpt.CheckpointError as err:
        print(f"{err.label}: {err}", file=sys.stderr)
        return err.exit_code
    ids = sample(model, tokenizer.encode(args.prompt), args.max_new_tokens, tokenizer.vocab_size,
                 cfg.model.max_seq_len, temperature=args.temperature, top_k=args.top_k,
                 seed=args.seed, eod=tokenizer.eod)
    print(tokenizer.decode(ids))
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
