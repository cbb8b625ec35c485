"""lm-evaluation-harness over any causal LM given as a logits function: the native model rebuilt
from a checkpoint of any layout, or a Hugging Face export loaded with trust_remote_code.

Written here because lm-eval's own `hf` model needs its [hf] extra (accelerate, peft), which the
project does not pin; this is the part of it a loglikelihood task needs. Scoring follows lm-eval's
HFLM: the input is context + continuation cut to the model's length from the left, minus the
last token; a continuation's log-likelihood sums its tokens' log-softmax; it is "greedy" when
every token is the argmax; rolling windows come from lm-eval's own get_rolling_token_windows.
Batches are right-padded: a causal model's earlier positions never see the padding.
"""
from __future__ import annotations

from typing import Callable, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from lm_eval import utils
from lm_eval.api.model import TemplateLM

LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # tokens [b, s] -> logits [b, s, vocab]


class CausalLMAdapter(TemplateLM):
    def __init__(self, logits: LogitsFn, encode: Callable[[str], List[int]],
                 decode: Callable[[Sequence[int]], str], eot_id: int, max_length: int,
                 vocab_size: int, batch_size: int = 8, device: str = "cpu"):
        super().__init__()
        self.logits_fn, self.encode, self.decode = logits, encode, decode
        self.eot_id, self.max_length, self.vocab_size = eot_id, max_length, vocab_size
        self.batch_size, self.target = batch_size, device

    @property
    def eot_token_id(self) -> int:
        # Documents are separated by eod in training, so eod also precedes a document: the
        # prefix of an empty context and of the first rolling window.
        return self.eot_id

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> List[int]:
        return self.encode(string)

    @torch.no_grad()
    def _logprobs(self, inputs: List[List[int]]) -> torch.Tensor:
        """Right-padded batch -> log-softmax [b, s, vocab] (fp32)."""
        longest = max(len(ids) for ids in inputs)
        batch = torch.zeros(len(inputs), longest, dtype=torch.long)
        for row, ids in enumerate(inputs):
            batch[row, :len(ids)] = torch.tensor(ids)
        logits = self.logits_fn(batch.to(self.target))[..., :self.vocab_size]
        return F.log_softmax(logits.float(), dim=-1).cpu()

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs
                              ) -> List[Tuple[float, bool]]:
        """requests: (key, context ids, continuation ids) -> (log-likelihood, is greedy)."""
        order = sorted(range(len(requests)),  # longest first: less padding per batch
                       key=lambda i: -len(requests[i][1] + requests[i][2]))
        results = [None] * len(requests)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            inputs = [(requests[i][1] + requests[i][2])[-(self.max_length + 1):][:-1]
                      for i in chunk]
            logprobs = self._logprobs(inputs)
            for row, i in enumerate(chunk):
                continuation = requests[i][2]
                end = len(inputs[row])
                scores = logprobs[row, end - len(continuation):end]      # [cont, vocab]
                target = torch.tensor(continuation)
                greedy = bool((scores.argmax(-1) == target).all())
                results[i] = (float(scores.gather(1, target[:, None]).sum()), greedy)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        """Each document's total log-likelihood over disjoint windows of the model's length."""
        windows, owners = [], []
        for index, (text,) in enumerate(req.args for req in requests):
            for context, continuation in map(utils.make_disjoint_window,
                                             utils.get_rolling_token_windows(
                                                 token_list=self.tok_encode(text),
                                                 prefix_token=self.prefix_token_id,
                                                 max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (loglikelihood, _) in zip(owners, self._loglikelihood_tokens(windows)):
            totals[owner] += loglikelihood
        return totals

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        """Greedy continuation until a stop string or max_gen_toks (no KV cache: a full
        forward per token over the last max_length tokens; fine for the models here)."""
        outputs = []
        for context, gen_kwargs in (req.args for req in requests):
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            ids, new = self.tok_encode(context), []
            for _ in range(int(gen_kwargs.get("max_gen_toks", 256))):
                window = ids[-self.max_length:]
                next_id = int(self._logprobs([window])[0, -1].argmax())
                if next_id == self.eot_id:
                    break
                ids.append(next_id)
                new.append(next_id)
                text = self.decode(new)
                if any(stop in text for stop in until):
                    break
            text = self.decode(new)
            for stop in until:
                text = text.split(stop)[0]
            outputs.append(text)
        return outputs
