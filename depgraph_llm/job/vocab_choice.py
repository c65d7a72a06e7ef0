"""`--vocab-keep auto` in the in-memory job: once the model is scored, each candidate vocabulary size is planned
with the widths that pay for the rest of the budget, applied to a copy of the model without reconstruction and
scored (planning/vocab_cost.py says why). With a reconstruction asked for, the cheapest size and the every-token
plan are then both applied with it and scored again, and the lower wins: without reconstruction the widths look
dearer than they end up (reconstruction repairs widths, not missing tokens).

The score is taken on text the dense model writes when started from openings of the held-out calibration text,
not on the held-out text itself: the tokens are counted on calibration text, so other text of the same register
rarely needs a dropped token and the held-out cost flatters small vocabularies (on SmolLM2 at 0.2 it kept 18,432
tokens, which off-register was worse than the width-only plan). The model's own continuations use dropped tokens
about as often as text of other registers does (README). The held-out cost is still measured and reported.
Costs one extra copy of the model in memory while it runs, the continuations, one apply and two scoring passes
per measured candidate, and two reconstructions."""
from __future__ import annotations

import copy
import hashlib
import logging
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import replace

import torch
from torch import nn
from tqdm.auto import tqdm

from depgraph_llm.calibration.self_generation import continued_text
from depgraph_llm.errors import UserError
from depgraph_llm.evaluation.perplexity import dense_equivalent_ratio
from depgraph_llm.graph.coupling import CouplingGraph
from depgraph_llm.job.options import PruneOptions
from depgraph_llm.job.output import pruned_tokenizer
from depgraph_llm.job.timing import StageTimer
from depgraph_llm.planning.budget import Allocation
from depgraph_llm.planning.plan import PrunePlan
from depgraph_llm.planning.vocab import kept_token_ids
from depgraph_llm.planning.vocab_cost import (
    HELDOUT_EVERY,
    continuation_settings,
    counted_and_heldout,
    grid,
    lowest_cost,
    nll_per_byte,
    openings,
    row_params,
    search_steps,
)

log = logging.getLogger(__name__)


