"""RoPE scaling of a Llama-family config as GGUF metadata (and, for Llama 3 scaling, llama.cpp's `rope_freqs`)."""
from __future__ import annotations

import math

import torch

from depgraph_llm.errors import UserError

YARN_FIELDS = {"extrapolation_factor": "add_rope_scaling_yarn_ext_factor",
               "attention_factor": "add_rope_scaling_yarn_attn_factor",
               "beta_fast": "add_rope_scaling_yarn_beta_fast", "beta_slow": "add_rope_scaling_yarn_beta_slow"}


def rope_parameters(config: dict) -> dict:
    """The rotary settings of a config.json: transformers 5 `rope_parameters`, else the older `rope_scaling`."""
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    rope.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    rope.setdefault("rope_type", rope.get("type", "default"))
    return rope


def llama3_frequency_factors(head_dim: int, rope: dict) -> torch.Tensor:
    """Per-frequency divisors llama.cpp applies to the default RoPE frequencies to get Llama 3 scaling."""
    base = float(rope["rope_theta"])
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    context = float(rope.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / inv_freq
    smooth = ((context / wavelen - low) / (high - low)).clamp(0.0, 1.0)
    factors = 1.0 / ((1 - smooth) / factor + smooth)  # 1 for short wavelengths, `factor` for long ones
    return factors.float()


def add_rope(writer, config: dict, head_dim: int) -> dict[str, torch.Tensor]:
    """Write rope base and scaling keys; returns extra tensors to store (llama3: `rope_freqs.weight`)."""
    import gguf

    rope = rope_parameters(config)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    kind = str(rope["rope_type"]).lower()
    if kind == "default":
        return {}
    if kind == "llama3":
        return {"rope_freqs.weight": llama3_frequency_factors(head_dim, rope)}
    if kind not in ("linear", "yarn") or rope.get("factor") is None:
        raise UserError(f"GGUF export supports RoPE scaling default, linear, yarn and llama3; this config has "
                        f"{kind!r}{' without a factor' if kind in ('linear', 'yarn') else ''}")
    writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR if kind == "linear" else gguf.RopeScalingType.YARN)
    writer.add_rope_scaling_factor(float(rope["factor"]))
    if kind == "yarn":
        original = rope.get("original_max_position_embeddings")
        if original is None:
            raise UserError("GGUF export of yarn RoPE scaling needs original_max_position_embeddings in the config")
        writer.add_rope_scaling_orig_ctx_len(int(original))
        for field, method in YARN_FIELDS.items():
            if rope.get(field) is not None:
                getattr(writer, method)(float(rope[field]))
    return {}
