"""The job's text inputs: calibration source and windows, evaluation text, held-out windows, kept vocab."""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch

from depgraph_llm.calibration.sources import (
    CalibrationSource,
    default_calibration_source,
    evaluation_text,
    file_source,
    self_source,
    token_windows,
)
from depgraph_llm.job.options import PruneOptions
from depgraph_llm.planning.vocab import kept_token_ids

log = logging.getLogger(__name__)


SELF_CALIBRATION = "self"


def calibration_texts(options: PruneOptions) -> tuple[CalibrationSource, str | None, list[str], list[str]]:
    """Calibration source, evaluation text (None: none present, generate it) and the files they came from.
    The defaults are disjoint: calibration parts of calibration.DEFAULT_MIX, an evaluation part (corpora.py)."""
    eval_text, eval_files = evaluation_text(options.eval_text)
    eval_files = eval_files or [SELF_CALIBRATION]
    if options.calibration == SELF_CALIBRATION:
        source = self_source()
    else:
        source = file_source(Path(options.calibration)) if options.calibration else default_calibration_source()
    cal_files = [f for part in source.parts for f in part.files] or [SELF_CALIBRATION]
    return source, eval_text, cal_files, eval_files


def calibration_batches(model, tokenizer, source: CalibrationSource, options: PruneOptions) -> list[torch.Tensor]:
    """Token windows drawn from the calibration source (or sampled from the dense model for a self source)."""
    return source.windows(model, tokenizer, options.seq_len, options.calibration_samples, options.seed,
                          options.show_progress)


def fit_windows_to_context(options: PruneOptions, config) -> PruneOptions:
    """Calibration and evaluation windows no longer than the model's context (learned position tables, e.g.
    GPT-2's n_positions, cannot index past it)."""
    context = next((v for v in (getattr(config, f, None) for f in ("max_position_embeddings", "n_positions", "n_ctx"))
                    if isinstance(v, int) and v > 1), None)
    if context is None or (options.seq_len <= context and options.eval_seq_len <= context):
        return options
    log.warning("the model's context is %d tokens: calibration and evaluation windows shortened to it", context)
    return replace(options, seq_len=min(options.seq_len, context), eval_seq_len=min(options.eval_seq_len, context))


def heldout_windows(tokenizer, eval_text: str | None, calibration: list[torch.Tensor],
                    options: PruneOptions) -> list[torch.Tensor]:
    """Windows of the evaluation text, as many and as long as the calibration ones, on which the reconstruction
    pass measures its block-output error without fitting on them (none without reconstruction or text)."""
    if options.reconstruct == "none" or not eval_text or not calibration:
        return []
    return token_windows(tokenizer, eval_text, calibration[0].shape[-1], len(calibration), purpose="held-out")


def vocab_texts(tokenizer, source: CalibrationSource, calibration: list[torch.Tensor]) -> list[str]:
    """The text --vocab-keep counts tokens on: each calibration part, or the self-generated windows decoded."""
    if source.is_self:
        return ["\n".join(tokenizer.decode(window[0]) for window in calibration)]
    return [part.text for part in source.parts]


def vocab_ids_for(model, tokenizer, source: CalibrationSource, calibration: list[torch.Tensor],
                  options: PruneOptions) -> list[int]:
    """Token ids `--vocab-keep N` keeps, counted on the whole calibration corpus (or the self-generated
    windows). (`--vocab-keep auto` chooses N with the widths: job/vocab_choice.py.)"""
    rows = model.get_input_embeddings().weight.shape[0]
    if source.is_self:
        ids = [int(t) for window in calibration for t in window.flatten()]
    else:
        ids = tokenizer("\n\n".join(vocab_texts(tokenizer, source, calibration)), add_special_tokens=False).input_ids
    return kept_token_ids(tokenizer, Counter(ids), options.vocab_keep, rows)
