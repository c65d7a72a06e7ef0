"""GPT-2: Conv1D projections, a fused c_attn (split into q/k/v segments by the tracer) and n_* field names. Its
attention derives head_dim = hidden / heads (recorded as module overrides) and splits c_attn by `split_size`."""
from . import ArchSpec, register

register(ArchSpec(model_types=("gpt2",), mlp_width_field="n_inner", q_heads_field="n_head", kv_heads_field=None,
                  head_dim_field=None, hidden_field="n_embd", layers_field="n_layer", bias_switches=(),
                  attention_attrs={"num_heads": "q_heads", "split_size": "q_width"}))
