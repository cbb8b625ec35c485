"""Sampling from a trained model (no KV cache: the models here are small; clarity first)."""
from __future__ import annotations

from typing import List

import torch


@torch.no_grad()
def sample(model, prompt: List[int], max_new_tokens: int, vocab_size: int, max_seq_len: int,
           temperature: float = 0.8, top_k: int = 40, seed: int = 0, eod: int = -1) -> List[int]:
    """Continue `prompt`; a private generator keeps the training RNG streams untouched.

    Every rank of a ZeRO-3 or tensor-parallel model must call this in lockstep (same prompt and
    seed), since each forward gathers parameters from all of them. Compiled blocks
    (train.compile=blocks) run eager here: the window grows by a token per step, and each new
    length would compile every block again.
    """
    with torch.compiler.set_stance("force_eager"):
        return _sample(model, prompt, max_new_tokens, vocab_size, max_seq_len, temperature,
                       top_k, seed, eod)


def _sample(model, prompt, max_new_tokens, vocab_size, max_seq_len, temperature, top_k, seed,
            eod) -> List[int]:
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    ids = list(prompt)
    was_training = model.training
    model.eval()
    for _ in range(max_new_tokens):
        window = torch.tensor([ids[-max_seq_len:]], device=device)
        logits = model(window)[0, -1, :vocab_size].float()  # drop padded vocab entries
        if temperature <= 0:
            next_id = int(logits.argmax())
        else:
            top = torch.topk(logits / temperature, min(top_k, vocab_size))
            choice = torch.multinomial(torch.softmax(top.values, -1), 1, generator=generator)
            next_id = int(top.indices[choice])
        ids.append(next_id)
        if next_id == eod:
            break
    model.train(was_training)
    return ids
