"""Fisher information of a structured mask (Kwon et al., "A fast post-training pruning framework").

Put a mask m_u = 1 on each unit's output; the loss gradient w.r.t. it on one sample is the signed sum of
w * dL/dw over the unit's input columns in the next linear layer. The empirical Fisher sum over samples of
(dL/dm_u)^2 approximates the Hessian diagonal, so its half is the second-order loss increase of removing u.
Cost: one backward pass per calibration window (the gradients of one window at a time)."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .base import Estimator, register_estimator, slices_by_param


@register_estimator
class Fisher(Estimator):
    name = "fisher"
    needs_gradients = True
    consumer_only = True
    loss_scaled = True
    summary = "mask Fisher (Kwon et al.): sum over samples of (sum over the unit of w * dL/dw)^2 / 2"
    cost = "one backward per calibration window; gradients of one window at a time"

    def unit_scores(self, model, groups, batches, show_progress):
        params = dict(model.named_parameters())
        by_param = slices_by_param(model, groups, consumer_only=True)
        totals: dict[str, torch.Tensor] = {}
        for input_ids in tqdm(batches, desc="fisher", disable=not show_progress, leave=False):
            model.zero_grad(set_to_none=True)
            model(input_ids=input_ids, labels=input_ids, use_cache=False).loss.backward()
            mask_grads: dict[str, torch.Tensor] = {}
            with torch.no_grad():
                for name, uses in by_param.items():
                    param = params[name]
                    if param.grad is None:
                        continue
                    product = (param.detach() * param.grad).double()
                    for group_name, s in uses:
                        unit = s.unit_scores(product)
                        mask_grads[group_name] = unit if group_name not in mask_grads else mask_grads[group_name] + unit
            for group_name, grad in mask_grads.items():
                totals[group_name] = totals.get(group_name, 0) + grad.pow(2) / 2
        model.zero_grad(set_to_none=True)
        return totals
