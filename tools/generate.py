"""Sample from a checkpoint of launch/pretrain_gpt.py, on one process (CPU or one GPU).

    python tools/generate.py --run runs/gpt_tiny --prompt "def fib(n):" [--tag global_step200]

Reads the run's newest complete checkpoint (or --tag), rebuilds the model from the config saved
beside it, and loads the fp32 weights through DeepSpeed's ZeRO consolidation (any ZeRO stage).
"""
import argparse
import os
import sys

import _path  # noqa: F401
import torch
import yaml

from magneto_dist.checkpoint import manager as ckpt
from magneto_dist.config import config_from_dict
from magneto_dist.data.corpus import builtin_corpus_paths
from magneto_dist.data.tokenizer import SentencePieceTokenizer
from magneto_dist.model import build_model
from magneto_dist.training.generate import sample


def load_model_weights(ckpt_dir: str, tag: str, cfg):
    """fp32 state dict of a TP1/PP1 checkpoint, whatever its ZeRO stage."""
    par = cfg.parallel
    if par.tensor_model_parallel_size > 1 or par.pipeline_model_parallel_size > 1:
        sys.exit(f"error: {ckpt_dir}/{tag} is a TP{par.tensor_model_parallel_size} x "
                 f"PP{par.pipeline_model_parallel_size} checkpoint; generation reads TP1 x PP1 "
                 "ones (convert the checkpoint to that layout first)")
    if cfg.train.zero_stage == 0:
        states = torch.load(os.path.join(ckpt_dir, tag, "mp_rank_00_model_states.pt"),
                            map_location="cpu", weights_only=False)
        return states["module"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    return get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=tag)


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
    with open(os.path.join(ckpt_dir, tag, "config.yaml"), encoding="utf-8") as f:
        cfg = config_from_dict(yaml.safe_load(f))
    tokenizer_path = cfg.data.tokenizer_model or builtin_corpus_paths(
        cfg.data.cache_dir, cfg.data.builtin_vocab_size).tokenizer_model
    tokenizer = SentencePieceTokenizer(tokenizer_path)
    model = build_model(cfg.model)
    model.load_state_dict(load_model_weights(ckpt_dir, tag, cfg))
    ids = sample(model, tokenizer.encode(args.prompt), args.max_new_tokens, tokenizer.vocab_size,
                 cfg.model.max_seq_len, temperature=args.temperature, top_k=args.top_k,
                 seed=args.seed, eod=tokenizer.eod)
    print(tokenizer.decode(ids))


if __name__ == "__main__":
    main()
