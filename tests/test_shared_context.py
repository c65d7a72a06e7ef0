"""The shared-context scorer gives lm-eval's HFLM log-likelihoods while running each shared context once."""
import pytest
import torch
from lm_eval.models.huggingface import HFLM

from depgraph_llm.evaluation.shared_context import SharedContextHFLM
from tests.tiny import tiny_model, tiny_tokenizer


def requests_for(model, generator: torch.Generator) -> list:
    """Two 3-choice items (continuations of 1, 2 and 5 tokens, one of them the model's greedy path), a 2-choice
    item whose context is longer than the sliding window, and a lone request with its own context."""
    vocab = model.config.vocab_size

    def ids(n: int) -> list[int]:
        return torch.randint(3, vocab, (n,), generator=generator).tolist()

    def greedy(context: list[int], n: int) -> list[int]:
        tokens = list(context)
        with torch.no_grad():
            for _ in range(n):
                tokens.append(int(model(torch.tensor([tokens])).logits[0, -1].argmax()))
        return tokens[len(context):]

    requests = []
    for length in (9, 17):
        context = ids(length)
        for continuation in (ids(1), ids(2), greedy(context, 5)):
            requests.append(((f"c{length}", str(continuation)), context, continuation))
    long_context = ids(40)
    requests += [(("long", "a"), long_context, ids(3)), (("long", "b"), long_context, ids(4))]
    requests.append((("alone", "x"), ids(6), ids(3)))
    return requests


def full_sequence_score(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """The hand oracle: one forward over context + continuation, no cache."""
    with torch.no_grad():
        logprobs = model(torch.tensor([context + continuation])).logits[0].log_softmax(-1)
    rows = logprobs[len(context) - 1:len(context) + len(continuation) - 1]
    target = torch.tensor(continuation)
    return float(rows.gather(1, target[:, None]).sum()), bool((rows.argmax(-1) == target).all())


@pytest.mark.parametrize("model_type,overrides", [("llama", {}),
                                                  ("gemma3_text", {"num_key_value_heads": 1, "sliding_window": 8})])
def test_shared_context_matches_hflm_and_runs_each_context_once(model_type, overrides):
    model, tokenizer = tiny_model(model_type, tie=True, **overrides), tiny_tokenizer()
    requests = requests_for(model, torch.Generator().manual_seed(0))
    plain = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4)._loglikelihood_tokens(requests, True)

    seen = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    shared = SharedContextHFLM(pretrained=model, tokenizer=tokenizer, batch_size=4)._loglikelihood_tokens(
        requests, True)
    hook.remove()

    for (_, context, continuation), got, reference in zip(requests, shared, plain, strict=True):
        oracle = full_sequence_score(model, context, continuation)
        assert got[0] == pytest.approx(reference[0], abs=1e-4) == pytest.approx(oracle[0], abs=1e-4)
        assert got[1] == reference[1] == oracle[1]
    assert sum(answer[1] for answer in shared) == 2  # the two greedy continuations, and only they
    # each shared context is one row of its own length; the continuations follow it as one batch
    shared_contexts = [(1, 9), (1, 17), (1, 40)]
    assert all(shape in seen for shape in shared_contexts)
    assert sum(shape[1] for shape in seen if shape[0] == 1 and shape[1] in (9, 17, 40)) == 9 + 17 + 40
    assert (3, 4) in seen and (2, 3) in seen  # 3 choices padded to the 5-token one's 4 inputs; the 2-choice item
