"""Property test over random tiny Llama-like configs x reachable ratios (hypothesis).

Derandomized by default (profile in tests/conftest.py), so `python -m pytest` runs the same examples every time;
`HYPOTHESIS_PROFILE=random python -m pytest tests/test_properties.py` runs a fresh random search. Every failing
example found so far is kept below as an explicit @example.
"""
import copy
import tempfile

import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

from depgraph_llm import build_coupling
from depgraph_llm.errors import UserError
from depgraph_llm.importance import get_estimator, score_groups
from depgraph_llm.models import spec_for
from depgraph_llm.job.in_memory import config_accepts
from depgraph_llm.planning.budget import ParamCounter, plan_uniform
from depgraph_llm.planning.plan import PrunePlan
from depgraph_llm.removal.apply import apply_plan, mask_model
from tests.tiny import tiny_model

EXAMPLES = 30
# Reloaded logits vs the in-memory slim model: the weights are asserted bitwise equal, the forward is the same
# code, but float32 GEMM results are not guaranteed bitwise equal for two placements of the same weights (the
# reload memory-maps tensors at 8-byte-aligned offsets of the safetensors file, the in-memory ones are 64-byte
# aligned; MKL without conditional-numerical-reproducibility mode may pick alignment-dependent kernels). The
# review saw a last-bit difference on one machine for the first @example; here it is bitwise equal. Tolerance:
# a few float32 ulps of logits of size ~1.
RELOAD_ATOL = 1e-5


def llama_params(c: dict, kv: int, q_per_kv: int, mlp: int) -> int:
    """Hand count of a Llama model's parameters with these widths (no biases, RMSNorm weights)."""
    hidden, head_dim, layers = c["hidden_size"], c["head_dim"], c["num_hidden_layers"]
    attention = 2 * hidden * kv * q_per_kv * head_dim + 2 * hidden * kv * head_dim
    per_layer = attention + 3 * hidden * mlp + 2 * hidden
    return c["vocab_size"] * hidden * (1 if c["tie"] else 2) + layers * per_layer + hidden


@st.composite
def cases(draw):
    """A config and a ratio that some uniform widths (drawn first, at least one unit removed) reach exactly."""
    kv_heads = draw(st.integers(1, 3))
    q_per_kv = draw(st.integers(1, 3))
    heads = kv_heads * q_per_kv
    config = dict(num_key_value_heads=kv_heads, num_attention_heads=heads,
                  hidden_size=heads * draw(st.integers(2, 7)), head_dim=draw(st.sampled_from([4, 6, 8])),
                  intermediate_size=draw(st.integers(3, 71)), num_hidden_layers=draw(st.integers(1, 3)),
                  vocab_size=draw(st.integers(20, 90)), tie=draw(st.booleans()))
    round_to = draw(st.sampled_from([1, 2, 4]))
    mlp_choices = sorted({*range(round_to, config["intermediate_size"] + 1, round_to), config["intermediate_size"]})
    widths = (draw(st.integers(1, kv_heads)), draw(st.integers(1, q_per_kv)), draw(st.sampled_from(mlp_choices)))
    if widths == (kv_heads, q_per_kv, config["intermediate_size"]):  # remove something
        widths = (widths[0], widths[1], mlp_choices[0]) if len(mlp_choices) > 1 else (1, 1, mlp_choices[0])
    before = llama_params(config, kv_heads, q_per_kv, config["intermediate_size"])
    ratio = 1 - llama_params(config, *widths) / before
    return {"config": config, "ratio": ratio, "round_to": round_to}


REVIEW_EXAMPLE = {"config": dict(num_key_value_heads=3, num_attention_heads=9, hidden_size=18, head_dim=4,
                                 intermediate_size=3, num_hidden_layers=1, vocab_size=20, tie=False),
                  "ratio": 0.203125, "round_to": 1}  # issue 19: reloaded logits not torch.equal on one machine


def prune_case(case: dict) -> bool:
    """Plan, mask, apply, save and reload one case; False when the ratio is unreachable (one-line error)."""
    config = dict(case["config"])
    tie = config.pop("tie")
    model = tiny_model("llama", tie=tie, **config)
    coupling = build_coupling(model)
    counter = ParamCounter({n: tuple(p.shape) for n, p in model.named_parameters()}, coupling)
    assert counter.count({}) == llama_params(case["config"], config["num_key_value_heads"],
                                             config["num_attention_heads"] // config["num_key_value_heads"],
                                             config["intermediate_size"])
    scores = score_groups(model, coupling.groups, get_estimator("l2"))
    spec = spec_for("llama")
    try:
        keep, nested, after = plan_uniform(coupling, counter, scores, case["ratio"], case["round_to"],
                                           lambda w: config_accepts(model, spec, w), loss_scaled=False)
    except UserError as exc:  # unreachable with this shape: a one-line message naming the nearest ratio
        assert "\n" not in str(exc) and "nearest reachable ratio" in str(exc)
        return False
    plan = PrunePlan("h", "llama", "l2", "uniform", 0, case["ratio"], case["round_to"], counter.count({}), after,
                     keep, nested)
    assert abs(plan.ratio_achieved - case["ratio"]) <= 0.01
    masked = copy.deepcopy(model)
    mask_model(masked, coupling, plan)
    apply_plan(model, coupling, plan, spec)
    assert sum(p.numel() for p in model.parameters()) == after
    ids = torch.randint(0, config["vocab_size"], (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        slim = model(ids).logits
        assert torch.allclose(masked(ids).logits, slim, atol=1e-5)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
        state = model.state_dict()
        assert all(torch.equal(state[n], t) for n, t in reloaded.state_dict().items())
        with torch.no_grad():
            assert torch.allclose(reloaded(ids).logits, slim, rtol=0, atol=RELOAD_ATOL)
    return True


OUTCOMES: list[bool] = []


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
@example(case=REVIEW_EXAMPLE)
def _prune_never_crashes_and_masked_equals_physical(case):
    OUTCOMES.append(prune_case(case))


def test_prune_never_crashes_and_masked_equals_physical():
    OUTCOMES.clear()
    _prune_never_crashes_and_masked_equals_physical()
    reached = sum(OUTCOMES)
    # every generated ratio is reachable by construction; the planner must find it (±0.01) in all of them
    assert len(OUTCOMES) >= EXAMPLES and reached == len(OUTCOMES), (reached, len(OUTCOMES))

