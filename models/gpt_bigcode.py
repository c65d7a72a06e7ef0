"""GPT-BigCode (StarCoder 1): GPT-2's config names. Its multi-query attention uses the single key/value head
without a head axis, so query heads have no KV group to nest in and stay whole (MLP, hidden and depth prune)."""
from . import ArchSpec, register

register(ArchSpec(model_types=("gpt_bigcode",), mlp_width_field="n_inner", q_heads_field="n_head", kv_heads_field=None,
                  head_dim_field=None, hidden_field="n_embd", layers_field="n_layer", bias_switches=()))
