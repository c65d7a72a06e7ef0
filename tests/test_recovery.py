"""Training-based recovery on tiny models: merged LoRA == adapter model, masked training == training the slim model,
resume == uninterrupted, distillation loss against hand-computed KL, bad input refused with nothing changed."""
import copy
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from depgraph_llm import load_pruned
from depgraph_llm.errors import UserError
from depgraph_llm.graph.coupling import build_coupling
from depgraph_llm.graph.groups import GroupKind
from depgraph_llm.models import spec_for
from depgraph_llm.job.output import save_checkpoint
from depgraph_llm.job.recover import RecoverOptions, run_recover, state_dir_for
from depgraph_llm.recovery.data import RecoveryData, batch_indices
from depgraph_llm.recovery.distill import kl_loss, mixed_loss, topk_kl_loss
from depgraph_llm.recovery.trainers import TrainSettings, get_trainer, train
from depgraph_llm.recovery.trainers.masked import load_slim_into_dense
from depgraph_llm.removal.apply import apply_plan
from tests.cli_helpers import one_line_error, run_cli, tree_digest
from tests.test_slim_checkpoints import SHAPES, _plan
from tests.tiny import save_tiny_checkpoint, tiny_model, tiny_tokenizer

PROMPT = torch.tensor([[5, 17, 33, 2, 90, 41, 7, 100, 3]])
FAST = dict(steps=3, batch_size=2, seq_len=32, warmup_steps=1, evaluate=False, checkpoint_every=0)


def _slim_checkpoint(folder, shape: str, dense_dir=None):
    """A tiny dense checkpoint and a slim one pruned from it by the named plan shape (see test_slim_checkpoints)."""
    dense_dir = dense_dir or save_tiny_checkpoint(folder / "dense", tie=True)
    model = load_pruned(dense_dir).eval()
    coupling = build_coupling(model)
    plan = _plan(model, coupling, SHAPES[shape])
    apply_plan(model, coupling, plan, spec_for("llama"))
    plan.params_after = sum(p.numel() for p in model.parameters())
    report = {"source": {"path": str(dense_dir)}}
    save_checkpoint(model, tiny_tokenizer(), folder / f"slim-{shape}", plan, report, False)
    return dense_dir, folder / f"slim-{shape}"


def _windows(count=6, length=16, seed=1, vocab=160):
    generator = torch.Generator().manual_seed(seed)
    windows = [torch.randint(0, vocab, (1, length), generator=generator) for _ in range(count)]
    return RecoveryData(windows, ["random"], count * length, length, "random")


@pytest.mark.parametrize("shape", ["uniform", "heterogeneous-mlp"])
def test_merged_lora_matches_adapter_model_and_loads(tmp_path, shape):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, slim_dir = _slim_checkpoint(tmp_path, shape)
    out = tmp_path / "out"
    result = run_recover(RecoverOptions(slim=slim_dir, out=out, trainer="lora", lr=5e-2, save_adapter=True, **FAST))
    slim = load_pruned(slim_dir).eval()
    loader = AutoModelForCausalLM.from_pretrained if shape == "uniform" else load_pruned  # plain HF for uniform
    merged = loader(out).eval()
    adapter_model = PeftModel.from_pretrained(load_pruned(slim_dir), out / "adapter").eval()
    with torch.no_grad():
        merged_logits = merged(PROMPT).logits
        torch.testing.assert_close(merged_logits, adapter_model(PROMPT).logits, atol=1e-5, rtol=0)
        assert (merged_logits - slim(PROMPT).logits).abs().max() > 1e-3  # the adapters did change the model
    assert {n: p.shape for n, p in merged.named_parameters()} == {n: p.shape for n, p in slim.named_parameters()}
    assert sum(p.numel() for p in merged.parameters()) == sum(p.numel() for p in slim.parameters())
    assert not any("lora" in name for name in load_file(out / "model.safetensors"))
    recovery = json.loads((out / "prune_report.json").read_text())["recovery"]
    assert recovery["trainer"] == "lora" and recovery["steps"] == 3 and len(recovery["loss_curve"]) == 3
    assert recovery["tokens"] == 3 * 2 * 32 and recovery["data"]["files"] == result.report["recovery"]["data"]["files"]
    from depgraph_llm.calibration.corpora import available_registers
    from depgraph_llm.recovery.data import DEFAULT_RECOVERY_REGISTERS, FALLBACK_RECOVERY_FILES

    expected = ([f"{r}:training" for r in available_registers(DEFAULT_RECOVERY_REGISTERS)]
                or [f"/usr/share/common-licenses/{n}" for n in FALLBACK_RECOVERY_FILES])
    assert recovery["data"]["files"] == expected  # the default text (which one is tested in test_recovery_data.py)
    assert (out / "prune_plan.json").read_text() == (slim_dir / "prune_plan.json").read_text()


