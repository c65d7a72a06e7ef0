"""Sparse-upcycling benchmark: an MoE built from the real default model, with planted redundant experts.

No pretrained MoE model is reachable offline, so this builds one (MoEfication-style) from SmolLM2-135M-Instruct:
each layer's MLP channels are split into `--chunks` experts (expert j = channels j::chunks; the dense MLP is the
sum of them), `--duplicates` of them are copied once more with a little noise (the planted redundant experts; an original and
its copy share the chunk, each with half its down projection, so the pair together computes it), and each layer's
router is fitted by least squares on calibration text to predict log ||expert output|| per token, scaled by
`--router-scale` (top-k Mixtral routing with near-uniform gates, experts' down projections scaled by k; with every
expert routed the MoE is the dense model). Then each expert
estimator removes `--duplicates` experts per layer (through the real plan/apply path) and the script reports
whether it found the redundancy (pairs of which one copy was removed / duplicates) and the perplexity after the
removal, against random expert removal (several seeds). Every removal runs once per `--methods` entry: drop the
experts, refit the router, or merge each removed expert into its nearest kept one (`--expert-reconstruct`,
recovery/experts.py), at the same expert budget. Calibration is the licence register's calibration files;
perplexity is measured on the evaluation parts of `--eval-registers` (registers never calibrated on).

    python scripts/bench_moe.py --layers 30 --out docs/results/bench-moe/30-layers.json
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, MixtralConfig

from depgraph_llm.calibration.sources import DEFAULT_CALIBRATION_FILES, default_files, load_text, token_windows
from depgraph_llm.calibration.corpora import corpus_part
from depgraph_llm.checkpoint.loading import load_model, resolve_model_path
from depgraph_llm.evaluation.perplexity import perplexity
from depgraph_llm.graph.coupling import build_coupling
from depgraph_llm.graph.groups import GroupKind
from depgraph_llm.importance import get_estimator, score_groups
from depgraph_llm.job.options import PruneOptions
from depgraph_llm.job.timing import StageTimer
from depgraph_llm.job.in_memory import apply_in_memory
from depgraph_llm.planning.budget import ParamCounter, top_k
from depgraph_llm.planning.plan import PrunePlan


def expert_channels(intermediate: int, chunks: int, duplicates: int) -> list[list[int]]:
    """Channel sets of the experts: chunks j::chunks, then copies of the first `duplicates` chunks."""
    parts = [list(range(j, intermediate, chunks)) for j in range(chunks)]
    return parts + parts[:duplicates]


@torch.no_grad()
def mlp_inputs(dense, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per layer, the MLP inputs (post-attention-norm hidden states) on the calibration batches."""
    seen: dict[int, list[torch.Tensor]] = {}
    hooks = [layer.mlp.register_forward_pre_hook(
        lambda m, args, i=i: seen.setdefault(i, []).append(args[0].reshape(-1, args[0].shape[-1])))
        for i, layer in enumerate(dense.model.layers)]
    for ids in batches:
        dense(input_ids=ids, use_cache=False)
    for hook in hooks:
        hook.remove()
    return [torch.cat(seen[i]) for i in range(len(dense.model.layers))]


@torch.no_grad()
def upcycle(dense, batches, chunks: int, duplicates: int, k: int, noise: float, seed: int, router_scale: float = 1.0,
            split: bool = True):
    """The Mixtral built from `dense` (see the module docstring) and the planted (original, copy) pairs. With
    `split`, a planted pair shares its chunk (each copy carries half the down projection, so with every expert
    routed the MoE is the dense MLP); the router's logits are `router_scale` x the predicted expert output norm over
    its mean's log (gates ~ norm^scale: near-uniform among the top-k for small scales, each expert's output scaled
    by k)."""
    torch.manual_seed(seed)
    config = dense.config
    experts = expert_channels(config.intermediate_size, chunks, duplicates)
    width = len(experts[0])
    moe_config = MixtralConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=width,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim, hidden_act=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps,
        rope_parameters=dict(config.rope_parameters), tie_word_embeddings=config.tie_word_embeddings,
        num_local_experts=len(experts), num_experts_per_tok=k, bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id, sliding_window=None)
    moe_config._experts_implementation = "eager"
    moe = AutoModelForCausalLM.from_config(moe_config).eval()
    state = {n: p for n, p in dense.state_dict().items() if ".mlp." not in n}
    missing = moe.load_state_dict(state, strict=False).missing_keys
    assert all(".mlp." in n for n in missing), missing
    inputs = mlp_inputs(dense, batches)
    for layer, (source, target) in enumerate(zip(dense.model.layers, moe.model.layers)):
        gate, up, down = source.mlp.gate_proj.weight, source.mlp.up_proj.weight, source.mlp.down_proj.weight
        for e, channels in enumerate(experts):
            jitter = (lambda w: w + noise * w.std() * torch.randn_like(w)) if e >= chunks else (lambda w: w)
            target.mlp.experts.gate_up_proj[e] = torch.cat([jitter(gate[channels]), jitter(up[channels])])
            share = 0.5 if split and (e >= chunks or e < duplicates) else 1.0
            target.mlp.experts.down_proj[e] = share * k * jitter(down[:, channels])
        x = inputs[layer]
        norms = torch.stack([target.mlp.experts(x, torch.full((len(x), 1), e), torch.ones(len(x), 1)).norm(dim=-1)
                             for e in range(len(experts))], dim=-1)
        norms = router_scale * torch.log(norms / norms.mean())  # gates ~ norm^scale: near-uniform for small scales
        solution = torch.linalg.lstsq(x.double(), norms.double()).solution  # router logits ~ ||expert output||
        target.mlp.gate.weight.copy_(solution.T.float())
    pairs = [(j, chunks + j) for j in range(duplicates)]
    return moe, pairs


