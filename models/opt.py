"""OPT: the MLP width is `ffn_dim`; biases everywhere, learned positions, no separate KV heads. Its attention
derives head_dim = hidden / heads (pruned widths are recorded as module overrides, depgraph_llm/overrides.py)."""
from . import ArchSpec, register

register(ArchSpec(model_types=("opt",), mlp_width_field="ffn_dim", kv_heads_field=None, head_dim_field=None,
                  hidden_alias_fields=("word_embed_proj_dim",), bias_switches=()))