@pytest.mark.parametrize("shape", ["dropped-layers", "gqa-dropped-kv-groups"])
def test_masked_training_equals_training_the_slim_model(shape):
    dense = tiny_model(tie=True)
    coupling = build_coupling(dense)
    plan = _plan(dense, coupling, SHAPES[shape])
    slim = copy.deepcopy(dense)
    apply_plan(slim, build_coupling(slim), plan, spec_for("llama"))
    settings = TrainSettings(steps=4, lr=1e-2, batch_size=2, warmup_steps=1, checkpoint_every=0, seed=3)
    data = _windows()
    full = get_trainer("full")
    physical = full.finish(train(copy.deepcopy(slim), full, data, settings)[0])  # the oracle: slim trained directly
    masked_input = copy.deepcopy(dense)
    load_slim_into_dense(masked_input, slim, coupling, plan)
    masked = get_trainer("masked", coupling=coupling, plan=plan, spec=spec_for("llama"))
    trained, _ = train(masked_input, masked, data, settings)
    pruned = masked.finish(trained)
    physical_state, masked_state = physical.state_dict(), pruned.state_dict()
    assert physical_state.keys() == masked_state.keys()
    for name, tensor in physical_state.items():
        torch.testing.assert_close(masked_state[name], tensor, atol=1e-5, rtol=0, msg=name)
    assert max((physical_state[n] - slim.state_dict()[n]).abs().max() for n in physical_state) > 1e-3


def test_masked_training_of_a_vocabulary_pruned_plan_equals_training_the_slim_model():
    """Rows removed from a (tied) vocabulary: the dense-shaped model trains restricted to the kept tokens, and
    after `finish` equals the slim model trained directly, token rows included."""
    dense = tiny_model(tie=True)
    coupling = build_coupling(dense)
    plan = _plan(dense, coupling, SHAPES["heterogeneous-mlp"])
    vocab = coupling.of_kind(GroupKind.VOCAB)[0]
    kept = sorted(torch.randperm(vocab.size, generator=torch.Generator().manual_seed(0))[:120].tolist())
    plan.keep[vocab.name] = kept  # not a prefix: slim id i is dense id kept[i]
    slim = copy.deepcopy(dense)
    apply_plan(slim, build_coupling(slim), plan, spec_for("llama"))
    assert slim.get_input_embeddings().weight.shape[0] == 120 < vocab.size
    settings = TrainSettings(steps=4, lr=1e-2, batch_size=2, warmup_steps=1, checkpoint_every=0, seed=3)
    data = _windows(vocab=120)  # slim-tokenizer ids
    full = get_trainer("full")
    physical = full.finish(train(copy.deepcopy(slim), full, data, settings)[0])
    masked_input = copy.deepcopy(dense)
    load_slim_into_dense(masked_input, slim, coupling, plan)
    masked = get_trainer("masked", coupling=coupling, plan=plan, spec=spec_for("llama"))
    pruned = masked.finish(train(masked_input, masked, data, settings)[0])
    physical_state, masked_state = physical.state_dict(), pruned.state_dict()
    assert physical_state.keys() == masked_state.keys()
    for name, tensor in physical_state.items():
        torch.testing.assert_close(masked_state[name], tensor, atol=1e-5, rtol=0, msg=name)
    embedding = "model.embed_tokens.weight"
    assert (physical_state[embedding] - slim.state_dict()[embedding]).abs().max() > 1e-3  # token rows trained