class VocabSizeChooser:
    """An allocation chooser (job/in_memory.py) for `--vocab-keep auto` on calibration `texts`; after it has run,
    `record` says what it measured (for the report)."""

    def __init__(self, model: nn.Module, tokenizer, texts: list[str], options: PruneOptions,
                 calibration: list[torch.Tensor]):
        self.model, self.tokenizer, self.texts, self.options = model, tokenizer, texts, options
        self.calibration = calibration
        self.record: dict | None = None

    def __call__(self, make_plan: Callable[[Allocation], PrunePlan], coupling: CouplingGraph,
                 allocation: Allocation) -> Allocation:
        from depgraph_llm.job.in_memory import apply_in_memory  # in_memory calls this module's chooser

        model, tokenizer, seq_len = self.model, self.tokenizer, self.options.seq_len
        counted, heldout = counted_and_heldout(self.texts)
        rows = model.get_input_embeddings().weight.shape[0]
        total = sum(p.numel() for p in model.parameters())
        floor = max(1, rows - int(self.options.ratio * total) // row_params(model))
        counts = Counter(tokenizer(counted, add_special_tokens=False).input_ids)
        was_training = model.training
        model.eval()
        new_tokens, seed = continuation_settings(seq_len, self.options.seed)
        starts = openings(tokenizer, heldout)
        written = continued_text(model, tokenizer, starts, new_tokens, seed,
                                 show_progress=self.options.show_progress)
        scored = {"continuations": written, "heldout": heldout}
        dense = {name: nll_per_byte(model, tokenizer, text, seq_len) for name, text in scored.items()}
        plain = replace(self.options, reconstruct="none", expert_reconstruct="drop", cross_block=0)
        params: dict[int, int] = {}
        in_register: dict[tuple[int, bool], float] = {}

        def cost_of(keep: int, options: PruneOptions = plain, calibration: list[torch.Tensor] | None = None) -> float:
            """The plan's perplexity ratio on the continuations (its ratio on the held-out text goes to in_register)."""
            candidate = allocation
            if keep < rows:
                try:
                    candidate = replace(allocation, vocab_ids=tuple(kept_token_ids(tokenizer, counts, keep, rows)))
                except UserError:
                    return math.inf  # below the tokens every text needs
            try:
                plan = make_plan(candidate)
            except UserError:
                return math.inf  # the widths cannot pay for the rest of the budget
            pruned = copy.deepcopy(model)
            apply_in_memory(pruned, coupling, plan, calibration or [], options, StageTimer())
            params[keep] = plan.params_after
            pruned_tok = pruned_tokenizer(tokenizer, plan)
            ratios = {}
            for name, text in scored.items():
                nll, _, _ = nll_per_byte(pruned, pruned_tok, text, seq_len)
                dense_nll, n_bytes, predicted = dense[name]
                ratios[name] = dense_equivalent_ratio(nll, dense_nll, n_bytes / predicted)
            in_register[(keep, options is not plain)] = ratios["heldout"]
            return ratios["continuations"]

        candidates = [*grid(rows, floor), rows]
        bar = tqdm(total=search_steps(len(candidates)), desc="vocabulary size", unit="plan",
                   disable=not self.options.show_progress, leave=False)
        keep, costs = lowest_cost(candidates, cost_of, on_measure=lambda: bar.update(1))
        bar.close()
        reconstructed: dict[int, float] = {}
        if keep < rows and self.calibration and plain != self.options:
            with tqdm(total=2, desc="vocabulary size, reconstructed", unit="plan",
                      disable=not self.options.show_progress, leave=False) as final_bar:
                for k in (keep, rows):
                    reconstructed[k] = cost_of(k, self.options, self.calibration)
                    final_bar.update(1)
            keep = min(reconstructed, key=lambda k: (reconstructed[k], -k))
        model.train(was_training)
        self.record = {"rule": "auto", "keep": keep, "vocab_rows": rows, "budget_floor": floor,
                       "scored_on": "dense continuations of held-out calibration text",
                       "continuations": {"openings": len(starts), "opening_tokens": len(starts[0]), "new_tokens": new_tokens,
                                         "seed": seed, "bytes": dense["continuations"][1],
                                         "sha256": hashlib.sha256(written.encode("utf-8")).hexdigest()},
                       "heldout_bytes": dense["heldout"][1], "heldout_every": HELDOUT_EVERY,
                       "measured": [{"keep": k, "params_after": params.get(k),
                                     "ppl_ratio_without_reconstruction": _rounded(costs.get(k)),
                                     "ppl_ratio_with_reconstruction": _rounded(reconstructed.get(k)),
                                     "heldout_ppl_ratio_without_reconstruction": _rounded(in_register.get((k, False))),
                                     "heldout_ppl_ratio_with_reconstruction": _rounded(in_register.get((k, True)))}
                                    for k in sorted({*costs, *reconstructed})]}
        log.info("--vocab-keep auto: %d of %d tokens (x dense on the dense model's continuations, plans without "
                 "reconstruction: %s%s)",
                 keep, rows, ", ".join(f"{k}: x{c:.3f}" for k, c in sorted(costs.items())),
                 "".join(f"; {k} reconstructed: x{c:.3f}" for k, c in sorted(reconstructed.items())))
        if keep == rows:
            return allocation
        all_counts = Counter(tokenizer("\n".join(self.texts), add_special_tokens=False).input_ids)
        return replace(allocation, vocab_ids=tuple(kept_token_ids(tokenizer, all_counts, keep, rows)))


def _rounded(cost: float | None) -> float | None:
    """A measured cost for the report: None where it was not measured or the plan is out of reach."""
    return round(cost, 4) if cost is not None and math.isfinite(cost) else None
