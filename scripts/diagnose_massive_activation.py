"""Where a pruned model fires the dense model's massive activation (docs/cross-block.md).

Many LLMs build one huge value in one hidden dimension on the first token of a window (the attention sink) in
one early layer and carry it through the middle layers. This finds that dimension and layer in the dense model
(the largest |hidden| at position 0 of the middle layer, and the first layer whose output carries at least half
of it), then, on the evaluation part of each register, counts per layer the tokens where the dense and the pruned
model carry more than half the dense sink value in that dimension, and lists the tokens where only the pruned one
does, with the cosine between the dense and pruned input to the building layer there.

    python scripts/diagnose_massive_activation.py SLIM_DIR [--dense DIR] [--registers fortunes,licences]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from depgraph_llm.calibration.corpora import corpus_part
from depgraph_llm.checkpoint.loading import default_model_dir, load_model
from depgraph_llm.errors import UserError


@torch.no_grad()
def hidden_states(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Hidden states after the embedding and after every layer."""
    return list(model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states)


def locate(dense_states: list[torch.Tensor]) -> tuple[int, int, float]:
    """(dimension, first layer carrying it, mean |value| at position 0) of the dense model's massive activation."""
    middle = dense_states[len(dense_states) // 2]
    dim = int(middle[:, 0].abs().mean(0).argmax())
    sink = float(middle[:, 0, dim].abs().mean())
    layer = next(i - 1 for i, h in enumerate(dense_states[1:], 1) if float(h[:, 0, dim].abs().mean()) >= sink / 2)
    return dim, layer, sink


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("slim", type=Path)
    parser.add_argument("--dense", type=Path, help="the dense model (default: the embedded default model)")
    parser.add_argument("--registers", default="fortunes,licences")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()
    dense, tokenizer = load_model(args.dense or default_model_dir())
    slim, slim_tokenizer = load_model(args.slim)
    if len(slim_tokenizer) != len(tokenizer):
        raise SystemExit("the pruned model's vocabulary differs from the dense one's; this compares token by token")
    dense.eval(), slim.eval()
    report = {}
    for register in args.registers.split(","):
        text = corpus_part(register, "evaluation").text
        ids = tokenizer(text[: 40 * args.windows * args.seq_len], add_special_tokens=False).input_ids
        ids = torch.tensor(ids[: args.windows * args.seq_len]).view(args.windows, args.seq_len)
        dense_states, slim_states = hidden_states(dense, ids), hidden_states(slim, ids)
        dim, layer, sink = locate(dense_states)
        per_layer = []
        for i, (d, s) in enumerate(zip(dense_states[1:], slim_states[1:])):
            per_layer.append({"layer": i, "dense_tokens": int((d[..., dim].abs() > sink / 2).sum()),
                              "pruned_tokens": int((s[..., dim].abs() > sink / 2).sum()),
                              "pruned_sink_value": round(float(s[:, 0, dim].abs().mean()), 1)})
        fired = (slim_states[layer + 1][..., dim].abs() > sink / 2) & (dense_states[layer + 1][..., dim].abs() <= sink / 2)
        misfires = []
        for window, position in fired.nonzero().tolist():
            cosine = torch.nn.functional.cosine_similarity(dense_states[layer][window, position],
                                                           slim_states[layer][window, position], dim=0)
            misfires.append({"window": window, "position": position,
                             "text": tokenizer.decode(ids[window, max(0, position - 3):position + 1]),
                             "input_cosine": round(float(cosine), 3)})
        report[register] = {"dimension": dim, "building_layer": layer, "dense_sink_value": round(sink, 1),
                            "per_layer": per_layer, "misfires": misfires}
        print(f"{register}: dim {dim} built by layer {layer} (dense sink |h| {sink:.0f}); at that layer's output "
              f"dense {per_layer[layer]['dense_tokens']} tokens, pruned {per_layer[layer]['pruned_tokens']} "
              f"(sink value {per_layer[layer]['pruned_sink_value']:.0f}) of {ids.numel()}")
        for m in misfires[:12]:
            print(f"  window {m['window']} position {m['position']:>3} {m['text']!r}: input cosine {m['input_cosine']}")
    print(json.dumps(report))


if __name__ == "__main__":
    try:
        main()
    except UserError as error:  # bad input: one line, no traceback
        raise SystemExit(f"error: {error}") from None
