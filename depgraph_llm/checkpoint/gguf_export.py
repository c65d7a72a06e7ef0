"""Export a uniform Llama-family slim checkpoint to GGUF (f32/f16) so llama.cpp users can run it.

Tensor names, metadata keys and the rotary row order of q/k follow llama.cpp's own HF converter (llama.cpp
interleaves the two rotary halves; Hugging Face keeps them as blocks). The tokenizer metadata comes from
`gguf_tokenizer` (byte-level BPE as "gpt2" with llama.cpp's pre-tokenizer name, SentencePiece BPE as "llama"), RoPE
scaling from `gguf_rope`.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from depgraph_llm.checkpoint.files import corrupt_weights_error, read_checkpoint_config
from depgraph_llm.checkpoint.gguf_rope import add_rope
from depgraph_llm.checkpoint.gguf_tokenizer import read_vocab, write_vocab
from depgraph_llm.errors import UserError
from depgraph_llm.removal.slim_config import is_heterogeneous, saved_per_layer_widths

GGUF_ARCH = {"llama": "llama", "mistral": "llama"}
DTYPES = {"f32": np.float32, "f16": np.float16}


def _rotary_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """HF rotate-half row order -> llama.cpp interleaved order, per head (llama.cpp's converter permutation)."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _tensor_names(layers: int) -> dict[str, str]:
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    parts = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(layers):
        for hf, gg in parts.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
    return names


def export_gguf(folder: Path, out: Path, dtype: str = "f16", overwrite: bool = False) -> Path:
    """Write `folder` (a uniform slim checkpoint) as a GGUF file at `out`, atomically."""
    import gguf
    from safetensors.torch import load_file

    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r} is not available; choose f16 or f32")
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists; pass --overwrite or choose another path")
    config = read_checkpoint_config(folder)
    if is_heterogeneous(config) or saved_per_layer_widths(config):
        raise UserError(f"{folder} has per-layer widths, and llama.cpp's architectures need the "
                        "same widths in every layer; prune with --schedule uniform for a GGUF export")
    arch = GGUF_ARCH.get(config.get("model_type"))
    if arch is None:
        raise UserError(f"GGUF export supports {sorted(GGUF_ARCH)}; {folder} is {config.get('model_type')!r}")
    tensors: dict[str, torch.Tensor] = {}
    try:
        for file in sorted(folder.glob("*.safetensors")):
            tensors.update(load_file(file))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for damaged files
        raise corrupt_weights_error(folder, exc) from exc
    layers, heads = config["num_hidden_layers"], config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    vocab = read_vocab(folder, config["vocab_size"])
    writer_path = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(str(writer_path), arch)
    try:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(folder.name)
        writer.add_context_length(config.get("max_position_embeddings", 2048))
        writer.add_embedding_length(config["hidden_size"])
        writer.add_block_count(layers)
        writer.add_feed_forward_length(config["intermediate_size"])
        writer.add_head_count(heads)
        writer.add_head_count_kv(kv_heads)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_dimension_count(head_dim)
        extra_tensors = add_rope(writer, config, head_dim)
        writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
        writer.add_vocab_size(config["vocab_size"])
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        write_vocab(writer, vocab)
        for name, tensor in extra_tensors.items():
            writer.add_tensor(name, tensor.numpy().astype(np.float32))
        names = _tensor_names(layers)
        for name, tensor in tensors.items():
            if name not in names:
                raise UserError(f"GGUF export does not know where {name} goes; only stock Llama tensors are supported")
            if name.endswith("q_proj.weight"):
                tensor = _rotary_rows(tensor, heads)
            elif name.endswith("k_proj.weight"):
                tensor = _rotary_rows(tensor, kv_heads)
            # norms stay f32 as llama.cpp's converter keeps 1-D tensors
            array = tensor.float().numpy().astype(DTYPES[dtype] if tensor.dim() > 1 else np.float32)
            writer.add_tensor(names[name], array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(writer_path, out)
    finally:
        if writer_path.exists():
            writer_path.unlink()
    return out
