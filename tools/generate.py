"""Sample from a checkpoint of launch/pretrain_gpt.py, on one process (CPU or one GPU).

    python tools/generate.py --run runs/gpt_tiny --prompt "def fib(n):" [--tag global_step200]

Reads the run's newest complete checkpoint (or --tag) of any TP x PP x DP x ZeRO layout,
rebuilds the model from the config saved beside it, and loads its full fp32 weights.
"""
import argparse
import os
import sys
import tempfile

import torch

from magneto_dist.checkpoint import manager as ckpt
from magneto_dist.checkpoint.export import full_parameters
from magneto_dist.data.run_tokenizer import run_tokenizer
from magneto_dist.model import build_model
from magneto_dist.training.generate import sample


def load_weights(model, tag_dir: str) -> None:
    """The full fp32 weights of a checkpoint of any layout (through its universal form, built
    in a temp directory unless the tag has one), one parameter at a time."""
    params = dict(model.named_parameters())
    with tempfile.TemporaryDirectory() as work_dir, torch.no_grad():
        for name, full in full_parameters(tag_dir, work_dir,
                                          log=lambda m: print(m, file=sys.stderr)):
            params[name].copy_(full)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--run", required=True, help="run directory (logging.run_dir)")
    p.add_argument("--tag", default="auto", help="checkpoint tag (default: newest complete)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0 for greedy")
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    ckpt_dir = os.path.join(args.run, "checkpoints")
    try:
        tag = ckpt.find_resume_tag(ckpt_dir, args.tag, log=lambda m: print(m, file=sys.stderr))
    except ckpt.CheckpointError as err:
        sys.exit(f"error: {err}")
    if tag is None:
        sys.exit(f"error: no complete checkpoint in {ckpt_dir}")
    cfg = ckpt.saved_config(os.path.join(ckpt_dir, tag))
    try:
        tokenizer = run_tokenizer(args.run, cfg)  # the run's copy, else what its config names
    except (ckpt.CheckpointError, ValueError) as err:  # DataError is a ValueError
        sys.exit(f"error: {err}")
    model = build_model(cfg.model)
    try:
        load_weights(model, os.path.join(ckpt_dir, tag))
    except ckpt.CheckpointError as err:
        sys.exit(f"error: {err}")
    ids = sample(model, tokenizer.encode(args.prompt), args.max_new_tokens, tokenizer.vocab_size,
                 cfg.model.max_seq_len, temperature=args.temperature, top_k=args.top_k,
                 seed=args.seed, eod=tokenizer.eod)
    print(tokenizer.decode(ids))


if __name__ == "__main__":
    main()
