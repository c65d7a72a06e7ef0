"""How often does text need a token that `--vocab-keep K` drops? (docs/estimators.md, `--vocab-keep auto`)

Counts tokens on the default calibration text as `--vocab-keep auto` does (the held-out chunks left out), keeps the
K most frequent (`kept_token_ids`), and prints, per text, the share of its tokens outside the kept set: the
held-out calibration text, each register's evaluation part, and the dense model's continuations of openings of
the held-out text (what `--vocab-keep auto` scores on).

    python scripts/vocab_coverage.py [--model DIR] [--keep 9216,18432,33792] [--seq-len 512]
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from depgraph_llm.calibration.corpora import available_registers, corpus_part
from depgraph_llm.calibration.self_generation import continued_text
from depgraph_llm.calibration.sources import default_calibration_source
from depgraph_llm.checkpoint.loading import default_model_dir, load_model
from depgraph_llm.errors import UserError
from depgraph_llm.planning.vocab import kept_token_ids
from depgraph_llm.planning.vocab_cost import (
    continuation_settings,
    counted_and_heldout,
    openings,
)

EVAL_REGISTERS = ("fortunes", "jargon", "novels", "licences")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="an HF folder (default: the embedded default model)")
    parser.add_argument("--keep", default="9216,18432,33792")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model, tokenizer = load_model(args.model or default_model_dir())
    model.eval()
    counted, heldout = counted_and_heldout([part.text for part in default_calibration_source().parts])
    counts = Counter(tokenizer(counted, add_special_tokens=False).input_ids)
    rows = model.get_input_embeddings().weight.shape[0]
    texts = {"held-out calibration": heldout}
    texts |= {r: corpus_part(r, "evaluation").text[:200_000] for r in available_registers(EVAL_REGISTERS)}
    new_tokens, seed = continuation_settings(args.seq_len, args.seed)
    texts["continuations"] = continued_text(model, tokenizer, openings(tokenizer, heldout), new_tokens, seed,
                                            show_progress=True)
    ids = {name: tokenizer(text, add_special_tokens=False).input_ids for name, text in texts.items()}
    print("share of tokens outside the kept set")
    print(f"{'kept':>8}  " + "  ".join(f"{name:>20}" for name in texts))
    for keep in (int(k) for k in args.keep.split(",")):
        kept = set(kept_token_ids(tokenizer, counts, keep, rows))
        cells = (sum(i not in kept for i in seq) / len(seq) for seq in ids.values())
        print(f"{keep:>8}  " + "  ".join(f"{share:>20.4f}" for share in cells))


if __name__ == "__main__":
    try:
        main()
    except UserError as error:  # bad input: one line, no traceback
        raise SystemExit(f"error: {error}") from None
