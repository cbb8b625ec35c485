"""Pretrain a Magneto GPT (decoder-only) with DeepSpeed.

    deepspeed launch/pretrain_gpt.py                       # CPU-tiny default, built-in corpus
    deepspeed --num_gpus 2 launch/pretrain_gpt.py          # two data-parallel ranks
    deepspeed launch/pretrain_gpt.py --config configs/gpt_125m.yaml train.train_iters=1000
"""
import sys


from magneto_dist.training.run import main

if __name__ == "__main__":
    sys.exit(main("gpt"))
