"""Peak memory of loading and running one model, measured in a fresh process so nothing else counts.

CPU: the process imports torch, transformers and depgraph-llm, resets the kernel's high-water mark of its
resident set (VmHWM, via /proc/self/clear_refs) and records its RSS; it then loads the model and runs the
speed workload once (a full forward over the prompt, then greedy decoding with the KV cache). Peak = VmHWM minus
that baseline: the weights as loaded, activations, logits, KV cache and allocator overhead, not the interpreter
and libraries. GPU: the model moves to the GPU in bf16 and peak = torch.cuda.max_memory_allocated (weights,
activations and cache; not the CUDA context).
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from depgraph_llm.errors import UserError

MEMORY_PROTOCOL = ("peak memory: each model in its own fresh process running the speed workload once (full "
                   "forward over the prompt, then greedy decoding); CPU = high-water RSS minus the RSS after "
                   "imports (weights as loaded + activations + logits + KV cache + allocator overhead, not the "
                   "interpreter and libraries); GPU = torch.cuda.max_memory_allocated (bf16; not the CUDA context)")


@dataclass
class MemoryResult:
    peak_bytes: int       # what the model costs at its peak (see the module docstring)
    weights_bytes: int    # parameters alone, for comparison
    baseline_bytes: int   # RSS of the process before loading (CPU), subtracted from the peak
    method: str           # "rss-high-water" or "cuda-max-allocated"
    device: str

    def to_dict(self) -> dict:
        return asdict(self)


def _status_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(match.group(1)) if match else 0


def current_rss_bytes() -> int:
    """Resident set size of this process now (Linux)."""
    return _status_kib("VmRSS") * 1024


def reset_high_water() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def measure_peak_memory(path: Path, prompt_tokens: int = 256, decode_tokens: int = 32, device: str = "cpu",
                        trust_remote_code: bool = False, timeout_s: int = 3600) -> MemoryResult:
    """Run the memory probe on the model folder `path` in a fresh Python process and return its result."""
    command = [sys.executable, "-m", "depgraph_llm.evaluation.memory", str(path), "--prompt-tokens",
               str(prompt_tokens), "--decode-tokens", str(decode_tokens), "--device", device]
    if trust_remote_code:
        command.append("--trust-remote-code")
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"the memory probe for {path} failed ({last[:200]}); rerun with --no-speed to skip it")
    return MemoryResult(**json.loads(lines[-1]))


def _import_model_code(path: Path, trust_remote_code: bool) -> None:
    """Import the model's modeling code (a weightless copy on the meta device) so that lazy imports made while
    loading are part of the baseline, not of the model's peak."""
    import torch
    from transformers import AutoModelForCausalLM

    from depgraph_llm.checkpoint.loading import load_config

    config = load_config(path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def _probe(path: Path, prompt_tokens: int, decode_tokens: int, device: str, trust_remote_code: bool) -> MemoryResult:
    """In the child process: baseline after imports, load, one run of the speed workload, peak."""
    import torch

    from depgraph_llm.checkpoint.loading import load_model

    from .speed import _one_run, random_prompt

    if device == "cuda":
        model, _ = load_model(path, trust_remote_code)
        weights = sum(p.numel() for p in model.parameters()) * 2
        torch.cuda.reset_peak_memory_stats()
        model = model.to("cuda", torch.bfloat16).eval()
        _one_run(model, random_prompt(model, prompt_tokens), decode_tokens)
        return MemoryResult(torch.cuda.max_memory_allocated(), weights, 0, "cuda-max-allocated", device)
    _import_model_code(path, trust_remote_code)
    if not reset_high_water():
        raise RuntimeError("cannot reset the peak RSS counter (/proc/self/clear_refs)")
    baseline = current_rss_bytes()
    model, _ = load_model(path, trust_remote_code)
    model.eval()
    _one_run(model, random_prompt(model, prompt_tokens), decode_tokens)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return MemoryResult(_status_kib("VmHWM") * 1024 - baseline, weights, baseline, "rss-high-water", device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="peak memory of one model (run by measure_peak_memory)")
    parser.add_argument("path", type=Path)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--trust-remote-code", action="store_true")
    args = parser.parse_args(argv)
    result = _probe(args.path, args.prompt_tokens, args.decode_tokens, args.device, args.trust_remote_code)
    sys.stdout.write(json.dumps(result.to_dict()) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
