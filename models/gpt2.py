"""GPT-2: Conv1D projections and a fused c_attn (kept whole by the tracer); its config uses n_* field names."""
from . import ArchSpec, register

register(ArchSpec(model_types=("gpt2",), mlp_width_field="n_inner", q_heads_field="n_head", kv_heads_field=None,
                  head_dim_field=None, hidden_field="n_embd", layers_field="n_layer", bias_switches=()))
