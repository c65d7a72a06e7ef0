"""Command line: `depgraph-llm prune|graph ...`; `python prune.py ...` is `depgraph-llm prune ...`."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from depgraph_llm.calibration import DEFAULT_CALIBRATION_SAMPLES
from depgraph_llm.errors import UserError
from depgraph_llm.cli.recover import add_recover_args, add_recover_command, cmd_recover
from depgraph_llm.planning.vocab_cost import AUTO_VOCAB

log = logging.getLogger("depgraph_llm")


def vocab_keep_arg(value: str) -> int | str:
    """--vocab-keep: a number of tokens or "auto"."""
    if value == AUTO_VOCAB:
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is neither a number of tokens nor '{AUTO_VOCAB}'") from None


def _add_prune_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_pos", nargs="?", metavar="MODEL", help="model folder or .gguf (same as --model)")
    parser.add_argument("--model", help="HF model folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--ratio", type=float, required=True, help="fraction of all parameters to remove, e.g. 0.25")
    parser.add_argument("--out", type=Path, help="output folder (default: ./<model>-pruned-<ratio>)")
    parser.add_argument("--importance", default="taylor", help="importance estimator: taylor (default), "
                        "taylor-vector, fisher, obs, wanda-sp, flap, l1, l2, random (see docs/estimators.md)")
    parser.add_argument("--schedule", default="uniform", help="uniform (same widths in every layer); global (MLP "
                        "channels ranked across layers on layer-normalised scores); log-increase (removed MLP "
                        "fraction grows with depth, SlimGPT); depth (remove whole decoder layers, then trim widths "
                        "uniformly to the exact ratio); layers[:A:B] (uniform widths only in layers A..B-1; default: "
                        "all but the first and last); search (per-layer MLP widths, heads and dropped layers chosen by an "
                        "evolutionary search on held-aside windows). Non-uniform widths save as a per_layer_config "
                        "checkpoint")
    parser.add_argument("--mlp-ratio", type=float, help="fraction of MLP channels removed per pruned layer")
    parser.add_argument("--head-ratio", type=float, help="fraction of query heads removed per pruned layer")
    parser.add_argument("--hidden-ratio", type=float, help="fraction of hidden (residual) channels removed")
    parser.add_argument("--hidden-method", choices=("select", "rotate"), default="select",
                        help="how --hidden-ratio removes hidden channels: select (the lowest-scoring channels) or "
                        "rotate (rotate the residual stream into its principal directions first, SliceGPT-style; "
                        "combines with --reconstruct; unties a tied LM head, counted in --ratio)")
    parser.add_argument("--layers-removed", type=int, help="remove this many whole decoder layers (Block Influence)")
    parser.add_argument("--experts-keep", type=int, help="mixture of experts: routed experts kept in every MoE layer")
    parser.add_argument("--expert-ratio", type=float, help="mixture of experts: fraction of routed experts removed "
                        "in every MoE layer")
    parser.add_argument("--vocab-keep", type=vocab_keep_arg, metavar="N|auto", help="keep this many tokens: "
                        "those the tokenizer produces on the calibration text first; tokenizer and embeddings shrink "
                        "together. auto: the size whose whole plan (the widths pay for the rest of --ratio) "
                        "costs least on held-out calibration text, measured without reconstruction")
    parser.add_argument("--tp-size", type=int, default=1, help="make head counts and widths divisible for this "
                        "tensor-parallel size")
    parser.add_argument("--search-generations", type=int, default=20, help="--schedule search: generations of the "
                        "evolutionary search (8 candidates each; about 5 s each for the default model on one idle core)")
    parser.add_argument("--search-time", type=float, default=600, metavar="SECONDS", help="--schedule search: "
                        "no generation starts after this many seconds, so the search ends near this bound and keeps "
                        "the best profile found; 0: run every generation (then the result does not depend on speed)")
    parser.add_argument("--search-layer-drops", action="store_true", help="--schedule search: candidates may "
                        "also drop whole layers (off by default: the reconstruction cannot recover them)")
    parser.add_argument("--search-fitness", default="masked", help="--schedule "
                        "search: score candidates with their removed units masked (default), or with the projections "
                        "that read them refitted by least squares first, as the reconstruction will (slower)")
    parser.add_argument("--depth-metric", default="bi", help="depth schedule: bi (Block Influence, any layers) or "
                        "angular (angular distance, one contiguous block)")
    parser.add_argument("--reconstruct", default="obs", help="retrain-free reconstruction of the layers that lose "
                        "input channels, layer by layer: obs (default: SlimGPT-style OBS choice of MLP channels + "
                        "least squares), ls (least squares), bias (FLAP bias compensation) or none")
    parser.add_argument("--expert-reconstruct", default="drop", help="mixture of experts, after removing routed "
                        "experts: drop (default), router (least-squares refit of the kept experts' router rows), "
                        "merge (fold each removed expert into its most similar kept one, then the router refit); "
                        "see docs/new-architecture.md")
    parser.add_argument("--reconstruct-mode", default="sequential", help="local (fit on the dense model's "
                        "activations) or sequential (fit on the pruned model's running activations, dense targets)")
    parser.add_argument("--reconstruct-anchor", type=float, metavar="A",
                        help="ls/obs: pull the refit toward the original weights, each input in proportion to its "
                        "energy (0: plain least squares; default: PruneOptions.reconstruct_anchor); trades calibration "
                        "error for error on text of other registers (docs/reconstruction-anchor.md)")
    parser.add_argument("--cross-block", type=int, default=0, metavar="W", help="after the closed-form "
                        "reconstruction, tune W consecutive pruned layers at a time (Adam) so that their output on "
                        "the pruned stream matches the dense layers' on the dense stream (default 0: off)")
    parser.add_argument("--cross-block-epochs", type=int, default=2, help="--cross-block: passes over the "
                        "calibration windows per window of layers")
    parser.add_argument("--cross-block-lr", type=float, default=1e-5, help="--cross-block: Adam learning rate")
    parser.add_argument("--cross-block-reg", type=float, default=0.0, help="--cross-block: weight of the pull "
                        "toward the closed-form weights (relative squared distance)")
    parser.add_argument("--calibration", help="calibration text: a file, a folder of text files, .json/.jsonl, "
                        "or 'self' (text sampled from the dense model itself; no data needed)")
    parser.add_argument("--eval-text", help="text for perplexity before/after (default: licence texts)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--round-to", type=int, default=8, help="round MLP widths to a multiple of this")
    parser.add_argument("--calibration-samples", type=int, default=DEFAULT_CALIBRATION_SAMPLES,
                        help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window")
    parser.add_argument("--eval-tokens", type=int, default=4096, help="tokens scored for perplexity")
    parser.add_argument("--no-eval", action="store_true", help="skip perplexity before/after")
    parser.add_argument("--dry-run", action="store_true", help="print the plan (widths, params, ratio) and write nothing")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out folder")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow code shipped inside the checkpoint")
    parser.add_argument("--streaming", action="store_true", help="one decoder layer in memory at a time, read from "
                        "the safetensors shards and written out as soon as it is final (chosen by itself when the "
                        "model would not fit in memory)")
    parser.add_argument("--in-memory", action="store_true", help="load the whole float32 model even when it "
                        "looks too big for memory (by default such a model is streamed); running out of memory "
                        "then ends in a one-line error")
    parser.add_argument("--dtype", default="auto", help="what streamed layers compute in: auto (the checkpoint's "
                        "own), float32, bfloat16 or float16; statistics and solves stay float64, the output keeps "
                        "the source dtype")
    parser.add_argument("--device", help="streamed decoder layers visit this device in turn for every stage (e.g. "
                        "cuda); implies --streaming")
    parser.add_argument("--device-map", help="spread the whole model over several GPUs with accelerate: auto, "
                        "balanced, balanced_low_0, sequential, or a JSON file/object {module: GPU}; every stage "
                        "then runs where each layer sits (weights offloaded to cpu/disk are refused: use --streaming)")
    parser.add_argument("--activation-budget-mb", type=int, help="streaming: calibration activations beyond this "
                        "many MB are kept on disk (default: all in memory)")
    add_recover_args(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="depgraph-llm", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    parser.add_argument("--verbose", "-v", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)
    prune = sub.add_parser("prune", help="prune a model to a smaller HF checkpoint")
    _add_prune_args(prune)
    apply = sub.add_parser("apply", help="replay a prune_plan.json on the model it was made from")
    apply.add_argument("plan", type=Path, help="prune_plan.json")
    apply.add_argument("--model", help="the model the plan was made from (default: the embedded model)")
    apply.add_argument("--out", type=Path, required=True, help="output folder")
    apply.add_argument("--overwrite", action="store_true")
    apply.add_argument("--trust-remote-code", action="store_true")
    evaluate = sub.add_parser("eval", help="perplexity, zero-shot accuracy, speed and memory; writes a report")
    evaluate.add_argument("models", nargs="+", help="model folders (or .gguf) to evaluate")
    evaluate.add_argument("--baseline", help="dense model to compare against (speedups are measured vs it)")
    evaluate.add_argument("--report-dir", type=Path, help="where to write the report (default: MODEL/eval_report)")
    evaluate.add_argument("--eval-text", help="held-out text for perplexity and the cloze task")
    evaluate.add_argument("--tasks-dir", type=Path, help="extra lm-eval task YAML folder (dataset_path: json, local files)")
    evaluate.add_argument("--bigbench-dir", type=Path, help="BIG-bench task.json folder (default: cache, see scripts/fetch_bigbench.py)")
    evaluate.add_argument("--lm-eval-tasks", default="", help="comma-separated lm-eval task names (hellaswag, "
                          "piqa, ...) whose datasets are already in the local HF datasets cache")
    evaluate.add_argument("--limit", type=int, default=200, help="items per task (0 = all)")
    evaluate.add_argument("--cloze-items", type=int, default=300)
    evaluate.add_argument("--no-speed", action="store_true")
    evaluate.add_argument("--trust-remote-code", action="store_true")
    info = sub.add_parser("info", help="per-layer widths, parameters and provenance of a checkpoint")
    info.add_argument("folder", type=Path)
    export = sub.add_parser("export-gguf", help="write a uniform Llama-family checkpoint as GGUF for llama.cpp")
    export.add_argument("folder", type=Path)
    export.add_argument("--out", type=Path, required=True, help="the .gguf file to write")
    export.add_argument("--dtype", default="f16", help="f16 (default) or f32")
    export.add_argument("--overwrite", action="store_true")
    add_recover_command(sub)
    graph = sub.add_parser("graph", help="print the coupling groups of a model")
    graph.add_argument("model_pos", nargs="?", metavar="MODEL")
    graph.add_argument("--model", help="HF model folder or .gguf file (default: the embedded model)")
    graph.add_argument("--graphml", type=Path, help="also write the coupling graph as GraphML")
    graph.add_argument("--all", action="store_true", help="list every group instead of one layer's worth")
    graph.add_argument("--trust-remote-code", action="store_true")
    return parser


def cmd_prune(args: argparse.Namespace) -> int:
    from depgraph_llm.job.options import PruneOptions
    from depgraph_llm.job.prune import run_prune
    from depgraph_llm.cli.summary import prune_summary

    options = PruneOptions(
        model=args.model or args.model_pos, ratio=args.ratio, out=args.out, importance=args.importance,
        schedule=args.schedule, search_generations=args.search_generations, search_time_s=args.search_time,
        search_layer_drops=args.search_layer_drops, search_fitness=args.search_fitness,
        depth_metric=args.depth_metric, reconstruct=args.reconstruct,
        reconstruct_mode=args.reconstruct_mode, expert_reconstruct=args.expert_reconstruct,
        calibration=args.calibration, eval_text=args.eval_text,
        seed=args.seed, round_to=args.round_to, mlp_ratio=args.mlp_ratio, head_ratio=args.head_ratio,
        hidden_ratio=args.hidden_ratio, hidden_method=args.hidden_method, layers_removed=args.layers_removed, tp_size=args.tp_size,
        vocab_keep=args.vocab_keep, experts_keep=args.experts_keep, expert_ratio=args.expert_ratio,
        calibration_samples=args.calibration_samples, seq_len=args.seq_len, eval_tokens=args.eval_tokens,
        evaluate=not args.no_eval, dry_run=args.dry_run, overwrite=args.overwrite,
        trust_remote_code=args.trust_remote_code, streaming=args.streaming, in_memory=args.in_memory, dtype=args.dtype,
        device=args.device, device_map=args.device_map, activation_budget_mb=args.activation_budget_mb, cross_block=args.cross_block,
        cross_block_epochs=args.cross_block_epochs, cross_block_lr=args.cross_block_lr,
        cross_block_reg=args.cross_block_reg,
        **({} if args.reconstruct_anchor is None else {"reconstruct_anchor": args.reconstruct_anchor}))
    if args.recover and not args.dry_run:
        from depgraph_llm.cli.recover import cmd_prune_and_recover

        return cmd_prune_and_recover(args, options)
    result = run_prune(options)
    print(prune_summary(result.report, result.out))
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    from depgraph_llm.job.replay_plan import run_apply
    from depgraph_llm.cli.summary import prune_summary

    result = run_apply(args.plan, args.model, args.out, args.overwrite, args.trust_remote_code)
    print(prune_summary(result.report, result.out))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from depgraph_llm.checkpoint.info import describe

    print(describe(args.folder))
    return 0


def cmd_export_gguf(args: argparse.Namespace) -> int:
    from depgraph_llm.checkpoint.files import check_not_source
    from depgraph_llm.checkpoint.gguf_export import export_gguf

    check_not_source(args.out, [args.folder])
    print(f"wrote {export_gguf(args.folder, args.out, args.dtype, args.overwrite)}")
    return 0


def cmd_graph(args: argparse.Namespace) -> int:
    from depgraph_llm.graph.coupling import build_coupling
    from depgraph_llm.checkpoint.loading import load_model, resolve_model_path
    from depgraph_llm.cli.summary import groups_table

    from depgraph_llm.checkpoint.files import check_not_source

    model_path = resolve_model_path(args.model or args.model_pos)
    if args.graphml:
        check_not_source(args.graphml, [args.model or args.model_pos, model_path], flag="--graphml")
    model, _ = load_model(model_path, args.trust_remote_code)
    coupling = build_coupling(model)
    print(groups_table(coupling, model, show_all=args.all))
    if args.graphml:
        import networkx as nx

        graph = nx.relabel_nodes(coupling.graph, {n: f"{n[0]}:{n[1]}" for n in coupling.graph.nodes})
        for _, data in graph.nodes(data=True):
            data["factors"] = str(data["factors"])
        nx.write_graphml(graph, args.graphml)
        print(f"coupling graph written to {args.graphml}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from depgraph_llm.evaluation.job import EvalOptions, run_eval
    from depgraph_llm.evaluation.report import _markdown

    if args.limit < 0 or args.cloze_items < 1:
        raise UserError("--limit must be >= 0 and --cloze-items >= 1")
    options = EvalOptions(models=args.models, baseline=args.baseline, report_dir=args.report_dir,
                          eval_text=args.eval_text, tasks_dir=args.tasks_dir, bigbench_dir=args.bigbench_dir,
                          limit=args.limit or None, cloze_items=args.cloze_items, speed=not args.no_speed,
                          trust_remote_code=args.trust_remote_code,
                          builtin_tasks=[t for t in args.lm_eval_tasks.split(",") if t])
    out, report = run_eval(options)
    print(_markdown(report))
    print(f"report written to {out}")
    return 0


class _Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's stop, `timeout`), raised where the job is, like Ctrl-C, so temporary output is removed."""


