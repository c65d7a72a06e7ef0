"""OPT: the MLP width is `ffn_dim`; biases everywhere, learned positions, no separate KV heads."""
from . import ArchSpec, register

register(ArchSpec(model_types=("opt",), mlp_width_field="ffn_dim", kv_heads_field=None, head_dim_field=None,
                  bias_switches=()))
