"""Tiny random-weight models with odd sizes (structure tests only) and a small tokenizer trained offline."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

LICENSES = Path("/usr/share/common-licenses")
TINY_VOCAB = 160


def tiny_config(model_type: str = "llama", tie: bool = False, **overrides):
    """hidden 48, intermediate 37, 4 query heads / 2 KV heads (head_dim 12), 3 layers."""
    fields = dict(hidden_size=48, intermediate_size=37, num_attention_heads=4, num_key_value_heads=2,
                  num_hidden_layers=3, vocab_size=TINY_VOCAB, tie_word_embeddings=tie, head_dim=12,
                  max_position_embeddings=256)
    fields.update(overrides)
    return AutoConfig.for_model(model_type, **fields)


def tiny_model(model_type: str = "llama", tie: bool = False, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, tie, **overrides))
    with torch.no_grad():  # HF initialises norms to 1: perturb them so a wrong axis shows up in the logits
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                param.add_(0.1 * torch.randn_like(param))
    return model.eval()


def tiny_tokenizer(vocab_size: int = TINY_VOCAB) -> PreTrainedTokenizerFast:
    """A byte-pair tokenizer trained in memory on licence text (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  limit_alphabet=100)
    texts = [(LICENSES / name).read_text() for name in ("GPL-2", "Apache-2.0")]
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def save_tiny_checkpoint(folder: Path, model_type: str = "llama", tie: bool = False, seed: int = 0,
                         **overrides) -> Path:
    """A complete HF folder (safetensors, config, tokenizer) for CLI tests."""
    model = tiny_model(model_type, tie, seed, **overrides)
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def random_search_scores(layers, seed: int) -> dict[str, torch.Tensor]:
    """Uniform random scores for every searched group (MLP channels, KV groups, nested query heads) of `layers`."""
    torch.manual_seed(seed)
    scores = {}
    for lg in layers:
        scores[lg.mlp.name] = torch.rand(lg.mlp.size)
        scores[lg.heads.name] = torch.rand(lg.heads.size)
        scores[lg.heads.nested.name] = torch.rand(lg.heads.size, lg.heads.nested.size)
    return scores
