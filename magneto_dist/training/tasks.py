"""What a batch means for each model kind: the model inputs and the loss.

Losses are per-micro-batch means over the loss-masked tokens, computed in fp32. The vocabulary
may be padded (for tensor parallelism, to multiples of 128 x TP); padded entries are cut off
before the softmax, so padding never changes the loss. Under context parallelism a rank holds
some of each sequence's tokens, and its loss is scaled so that the CP group's average is the
mean over all of them (parallel/context_parallel.py context_parallel_mean).

train.z_loss (PaLM's auxiliary loss, OLMo's too) adds z_loss * log(Z)^2 per token, Z the
softmax's normalizer over the whole vocabulary: it keeps the logits from drifting as a whole,
which the cross-entropy cannot see. It enters the gradient only: the loss's value stays the
cross-entropy, so training and validation losses compare across z_loss settings.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

from ..model.attention import documents_from_tokens

Batch = Dict[str, torch.Tensor]


def masked_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.float()
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)


def cross_entropy_unpadded(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int):
    """Per-token CE over the first vocab_size logits; logits [b, s, V_padded], labels [b, s]."""
    logits = logits[..., :vocab_size].float()
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)


def logsumexp_unpadded(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """log Z per token [b, s] over the first vocab_size logits."""
    return logits[..., :vocab_size].float().logsumexp(dim=-1)


class GPTTask:
    """Next-token prediction; megatron-core GPTDataset samples (tokens, labels, loss_mask,
    position_ids). Packed documents (data.reset_attention_mask): each batch gets document ids
    from its end-of-document tokens, and the model masks attention across documents."""
    name = "gpt"
    arch = "decoder"

    def __init__(self, vocab_size: int, tensor_parallel: bool = False,
                 context_parallel: bool = False, document_eod: Optional[int] = None,
                 reset_positions: bool = False, z_loss: float = 0.0):
        self.vocab_size = vocab_size       # the tokenizer's, before padding
        self.document_eod = document_eod   # the eod id when documents are masked, else None
        # the dataset's position ids go to the model when they restart per document, or
        # beside document ids (which the pipeline's tuples carry after them)
        self.positions = reset_positions or document_eod is not None
        self.z_loss = z_loss               # train.z_loss: coefficient of log(Z)^2
        # per-token CE and log Z over the logits; under TP each rank holds a vocabulary slice
        self.cross_entropy: Callable = cross_entropy_unpadded
        self.logsumexp: Callable = logsumexp_unpadded
        if tensor_parallel:  # imported here: megatron's import costs seconds a config error skips
            from ..parallel.tensor_parallel import (vocab_parallel_cross_entropy,
                                                    vocab_parallel_logsumexp)
            self.cross_entropy = vocab_parallel_cross_entropy
            self.logsumexp = vocab_parallel_logsumexp
        self.mean: Callable = masked_mean
        if context_parallel:
            from ..parallel.context_parallel import context_parallel_mean
            self.mean = context_parallel_mean

    @classmethod
    def for_run(cls, cfg, dims, vocab_size: int, eod: Optional[int]) -> "GPTTask":
        """The objective of a run: its config's document masking, z-loss and its layout."""
        d = cfg.data
        return cls(vocab_size, tensor_parallel=dims.tp > 1, context_parallel=dims.cp > 1,
                   document_eod=eod if d.reset_attention_mask else None,
                   reset_positions=d.reset_position_ids, z_loss=cfg.train.z_loss)

    def prepare(self, batch: Batch) -> Batch:
        """The batch as the model takes it, before context parallelism cuts it: document ids
        from the whole sequence (a chunk cannot tell which document it continues), position
        ids kept only where they differ from 0 .. s-1 or travel beside document ids."""
        batch = dict(batch)
        if not self.positions:
            batch.pop("position_ids", None)
        elif "position_ids" not in batch:
            tokens = batch["tokens"]
            batch["position_ids"] = torch.arange(tokens.shape[1],
                                                 device=tokens.device).expand_as(tokens)
        if self.document_eod is not None:
            batch["document_ids"] = documents_from_tokens(batch["tokens"], self.document_eod)
        return batch

    def per_token_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The cross-entropy per token [b, s], carrying the z-loss's gradient when it is on.
        log Z comes first: megatron-core's vocab_parallel_cross_entropy overwrites fp32 logits
        in place with exp(logits - max) (torch.exp(..., out=)), so under TP a log Z read after
        it was of those (the TP z-loss rows of tests/dist/test_layouts.py caught it)."""
        z = (self.z_loss * self.logsumexp(logits, self.vocab_size).square() if self.z_loss
             else None)
        per_token = self.cross_entropy(logits, labels, self.vocab_size)
        if z is None:
            return per_token
        return per_token + (z - z.detach())  # exactly 0 in value (x - x), z's gradient in backward

    def forward(self, model, batch: Batch) -> torch.Tensor:
        extra = {k: batch[k] for k in ("position_ids", "document_ids") if k in batch}
        return model(batch["tokens"], **extra)

    def loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        return self.mean(self.per_token_loss(logits, batch["labels"]), batch["loss_mask"])

    def pipeline_loss(self, logits: torch.Tensor, labels) -> torch.Tensor:
        """The loss as DeepSpeed's pipeline calls it on the last stage: labels is the
        (labels, loss_mask) pair the pipeline's batches carry."""
        return self.loss(logits, {"labels": labels[0], "loss_mask": labels[1]})


class MaskedLMTask(GPTTask):
    """BERT masked LM; megatron-core BERT samples (text, labels, loss_mask, padding_mask)."""
    name = "bert"
    arch = "encoder"

    def forward(self, model, batch: Batch) -> torch.Tensor:
        return model(batch["text"], padding_mask=batch["padding_mask"].bool())

    def loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        labels = batch["labels"].clamp(min=0)  # -1 marks unmasked positions (loss_mask is 0)
        return self.mean(self.per_token_loss(logits, labels), batch["loss_mask"])


def move_batch(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
            for k, v in batch.items()}
