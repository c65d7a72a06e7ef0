"""Falcon: KV heads are `num_kv_heads`, on the attention module too (its fused query_key_value is viewed as
(KV groups, queries per group + 2, head_dim), so KV groups prune; queries inside a group stay whole)."""
from . import ArchSpec, register

register(ArchSpec(model_types=("falcon",), mlp_width_field="ffn_hidden_size", kv_heads_field="num_kv_heads",
                  head_dim_field=None, bias_switches=(),
                  attention_attrs={"num_heads": "q_heads", "num_kv_heads": "kv_heads"}))
