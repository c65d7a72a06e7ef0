"""Command line of training-based recovery: the `--recover*` flags of `prune`, `depgraph-llm recover DIR`, and
the progress bar (loss, tokens/s)."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_recover_args(parser: argparse.ArgumentParser, standalone: bool = False) -> None:
    """Recovery flags; `standalone` (the `recover` command) also accepts the short spellings --data/--steps/--lr."""
    def alias(long: str, short: str) -> list[str]:
        return [long, short] if standalone else [long]

    if not standalone:
        parser.add_argument("--recover", choices=("lora", "masked", "full"), help="after pruning, recover by "
                            "training: lora (adapters merged into the slim weights), masked (dense-shaped training "
                            "with the plan's masks held at zero, then pruned), full (every slim weight)")
    parser.add_argument(*alias("--recover-data", "--data"), dest="recover_data", help="recovery text: a file, a "
                        "folder, .json/.jsonl with a 'text' field, or 'self' (sampled from the dense model); must "
                        "differ from the evaluation text (default: licence texts in neither calibration nor evaluation)")
    parser.add_argument("--teacher", help="distil from this model: 'dense' (the source model) or a folder with the "
                        "same tokenizer")
    parser.add_argument(*alias("--recover-steps", "--steps"), dest="recover_steps", type=int, default=100,
                        help="optimizer steps (default 100)")
    parser.add_argument(*alias("--recover-lr", "--lr"), dest="recover_lr", type=float, default=None,
                        help="peak learning rate (default 2e-4 for lora, 5e-5 for masked/full)")
    parser.add_argument("--recover-batch-size", type=int, default=4, help="windows per step (default 4)")
    parser.add_argument("--recover-seq-len", type=int, default=128, help="tokens per training window (default 128)")
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--masked-lora", action="store_true", help="masked trainer: train masked LoRA adapters "
                        "instead of every weight")
    parser.add_argument("--distill-weight", type=float, default=1.0, help="with --teacher: weight of the KL term "
                        "(1 = KL only, 0.5 = half KL, half LM loss)")
    parser.add_argument("--temperature", type=float, default=1.0, help="with --teacher: softmax temperature")
    parser.add_argument("--teacher-topk", type=int, default=0, help="with --teacher: distil on the teacher's top-k "
                        "logits (0 = full logits on the fly)")
    parser.add_argument("--teacher-cache", type=Path, help="with --teacher-topk: folder caching the teacher's top-k "
                        "logits per window, reused by later runs")
    parser.add_argument("--checkpoint-every", type=int, default=50, help="save a resumable checkpoint every K "
                        "steps (0 = never)")
    parser.add_argument("--save-adapter", action="store_true", help="lora: also keep the adapter folder "
                        "(OUT/adapter, loads with PeftModel.from_pretrained)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")


def add_recover_command(sub) -> None:
    """`depgraph-llm recover DIR --data PATH [--teacher DENSE_DIR] --out OUT`."""
    recover = sub.add_parser("recover", help="recover a slim checkpoint by training (LoRA, masked, full, distillation)")
    recover.add_argument("folder", type=Path, help="slim checkpoint folder written by `prune`")
    recover.add_argument("--trainer", "--method", dest="recover", default="lora", choices=("lora", "masked", "full"))
    recover.add_argument("--out", type=Path, help="output folder (default: DIR-<trainer>)")
    recover.add_argument("--source-model", help="the dense model DIR was pruned from (default: named in its report)")
    recover.add_argument("--eval-text", help="held-out text for perplexity before/after")
    recover.add_argument("--seed", type=int, default=0)
    recover.add_argument("--no-eval", action="store_true")
    recover.add_argument("--overwrite", action="store_true")
    recover.add_argument("--trust-remote-code", action="store_true")
    add_recover_args(recover, standalone=True)


def recover_options(args: argparse.Namespace, **fields):
    """RecoverOptions from parsed flags."""
    from depgraph_llm.job.recover import RecoverOptions

    lr = args.recover_lr if args.recover_lr is not None else (2e-4 if args.recover == "lora" or args.masked_lora
                                                               else 5e-5)
    return RecoverOptions(trainer=args.recover, data=args.recover_data, teacher=args.teacher,
                          steps=args.recover_steps, lr=lr, batch_size=args.recover_batch_size,
                          seq_len=args.recover_seq_len, warmup_steps=args.warmup_steps, lora_rank=args.lora_rank,
                          lora_alpha=2 * args.lora_rank, masked_lora=args.masked_lora,
                          distill_weight=args.distill_weight, temperature=args.temperature,
                          teacher_topk=args.teacher_topk, teacher_cache=args.teacher_cache,
                          checkpoint_every=args.checkpoint_every, save_adapter=args.save_adapter,
                          resume=args.resume, seed=args.seed, trust_remote_code=args.trust_remote_code, **fields)


class Progress:
    """tqdm bar over the optimizer steps showing loss and tokens/s."""

    def __init__(self) -> None:
        self.bar = None

    def __call__(self, info) -> None:
        from tqdm.auto import tqdm

        if self.bar is None:
            self.bar = tqdm(total=info.steps, initial=info.step - 1, desc="recovery", unit="step")
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{info.loss:.3f}", tok_s=f"{info.tokens_per_s:.0f}")
        if info.step >= info.steps:
            self.bar.close()


def _files_label(files: list[str], shown: int = 3) -> str:
    return ", ".join(files[:shown]) + (f" and {len(files) - shown} more (see prune_report.json)"
                                       if len(files) > shown else "")


def recovery_summary(report: dict, out: Path) -> str:
    """A short table of what recovery did."""
    from depgraph_llm.cli.summary import key_value_table

    rec = report["recovery"]
    rows = [["trainer", rec["trainer"] + (f" + distillation from {rec['teacher']}" if rec["teacher"] else "")],
            ["steps / tokens", f"{rec['steps']} / {rec['tokens']:,}"],
            ["data", _files_label(rec["data"]["files"])],
            ["loss", f"{rec['loss_curve'][0][1]:.3f} -> {rec['loss_curve'][-1][1]:.3f}"],
            ["wall time", f"{rec['wall_time_s']:.0f}s"]]
    ppl = rec["perplexity"]
    if ppl["before"] and ppl["after"]:
        b, a = ppl["before"]["perplexity"], ppl["after"]["perplexity"]
        rows.append(["perplexity (eval text)", f"{b:.2f} -> {a:.2f}  (x{a / b:.2f})"])
    return key_value_table(rows, ["recovery", ""]) + f"\nrecovered checkpoint written to {out}"


def cmd_recover(args: argparse.Namespace) -> int:
    from depgraph_llm.job.recover import run_recover

    options = recover_options(args, slim=args.folder, out=args.out, source_model=args.source_model,
                              eval_text=args.eval_text, evaluate=not args.no_eval, overwrite=args.overwrite)
    result = run_recover(options, Progress())
    print(recovery_summary(result.report, result.out))
    return 0


def cmd_prune_and_recover(args: argparse.Namespace, prune_options) -> int:
    """`prune ... --recover T`: run_prune into a stage folder, then recovery into --out."""
    from depgraph_llm.job.recover import run_prune_and_recover
    from depgraph_llm.cli.summary import prune_summary

    options = recover_options(args, evaluate=prune_options.evaluate)
    pruned, result = run_prune_and_recover(prune_options, options, Progress())
    if pruned is not None:
        print(prune_summary(pruned.report, result.out))
    print(recovery_summary(result.report, result.out))
    return 0
