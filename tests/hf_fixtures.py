"""Small sentencepiece tokenizers and export sources for the Hugging Face export tests."""
import itertools
import json
import os

import sentencepiece as spm
import torch
from safetensors.torch import save_file

from magneto_dist.config import config_to_dict, load_config
from magneto_dist.data.corpus import stdlib_sources
from magneto_dist.data.tokenizer_training import train_sentencepiece
from magneto_dist.model import build_model

VOCAB = 512  # the smallest that covers the characters of the text below


def stdlib_text(directory) -> str:
    """A text file of standard library excerpts, one per line."""
    path = os.path.join(directory, "text.txt")
    if not os.path.exists(path):
        with open(path, "w", encoding="utf-8") as f:
            for _, source in itertools.islice(stdlib_sources(), 0, 300, 10):
                f.write(source[:4000] + "\n")
    return path


def project_tokenizer(directory) -> str:
    """A tokenizer as tools/train_tokenizer.py makes it (BPE, byte fallback, <cls>/<sep>/<mask>)."""
    return train_sentencepiece(stdlib_text(directory), os.path.join(directory, "bpe"), VOCAB)


def other_tokenizer(directory, name, **options) -> str:
    """A sentencepiece model with other trainer options (sentencepiece's defaults otherwise)."""
    prefix = os.path.join(directory, name)
    spm.SentencePieceTrainer.train(input=stdlib_text(directory), model_prefix=prefix,
                                   vocab_size=VOCAB, character_coverage=0.9995, minloglevel=2,
                                   **options)
    return prefix + ".model"


def safetensors_source(directory, overrides, tokenizer_model, seed=0):
    """An export as `convert_checkpoint.py --to safetensors` writes it, from a fresh model whose
    parameters are all perturbed off their init; returns (dir, model config, native model)."""
    cfg = load_config(None, [f"model.vocab_size={VOCAB}", *overrides])
    model = build_model(cfg.model, seed=seed).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
    os.makedirs(directory)
    save_file({n: p.detach().clone() for n, p in model.named_parameters()},
              os.path.join(directory, "model.safetensors"))
    record = ({"type": "SentencePieceTokenizer", "model": tokenizer_model} if tokenizer_model
              else None)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({"model": config_to_dict(cfg)["model"], "dtype": "fp32",
                   **({"tokenizer": record} if record else {})}, f)
    return str(directory), cfg.model, model