def test_masked_job_end_to_end(tmp_path):
    _, slim_dir = _slim_checkpoint(tmp_path, "heterogeneous-heads")
    out = tmp_path / "masked"
    run_recover(RecoverOptions(slim=slim_dir, out=out, trainer="masked", lr=1e-2, **FAST))
    recovered, slim = load_pruned(out), load_pruned(slim_dir)
    assert {n: p.shape for n, p in recovered.named_parameters()} == {n: p.shape for n, p in slim.named_parameters()}
    assert json.loads((out / "config.json").read_text()) == json.loads((slim_dir / "config.json").read_text())


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    _, slim_dir = _slim_checkpoint(tmp_path, "uniform")
    options = dict(FAST, steps=5, checkpoint_every=2)
    run_recover(RecoverOptions(slim=slim_dir, out=tmp_path / "straight", lr=5e-2, **options))

    def interrupt(info):
        if info.step == 3:
            raise KeyboardInterrupt

    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        run_recover(RecoverOptions(slim=slim_dir, out=out, lr=5e-2, **options), on_step=interrupt)
    assert not out.exists()  # nothing half-written
    assert (state_dir_for(out) / "step-0000002").is_dir()
    result = run_recover(RecoverOptions(slim=slim_dir, out=out, lr=5e-2, resume=True, **options))
    assert result.report["recovery"]["resumed_from_step"] == 2
    assert not state_dir_for(out).exists()
    straight, resumed = load_file(tmp_path / "straight" / "model.safetensors"), load_file(out / "model.safetensors")
    for name, tensor in straight.items():
        assert torch.equal(resumed[name], tensor), name
    straight_curve = json.loads((tmp_path / "straight" / "prune_report.json").read_text())["recovery"]["loss_curve"]
    assert result.report["recovery"]["loss_curve"] == straight_curve


