"""lm-eval's HF model with multiple-choice contexts encoded once for all of their choices.

lm-eval's `HFLM` scores every (context, choice) pair as a separate sequence, so a 3-choice item with a 1,000-token
dialogue pays for the dialogue three times. Here the requests that share a context's tokens run the context once,
keep its KV cache, and score all their continuations from it in one batch. Requests whose context no other
request shares, or that would need lm-eval's left truncation, go through `HFLM` unchanged.
"""
from __future__ import annotations

import inspect
from collections import defaultdict
from functools import cached_property

import torch
import torch.nn.functional as F
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

Request = tuple[tuple[str, str], list[int], list[int]]


class SharedContextHFLM(HFLM):
    """`HFLM` whose log-likelihoods share each context's forward pass across the continuations that follow it."""

    def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False,
                              override_bs: int | None = None) -> list[tuple[float, bool]]:
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for index, (_, context, continuation) in enumerate(requests):
            if self.backend == "causal" and len(context) + len(continuation) <= self.max_length + 1:
                groups[tuple(context)].append(index)
        shared = {key: members for key, members in groups.items() if len(members) > 1}
        answers: list[tuple[float, bool] | None] = [None] * len(requests)
        for context, members in tqdm(shared.items(), desc="Scoring shared contexts",
                                     disable=disable_tqdm or self.rank != 0):
            scored = self._score_shared(list(context), [requests[i][2] for i in members])
            for index, answer in zip(members, scored, strict=True):
                answers[index] = answer
                if requests[index][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[index][0], answer)
        rest = [i for i, answer in enumerate(answers) if answer is None]
        if rest:
            for index, answer in zip(rest, super()._loglikelihood_tokens(
                    [requests[i] for i in rest], disable_tqdm=disable_tqdm, override_bs=override_bs), strict=True):
                answers[index] = answer
        return answers

    @cached_property
    def _last_logits_only(self) -> dict:
        """Forward arguments that skip the LM head on all but the last position, where the model takes them."""
        return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(self.model.forward).parameters else {}

    def _score_shared(self, context: list[int], continuations: list[list[int]]) -> list[tuple[float, bool]]:
        """(sum of log-probabilities, greedy match) of each continuation after `context`, the context run once."""
        longest = max(len(c) for c in continuations)
        with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                                             enabled=self.mixed_precision_dtype is not None):
            # Only the last context position predicts a continuation token: skip the LM head everywhere else.
            out = self.model(torch.tensor([context], device=self.device), use_cache=True, **self._last_logits_only)
            first = F.log_softmax(out.logits[0, -1], dim=-1, dtype=self.softmax_dtype)
            rows = [first.unsqueeze(0)] * len(continuations)
            if longest > 1:
                cache = out.cache
                cache.batch_repeat_interleave(len(continuations))
                # Right padding needs no mask: a causal model's valid positions never see the pad after them.
                inputs = torch.tensor([c[:-1] + [0] * (longest - len(c)) for c in continuations], device=self.device)
                later = F.log_softmax(self.model(inputs, cache=cache, use_cache=True).logits,
                                      dim=-1, dtype=self.softmax_dtype)
                rows = [torch.cat([first.unsqueeze(0), later[i, :len(c) - 1]])
                        for i, c in enumerate(continuations)]
        answers = []
        for logprobs, continuation in zip(rows, continuations, strict=True):
            target = torch.tensor(continuation, device=logprobs.device)
            picked = logprobs.gather(1, target.unsqueeze(1)).squeeze(1)
            answers.append((float(picked.sum()), bool((logprobs.argmax(-1) == target).all())))
        return answers
