"""Pretrain a Magneto BERT (encoder-only masked LM) with DeepSpeed.

    deepspeed launch/pretrain_bert.py                       # CPU-tiny default, built-in corpus
    deepspeed --num_gpus 2 launch/pretrain_bert.py          # two data-parallel ranks
    deepspeed launch/pretrain_bert.py --config configs/bert_tiny_cpu.yaml train.train_iters=1000
"""
import sys


from magneto_dist.training.run import main

if __name__ == "__main__":
    sys.exit(main("bert"))
