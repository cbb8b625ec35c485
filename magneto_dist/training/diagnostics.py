"""What the stability papers measure, on one fixed batch, without disturbing training.

- model update ||F(x, theta_t) - F(x, theta_0)|| (DeepNet, figs. 2-3): F is the logits; reported
  as the root mean square of the difference per logit, so it does not grow with the batch;
- per-layer gradient norms (at initialization and later): the L2 norm of d loss / d theta over
  all parameters of one transformer layer;
- per-layer update-to-weight ratios: ||theta_l(now) - theta_l(last measurement)|| / ||theta_l||;
- per-layer output RMS of the residual stream (Pre-LN's growth with depth, LayerNorm Scaling's
  fix), and the largest |logit|.

The gradients come from torch.autograd.grad on a separate forward/backward of the probe batch
in eval mode (no dropout) under a forked RNG: parameter .grad, the optimizer and every random
stream are left exactly as they were, so a run with diagnostics trains bit-identically to one
without. Needs the whole model on one rank (TP1 x PP1, ZeRO 0-2); config validation says so.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
from torch import nn


def transformer_layers(model: nn.Module) -> List[nn.Module]:
    """The layers of the model's stacks, encoder first."""
    stacks = [getattr(model, side, None) for side in ("encoder", "decoder")]
    return [layer for stack in stacks if stack is not None for layer in stack.layers]


def _norm(tensors) -> float:
    return math.sqrt(sum(float(t.detach().float().pow(2).sum()) for t in tensors))


class Diagnostics:
    def __init__(self, model: nn.Module, task, probe_batch: Dict[str, torch.Tensor]):
        self.model, self.task, self.batch = model, task, probe_batch
        self.layers = transformer_layers(model)
        self.reference_logits: Optional[torch.Tensor] = None  # F(x, theta_0)
        self.previous: Optional[List[List[torch.Tensor]]] = None  # weights at the last measure

    def _probe(self):
        """(loss, logits, per-layer outputs) of the probe batch, graph kept for the gradients."""
        outputs: List[torch.Tensor] = []
        hooks = [layer.register_forward_hook(lambda m, i, out: outputs.append(out))
                 for layer in self.layers]
        try:
            logits = self.task.forward(self.model, self.batch)
        finally:
            for hook in hooks:
                hook.remove()
        return self.task.loss(logits, self.batch), logits, outputs

    def measure(self, step: int) -> dict:
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.random.fork_rng(devices=[]):
                loss, logits, outputs = self._probe()
                params = [list(layer.parameters()) for layer in self.layers]
                grads = torch.autograd.grad(loss, [p for ps in params for p in ps],
                                            allow_unused=True)
        finally:
            self.model.train(was_training)
        grads_iter = iter(grads)
        layer_grads = [[g for g in (next(grads_iter) for _ in ps) if g is not None]
                       for ps in params]
        logits = logits.detach().float()
        if step == 0:  # a resumed run has no theta_0: no model update
            self.reference_logits = logits
        update = (float((logits - self.reference_logits).pow(2).mean().sqrt())
                  if self.reference_logits is not None else None)
        current = [[p.detach().float().cpu().clone() for p in ps] for ps in params]
        ratios = None
        if self.previous is not None:
            ratios = [_norm(a - b for a, b in zip(now, before)) / max(_norm(before), 1e-30)
                      for now, before in zip(current, self.previous)]
        self.previous = current
        return {"step": step, "probe_loss": float(loss.detach()),
                "grad_norm_per_layer": [_norm(g) for g in layer_grads],
                "update_ratio_per_layer": ratios,
                "residual_rms_per_layer": [float(o.detach().float().pow(2).mean().sqrt())
                                           for o in outputs],
                "max_abs_logit": float(logits.abs().max()),
                "model_update": update}
