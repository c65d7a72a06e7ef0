"""Vocabulary pruning keeps what every text needs: for a SentencePiece (byte-fallback) tokenizer the <0x..> byte
tokens, so a character the kept vocabulary lacks still round-trips; and the pruned tokenizer still exports to GGUF
with its llama.cpp pre-tokenizer."""
from __future__ import annotations

import json
from collections import Counter

from transformers import AutoTokenizer

from depgraph_llm.planning.vocab import kept_token_ids, prune_tokenizer_files
from tests.spm_tokenizer import spm_llama_tokenizer
from tests.tiny import LICENSES

OUT_OF_VOCABULARY = "Straße naïve — 日本語 🚀 ok"


def _prune(tokenizer, folder, keep: int, corpus: str):
    counts = Counter(tokenizer(corpus, add_special_tokens=False).input_ids)
    kept = kept_token_ids(tokenizer, counts, keep, len(tokenizer))
    tokenizer.save_pretrained(folder)
    prune_tokenizer_files(folder, kept)
    return kept, AutoTokenizer.from_pretrained(folder)


def test_sentencepiece_byte_tokens_survive_and_unknown_characters_round_trip(tmp_path):
    tokenizer = spm_llama_tokenizer()
    byte_ids = {i for t, i in tokenizer.get_vocab().items() if t.startswith("<0x") and t.endswith(">")}
    assert len(byte_ids) == 256
    corpus = (LICENSES / "BSD").read_text()
    kept, pruned = _prune(tokenizer, tmp_path / "pruned", 400, corpus)
    assert byte_ids <= set(kept) and len(kept) == 400
    assert pruned.decode(pruned.encode(OUT_OF_VOCABULARY), skip_special_tokens=True) == OUT_OF_VOCABULARY
    assert pruned.unk_token_id not in pruned.encode(OUT_OF_VOCABULARY)
    assert "<0xE6>" in pruned.tokenize("日")  # the character is spelled in bytes, not lost


def test_pruned_byte_level_tokenizer_keeps_its_llama_cpp_pre_tokenizer(tmp_path):
    """SmolLM2 pruned to 2000 tokens: the check-text hash changes with the ids, the recorded name does not."""
    import gguf

    from depgraph_llm.checkpoint.gguf_export import export_gguf
    from depgraph_llm.checkpoint.gguf_pretokenizer import known_pre_tokenizer
    from tests.test_gguf import _tiny_with_tokenizer, smollm2_tokenizer_files

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_files(tmp_path / "smollm2"))
    kept, pruned = _prune(tokenizer, tmp_path / "tok", 2000, (LICENSES / "GPL-2").read_text())
    assert known_pre_tokenizer(pruned) is None  # renumbered ids: llama.cpp's fingerprint no longer matches
    folder = _tiny_with_tokenizer(tmp_path / "model", tokenizer=pruned, vocab_size=len(kept))
    path = export_gguf(folder, tmp_path / "pruned.gguf", "f32")
    fields = {f.name: f.contents() for f in gguf.GGUFReader(str(path)).fields.values()}
    assert fields["tokenizer.ggml.pre"] == "smollm" and len(fields["tokenizer.ggml.tokens"]) == 2000
    assert json.loads((folder / "tokenizer_config.json").read_text())["gguf_pre_tokenizer"] == "smollm"