def test_kl_against_hand_computation():
    student = torch.tensor([[[0.0, 0.0]]])
    teacher = torch.tensor([[[math.log(3.0), 0.0]]])
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)  # p = (3/4, 1/4), q = (1/2, 1/2)
    assert kl_loss(student, teacher).item() == pytest.approx(expected, abs=1e-6)
    p1 = math.sqrt(3) / (math.sqrt(3) + 1)  # softmax(log(3)/2, 0)
    expected_t2 = 4 * (p1 * math.log(p1 / 0.5) + (1 - p1) * math.log((1 - p1) / 0.5))
    assert kl_loss(student, teacher, temperature=2.0).item() == pytest.approx(expected_t2, abs=1e-6)
    logits = torch.randn(2, 5, 11)
    assert kl_loss(logits, logits.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert kl_loss(logits, logits + torch.randn_like(logits)).item() > 1e-3
    top = logits.topk(11, dim=-1)  # k = vocabulary: the top-k loss is the full KL
    other = torch.randn(2, 5, 11)
    assert topk_kl_loss(other, top.values, top.indices).item() == pytest.approx(kl_loss(other, logits).item(), abs=1e-5)
    assert mixed_loss(torch.tensor(2.0), torch.tensor(4.0), 0.25).item() == pytest.approx(2.5)


def test_distillation_loss_is_zero_when_the_teacher_is_the_student(tmp_path):
    _, slim_dir = _slim_checkpoint(tmp_path, "uniform")
    result = run_recover(RecoverOptions(slim=slim_dir, out=tmp_path / "self-distilled", trainer="full",
                                        teacher=str(slim_dir), **dict(FAST, steps=1)))
    assert result.report["recovery"]["loss_curve"][0][1] == pytest.approx(0.0, abs=1e-6)
    cached = run_recover(RecoverOptions(slim=slim_dir, out=tmp_path / "topk", trainer="lora", teacher=str(slim_dir),
                                        teacher_topk=160, teacher_cache=tmp_path / "cache", **dict(FAST, steps=1)))
    assert cached.report["recovery"]["loss_curve"][0][1] == pytest.approx(0.0, abs=1e-5)
    assert len(list((tmp_path / "cache").rglob("*.pt"))) == 2  # one file per window of the batch


def test_batches_are_a_pure_function_of_step_and_seed():
    first = [batch_indices(s, 3, 7, seed=5) for s in range(10)]
    assert first == [batch_indices(s, 3, 7, seed=5) for s in range(10)]
    epoch = [i for s in range(7) for i in batch_indices(s, 3, 7, seed=5)][:7]
    assert sorted(epoch) == list(range(7))  # each epoch visits every window once
    ranks = [batch_indices(0, 2, 8, seed=0, rank=r, world=2) for r in range(2)]
    assert not set(ranks[0]) & set(ranks[1])


def _bad(tmp_path, slim_dir, **changes):
    before = tree_digest(slim_dir)
    out = tmp_path / "never"
    with pytest.raises(UserError) as error:
        run_recover(RecoverOptions(slim=slim_dir, out=out, **dict(FAST, **changes)))
    assert "\n" not in str(error.value)
    assert tree_digest(slim_dir) == before and not out.exists() and not state_dir_for(out).exists()
    return str(error.value)


def test_bad_input_is_refused_and_changes_nothing(tmp_path):
    dense_dir, slim_dir = _slim_checkpoint(tmp_path, "uniform")
    assert "does not exist" in _bad(tmp_path, slim_dir, data=str(tmp_path / "missing.txt"))
    short = tmp_path / "short.txt"
    short.write_text("too short")
    assert "fewer than one window" in _bad(tmp_path, slim_dir, data=str(short))
    assert "disjoint" in _bad(tmp_path, slim_dir, data="/usr/share/common-licenses/GPL",  # a link to GPL-3
                              eval_text="/usr/share/common-licenses/GPL-3")
    copy_of_eval = tmp_path / "copy.txt"
    shutil.copy("/usr/share/common-licenses/GPL-3", copy_of_eval)
    assert "disjoint" in _bad(tmp_path, slim_dir, data=str(copy_of_eval), eval_text="/usr/share/common-licenses/GPL-3")
    other = tmp_path / "other-tokenizer"
    shutil.copytree(dense_dir, other)
    tiny_tokenizer(vocab_size=150).save_pretrained(other)
    assert "different tokenizer" in _bad(tmp_path, slim_dir, teacher=str(other))
    assert "not available" in _bad(tmp_path, slim_dir, trainer="qlora")


def test_checkpoint_whose_shapes_differ_from_its_config_is_refused_in_one_line(tmp_path):
    _, slim_dir = _slim_checkpoint(tmp_path, "uniform")
    config = json.loads((slim_dir / "config.json").read_text())
    config["intermediate_size"] += 3
    (slim_dir / "config.json").write_text(json.dumps(config))
    assert "config.json describes" in _bad(tmp_path, slim_dir)


@pytest.mark.slow
def test_cli_recover_refuses_mismatched_shapes_in_one_line(tmp_path):
    _, slim_dir = _slim_checkpoint(tmp_path, "uniform")
    config = json.loads((slim_dir / "config.json").read_text())
    config["intermediate_size"] += 3
    (slim_dir / "config.json").write_text(json.dumps(config))
    before = tree_digest(slim_dir)
    result = run_cli("recover", str(slim_dir), "--out", str(tmp_path / "cli-out"), "--steps", "2", "--no-eval")
    assert "config.json describes" in one_line_error(result)
    assert tree_digest(slim_dir) == before and not (tmp_path / "cli-out").exists()


def test_masked_refuses_hidden_pruning(tmp_path):
    dense = tiny_model(tie=True)
    coupling = build_coupling(dense)
    plan = _plan(dense, coupling, SHAPES["uniform"])
    hidden = next(g for g in coupling.groups if g.kind.value == "hidden")
    plan.keep[hidden.name] = list(range(hidden.size - 4))
    with pytest.raises(UserError, match="hidden"):
        get_trainer("masked", coupling=coupling, plan=plan, spec=spec_for("llama"))


def test_loss_curve_png_when_the_report_has_one(tmp_path):
    from depgraph_llm.evaluation.loss_plot import plot_loss_curves, recovery_loss_curve

    folder = tmp_path / "recovered"
    folder.mkdir()
    (folder / "prune_report.json").write_text(json.dumps({"recovery": {"loss_curve": [[1, 3.0], [2, 2.5], [3, 2.0]]}}))
    curve = recovery_loss_curve(folder)
    assert curve == [[1, 3.0], [2, 2.5], [3, 2.0]] and recovery_loss_curve(tmp_path) is None
    assert plot_loss_curves({"recovered": curve}, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plot_loss_curves({"plain": None}, tmp_path / "none.png") and not (tmp_path / "none.png").exists()


def test_masked_lora_changes_only_what_the_slim_model_keeps():
    """--masked-lora: adapters on the dense-shaped model with their rows/columns masked. After merging, the
    dense-shaped model and its physical pruning compute the same logits (nothing trained leaked into a removed
    unit), and training did change them."""
    dense = tiny_model(tie=True)
    coupling = build_coupling(dense)
    plan = _plan(dense, coupling, SHAPES["gqa-dropped-kv-groups"])
    slim = copy.deepcopy(dense)
    apply_plan(slim, build_coupling(slim), plan, spec_for("llama"))
    masked_input = copy.deepcopy(dense)
    load_slim_into_dense(masked_input, slim, coupling, plan)
    masked = get_trainer("masked", coupling=coupling, plan=plan, spec=spec_for("llama"))
    settings = TrainSettings(steps=4, lr=5e-2, batch_size=2, warmup_steps=1, checkpoint_every=0, seed=3,
                             masked_lora=True, lora_rank=4, lora_alpha=8)
    trained, _ = train(masked_input, masked, _windows(), settings)
    merged = trained.merge_and_unload().eval()
    with torch.no_grad():
        dense_shaped = merged(PROMPT).logits
        apply_plan(merged, coupling, plan, spec_for("llama"))
        torch.testing.assert_close(merged(PROMPT).logits, dense_shaped, atol=1e-5, rtol=0)
        assert (dense_shaped - slim.eval()(PROMPT).logits).abs().max() > 1e-3


def test_recover_on_text_the_dense_model_generates(tmp_path):
    dense_dir, slim_dir = _slim_checkpoint(tmp_path, "uniform")
    result = run_recover(RecoverOptions(slim=slim_dir, out=tmp_path / "self", data="self", self_windows=3,
                                        lr=1e-2, **FAST))
    data = result.report["recovery"]["data"]
    assert data["files"] == ["self"] and data["windows"] == 3 and data["tokens"] == 3 * FAST["seq_len"]
    assert result.report["recovery"]["tokens"] == 3 * 2 * FAST["seq_len"]


def test_distilling_a_vocabulary_pruned_student_from_the_dense_model(tmp_path):
    """A student that only lost tokens (--vocab-keep) is the dense model restricted to its kept ids: the teacher,
    restricted the same way, gives it zero KL, full, top-k and masked (the dense-shaped student restricted too);
    a tokenizer that does not match is still refused."""
    from depgraph_llm.job.options import PruneOptions
    from depgraph_llm.job.prune import run_prune

    dense_dir = save_tiny_checkpoint(tmp_path / "dense", tie=True)
    model = tiny_model(tie=True)
    keep, hidden = 120, model.config.hidden_size
    share = (model.config.vocab_size - keep) * hidden / sum(p.numel() for p in model.parameters())
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the software is provided as is, without warranty of any kind. " * 40)
    slim_dir = tmp_path / "slim"
    run_prune(PruneOptions(model=str(dense_dir), out=slim_dir, ratio=share, vocab_keep=keep, mlp_ratio=0.0,
                           head_ratio=0.0, calibration=str(corpus), seq_len=32, calibration_samples=2,
                           round_to=1, show_progress=False, evaluate=False, reconstruct="none"))
    assert json.loads((slim_dir / "config.json").read_text())["vocab_size"] == keep
    full = run_recover(RecoverOptions(slim=slim_dir, out=tmp_path / "full", trainer="full", teacher="dense",
                                      **dict(FAST, steps=1)))
    assert full.report["recovery"]["loss_curve"][0][1] == pytest.approx(0.0, abs=1e-6)
    topk = run_recover(RecoverOptions(slim=slim_dir, out=tmp_path / "topk", trainer="lora", teacher="dense",
                                      teacher_topk=keep, teacher_cache=tmp_path / "cache", **dict(FAST, steps=1)))
    assert topk.report["recovery"]["loss_curve"][0][1] == pytest.approx(0.0, abs=1e-5)
    masked = run_recover(RecoverOptions(slim=slim_dir, out=tmp_path / "masked", trainer="masked", teacher="dense",
                                        **dict(FAST, steps=1)))  # the masked dense model, restricted, is the teacher
    assert masked.report["recovery"]["loss_curve"][0][1] == pytest.approx(0.0, abs=1e-6)
    assert json.loads((tmp_path / "masked" / "config.json").read_text())["vocab_size"] == keep
    other = tmp_path / "other-tokenizer"
    shutil.copytree(dense_dir, other)
    tiny_tokenizer(vocab_size=150).save_pretrained(other)
    assert "different tokenizer" in _bad(tmp_path, slim_dir, teacher=str(other))
