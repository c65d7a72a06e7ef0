"""Mixture-of-experts families: where the routed-expert count and the experts' intermediate width live.

Mixtral's experts use `intermediate_size`; Qwen2-MoE and Qwen3-MoE keep that for dense MLP layers and call the
experts' width `moe_intermediate_size`. Qwen2-MoE's shared expert is an ordinary MLP (`channels` group) of
`shared_expert_intermediate_size` channels."""
from . import ArchSpec, register

register(ArchSpec(model_types=("mixtral",), experts_field="num_local_experts", expert_width_field="intermediate_size"))
register(ArchSpec(model_types=("qwen2_moe",), mlp_width_field="shared_expert_intermediate_size",
                  experts_field="num_experts", expert_width_field="moe_intermediate_size"))
register(ArchSpec(model_types=("qwen3_moe",), experts_field="num_experts", expert_width_field="moe_intermediate_size"))
