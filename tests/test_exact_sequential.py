"""Sequential reconstruction is exact: a layer's down_proj is refitted on the inputs it sees once the same layer's
o_proj has been refitted (and every layer before it), checked against least squares computed by hand on the
activations of the reconstructed model itself."""
import copy

import torch

from depgraph_llm.graph.coupling import build_coupling
from depgraph_llm.recovery.reconstruct import reconstruct
from tests.test_slim_checkpoints import SHAPES, _plan
from tests.tiny import tiny_model

BATCHES = [torch.randint(3, 160, (1, 40), generator=torch.Generator().manual_seed(s)) for s in range(4)]
DAMP = 0.01


def test_down_proj_is_fitted_on_the_inputs_the_refitted_attention_gives():
    model = tiny_model()
    coupling = build_coupling(model)
    plan = _plan(model, coupling, SHAPES["gqa-dropped-kv-groups"])  # layer 1 loses MLP channels and a KV group
    dense_down = model.model.layers[1].mlp.down_proj.weight.detach().double().clone()
    pruned = copy.deepcopy(model)
    reconstruct(pruned, coupling, plan, BATCHES, method="ls", mode="sequential", damp=DAMP)
    assert not torch.equal(pruned.model.layers[1].self_attn.o_proj.weight, model.model.layers[1].self_attn.o_proj.weight)
    seen = []
    hook = pruned.model.layers[1].mlp.down_proj.register_forward_hook(
        lambda m, args, out: seen.append(args[0].reshape(-1, args[0].shape[-1]).double()))
    with torch.no_grad():
        for ids in BATCHES:  # the reconstructed (dense-shaped, zero-masked) model computes what the pruned one will
            pruned(input_ids=ids, use_cache=False)
    hook.remove()
    x = torch.cat(seen)
    kept = torch.tensor(plan.keep["layers.1.mlp.channels"])
    gram = x.T @ x
    ridge = DAMP * gram.diagonal().mean()
    expected = torch.linalg.solve(gram[kept][:, kept] + ridge * torch.eye(len(kept), dtype=torch.float64),
                                  x[:, kept].T @ (x @ dense_down.T)).T
    refitted = pruned.model.layers[1].mlp.down_proj.weight.detach().double()
    torch.testing.assert_close(refitted[:, kept], expected, atol=1e-5, rtol=1e-5)
