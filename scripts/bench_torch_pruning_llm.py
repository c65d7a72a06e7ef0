"""Torch-Pruning's own LLM recipe (examples/LLMs/prune_llm.py of Torch-Pruning 1.6: MetaPruner with
GroupNormImportance(p=2, mean), named GroupMagnitudeImportance in 1.6.1, hidden size, attention heads and MLP channels all at --ratio, round_to 4, the LM
head ignored) on a checkpoint folder, measured from outside: wall time, peak RSS of the child, parameters after,
the saved size, or how it fails.

    python scripts/bench_torch_pruning_llm.py MODEL_DIR OUT_DIR [--ratio 0.25] [--timeout 1800]

The model loads in its stored dtype on the CPU (the example loads float16 with device_map="auto" on GPUs).
Appends one row to docs/results/bench-scale/torch-pruning.json (or --results)."""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_scale import append_row, folder_bytes  # noqa: E402  (the same results file format)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results" / "bench-scale" / "torch-pruning.json"


def prune(model_dir: Path, out: Path, ratio: float, logits_only: bool = False) -> dict:
    """The recipe itself (runs in the child process)."""
    import torch
    import torch_pruning as tp
    from transformers import AutoModelForCausalLM, AutoTokenizer

    marks = {"start": time.perf_counter()}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto", low_cpu_mem_usage=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    marks["loaded"] = time.perf_counter()
    params_before = sum(p.numel() for p in model.parameters())
    inputs = torch.tensor(tokenizer.encode("Hello world.")).unsqueeze(0)
    num_heads = {}
    for name, m in model.named_modules():
        if name.endswith("self_attn"):
            num_heads[m.q_proj] = model.config.num_attention_heads
            num_heads[m.k_proj] = model.config.num_key_value_heads
            num_heads[m.v_proj] = model.config.num_key_value_heads
    gqa = model.config.num_attention_heads != model.config.num_key_value_heads
    # the example's GroupNormImportance is GroupMagnitudeImportance in 1.6 (same p-norm over the group)
    group_norm = getattr(tp.importance, "GroupNormImportance", None) or tp.importance.GroupMagnitudeImportance
    pruner = tp.pruner.MetaPruner(
        model, example_inputs=inputs, importance=group_norm(p=2, group_reduction="mean"),
        global_pruning=False, pruning_ratio=ratio, ignored_layers=[model.lm_head], num_heads=num_heads,
        prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=ratio, round_to=4,
        # --logits-only: trace the logits alone (the example traces the whole output, with its KV cache)
        forward_fn=(lambda m, x: m(input_ids=x, use_cache=False).logits) if logits_only else None)
    marks["graph_built"] = time.perf_counter()
    for group in pruner.step(interactive=True):
        group.prune()
    marks["pruned"] = time.perf_counter()
    model.config.hidden_size = model.lm_head.in_features  # the example's attribute update, as written there
    for name, m in model.named_modules():
        if name.endswith("self_attn"):
            m.hidden_size = m.q_proj.out_features
            m.num_heads = m.hidden_size // m.head_dim
            model.config.num_attention_heads = m.num_heads
            if not gqa:
                m.num_key_value_heads = m.num_heads
            # transformers 5 attention has no num_key_value_heads attribute: the KV heads are k_proj's rows
            kv_heads = getattr(m, "num_key_value_heads", None) or m.k_proj.out_features // m.head_dim
            m.num_key_value_groups = m.num_heads // kv_heads
            model.config.num_key_value_heads = kv_heads
        elif name.endswith("mlp"):
            m.hidden_size = m.gate_proj.in_features
            model.config.intermediate_size = m.gate_proj.out_features
    if not gqa:
        model.config.num_key_value_heads = model.config.num_attention_heads
    params_after = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        logits_ok = bool(torch.isfinite(model(inputs).logits).all())
    model.save_pretrained(out)
    marks["saved"] = time.perf_counter()
    widths = {"hidden": model.config.hidden_size, "intermediate": model.config.intermediate_size,
              "q_heads": model.config.num_attention_heads,
              "kv_heads": model.model.layers[0].self_attn.k_proj.out_features
              // model.model.layers[0].self_attn.head_dim}
    return {"params_before": params_before, "params_after": params_after,
            "ratio_achieved": round(1 - params_after / params_before, 4), "widths_after": widths,
            "forward_after_finite": logits_ok,
            "stage_s": {k: round(marks[k] - marks["start"], 1) for k in marks if k != "start"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--timeout", type=int, default=1800)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--logits-only", action="store_true", help="trace model(x, use_cache=False).logits "
                        "instead of the whole output (the one change to the example)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(prune(args.model, args.out, args.ratio, args.logits_only)))
        return
    command = [sys.executable, __file__, str(args.model), str(args.out), "--ratio", str(args.ratio), "--child",
               *(["--logits-only"] if args.logits_only else [])]
    start = time.perf_counter()
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
        returncode, stdout, stderr = result.returncode, result.stdout, result.stderr
    except subprocess.TimeoutExpired as exc:
        returncode, stdout = "timeout", exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        stderr = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
    row = {"tool": "torch-pruning " + __import__("importlib.metadata").metadata.version("torch-pruning"),
           "recipe": "examples/LLMs/prune_llm.py (GroupNormImportance p=2 mean, hidden+heads+MLP at ratio)"
           + (", forward_fn = logits only" if args.logits_only else ""),
           "model": str(args.model), "ratio": args.ratio, "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
           "returncode": returncode, "wall_s": round(time.perf_counter() - start, 1),
           "child_peak_rss_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
           "source_bytes": folder_bytes(args.model), "checkpoint_bytes": folder_bytes(args.out),
           "machine": f"{os.cpu_count()} CPUs", "omp_threads": os.environ.get("OMP_NUM_THREADS")}
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if returncode == 0 and lines:
        row.update(json.loads(lines[-1]))
    else:
        row["error"] = [line for line in stderr.strip().splitlines() if line.strip()][-3:]
    append_row(args.results, row)


if __name__ == "__main__":
    main()
