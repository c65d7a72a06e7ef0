"""Random-weight bf16 checkpoints with the exact shapes of Llama-3.2-1B and Llama-3.1-8B, written shard by shard
(one tensor in memory at a time), with the default model's tokenizer (token ids fit in the 128k vocabulary).

    python scripts/make_shaped_checkpoint.py llama-3.2-1b OUT_DIR [--layers N]

Random weights: for memory, time and file-size benchmarks of the streaming path only, never for quality."""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from depgraph_llm.checkpoint.shards import ShardWriter  # noqa: E402

LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
SHAPES = {
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                         max_position_embeddings=131072, rope_theta=500000.0,
                         rope_scaling={**LLAMA3_ROPE, "factor": 32.0}),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False,
                         max_position_embeddings=131072, rope_theta=500000.0,
                         rope_scaling={**LLAMA3_ROPE, "factor": 8.0}),
}


def build(name: str, out: Path, layers: int | None = None, shard_bytes: int = 2 << 30, seed: int = 0) -> Path:
    """Write config.json, tokenizer files and sharded bf16 safetensors for the named shape."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from depgraph_llm.checkpoint.loading import default_model_dir

    fields = dict(SHAPES[name], rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
    if layers is not None:
        fields["num_hidden_layers"] = layers
    config = AutoConfig.for_model("llama", **fields)
    config.architectures = ["LlamaForCausalLM"]
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    skeleton.tie_weights()
    out.mkdir(parents=True, exist_ok=False)
    writer = ShardWriter(out, shard_bytes)
    generator = torch.Generator().manual_seed(seed)
    for param_name, param in skeleton.named_parameters():  # tied weights appear once
        if param.dim() == 1:  # norms: around 1
            tensor = 1 + 0.1 * torch.randn(param.shape, generator=generator)
        else:
            tensor = torch.randn(param.shape, generator=generator) * 0.02
        writer.add(param_name, tensor.to(torch.bfloat16))
        del tensor
    writer.finish()
    config.dtype = torch.bfloat16
    config.save_pretrained(out)
    source = default_model_dir()
    for file in source.iterdir():
        if file.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            shutil.copy(file, out / file.name)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("out", type=Path)
    parser.add_argument("--layers", type=int, help="fewer decoder layers than the real model (same widths)")
    args = parser.parse_args()
    build(args.shape, args.out, args.layers)


if __name__ == "__main__":
    main()