def _terminate(signum, frame) -> None:
    raise _Terminated


COMMANDS = {"prune": cmd_prune, "apply": cmd_apply, "eval": cmd_eval, "graph": cmd_graph, "info": cmd_info,
            "export-gguf": cmd_export_gguf, "recover": cmd_recover}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub: local folders only
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live in the main thread
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    previous_interrupt = signal.getsignal(signal.SIGINT) if main_thread else None
    try:
        code = COMMANDS[args.command](args)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # finished: a late Ctrl-C must not turn success into a crash
        return code
    except UserError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - an allocation failure anywhere becomes one line with the fix
        from depgraph_llm.job.stage_memory import is_out_of_memory, out_of_memory_message

        if args.debug or not is_out_of_memory(exc):
            raise
        print(f"error: {out_of_memory_message(exc, streaming=bool(getattr(args, 'streaming', False)))}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:
        print("interrupted: nothing was written to the output folder", file=sys.stderr)
        return 143 if isinstance(stop, _Terminated) else 130
    finally:
        if main_thread:  # a caller in the same process (a test, a notebook) gets its handlers back
            signal.signal(signal.SIGTERM, previous)
            signal.signal(signal.SIGINT, previous_interrupt)


def prune_main(argv: list[str] | None = None) -> int:
    """Entry point of the root prune.py: `depgraph-llm prune` with the same flags."""
    argv = list(sys.argv[1:] if argv is None else argv)
    leading = [a for a in argv if a in ("--debug", "--verbose", "-v")]
    rest = [a for a in argv if a not in leading]
    return main([*leading, "prune", *rest])


if __name__ == "__main__":
    sys.exit(main())