def found(removed: list[int], pairs: list[tuple[int, int]]) -> float:
    """Fraction of planted pairs of which exactly one copy was removed."""
    return sum((a in removed) != (b in removed) for a, b in pairs) / len(pairs)


def remove_experts(moe, coupling, keep: dict[str, list[int]], method: str = "drop",
                   calibration: list[torch.Tensor] | None = None) -> dict:
    """Remove experts through the real apply path (layer pipeline + slice), with `method` for the removed experts;
    returns the expert-reconstruction summary (without the per-layer rows)."""
    counter = ParamCounter({n: tuple(p.shape) for n, p in moe.named_parameters()}, coupling)
    params = sum(p.numel() for p in moe.parameters())
    plan = PrunePlan("", "mixtral", "bench", "experts", 0, 0.0, 1, params,
                     counter.count({name: len(units) for name, units in keep.items()}), keep=keep)
    options = PruneOptions(reconstruct="none", expert_reconstruct=method, show_progress=False)
    apply_in_memory(moe, coupling, plan, calibration or [], options, StageTimer())
    return {k: v for k, v in plan.expert_reconstruct_report.items() if k != "per_layer"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--duplicates", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--router-scale", type=float, default=0.03, help="router logits = scale x log(predicted "
                        "expert output norm / mean); 0.03: near-uniform gates among the top-k")
    parser.add_argument("--noise", type=float, default=0.01)
    parser.add_argument("--layers", type=int, default=30, help="keep only the first N decoder layers")
    parser.add_argument("--calibration-windows", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--eval-tokens", type=int, default=2048)
    parser.add_argument("--random-seeds", type=int, default=3)
    parser.add_argument("--estimators", default="expert-frequency,reap,expert-reconstruction,l2")
    parser.add_argument("--methods", default="drop,router,merge", help="--expert-reconstruct methods compared")
    parser.add_argument("--eval-registers", default="python-docs,wordnet,fortunes,jargon",
                        help="registers whose evaluation parts are scored (none is calibrated on)")
    parser.add_argument("--eval-seq-len", type=int, default=256)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    start = time.time()
    dense, tokenizer = load_model(resolve_model_path(None))
    dense.model.layers = dense.model.layers[:args.layers]
    dense.config.num_hidden_layers = args.layers
    calibration = token_windows(tokenizer, load_text(default_files(DEFAULT_CALIBRATION_FILES)), args.seq_len,
                                args.calibration_windows, seed=0)
    eval_texts = {name: corpus_part(name, "evaluation").text for name in args.eval_registers.split(",")}
    methods = args.methods.split(",")

    def ppl(model) -> dict[str, float]:
        return {name: round(perplexity(model, tokenizer, text, args.eval_seq_len, args.eval_tokens,
                                       False).perplexity, 3) for name, text in eval_texts.items()}

    def removal_rows(keep: dict[str, list[int]]) -> dict:
        rows = {}
        for method in methods:
            model = copy.deepcopy(moe)
            report = remove_experts(model, build_coupling(model), keep, method, calibration)
            rows[method] = {"perplexity": ppl(model), **({"expert_reconstruct": report} if report else {})}
            del model
        return rows

    moe, pairs = upcycle(dense, calibration, args.chunks, args.duplicates, args.top_k, args.noise, seed=0,
                         router_scale=args.router_scale)
    results = {"setup": vars(args) | {"out": str(args.out)}, "pairs": pairs,
               "perplexity": {"dense": ppl(dense), "upcycled": ppl(moe)}, "estimators": {}}
    keep_count = args.chunks
    write(results, args.out)
    groups = build_coupling(moe).of_kind(GroupKind.EXPERTS)
    for name in args.estimators.split(","):
        scores = score_groups(moe, groups, get_estimator(name), lambda: calibration, show_progress=False)
        keep = {g.name: top_k(scores[g.name], keep_count) for g in groups}
        removed = {g.name: [e for e in range(g.size) if e not in keep[g.name]] for g in groups}
        results["estimators"][name] = {
            "found_redundant": round(sum(found(r, pairs) for r in removed.values()) / len(removed), 3),
            "removed_layer0": removed[groups[0].name], "methods": removal_rows(keep)}
        write(results, args.out)  # partial results survive an interrupted run
    randoms = []
    for seed in range(args.random_seeds):
        rng = random.Random(seed)
        keep = {g.name: sorted(rng.sample(range(g.size), keep_count)) for g in groups}
        removed = [[e for e in range(g.size) if e not in keep[g.name]] for g in groups]
        randoms.append({"found_redundant": round(sum(found(r, pairs) for r in removed) / len(removed), 3),
                        "methods": removal_rows(keep)})
        results["estimators"]["random"] = {"runs": randoms}
        write(results, args.out)
    results["seconds"] = round(time.time() - start, 1)
    print(json.dumps(results, indent=1))
    write(results, args.out)


def write(results: dict, out: Path | None) -> None:
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
