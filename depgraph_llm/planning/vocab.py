"""Vocabulary pruning (`--vocab-keep K`): keep the tokens the tokenizer actually produces on the calibration
corpus (most frequent first), plus what tokenizing any text still needs, and shrink the tokenizer and the
embedding / LM-head rows together ("Pruning LLMs to any config": vocabulary as a prunable dimension).

Kept always: special tokens, the single-character base alphabet and, for byte-fallback (SentencePiece-style)
BPE, the 256 byte tokens `<0x00>`..`<0xFF>` that spell any character outside the vocabulary (so every string
still tokenizes), and, for BPE, both parts of every kept token's merge (a token that cannot be built can never
be produced). Free slots after the corpus tokens go to the lowest ids, which BPE assigns to the earliest (most frequent) merges.
Only fast BPE tokenizers (tokenizer.json with a BPE model) are supported.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from depgraph_llm.checkpoint.gguf_pretokenizer import RECORDED_KEY, known_pre_tokenizer
from depgraph_llm.errors import UserError

BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _bpe_data(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        raise UserError("--vocab-keep needs a fast tokenizer (tokenizer.json); this model has a slow one")
    data = json.loads(backend.to_str())
    if data.get("model", {}).get("type") != "BPE":
        raise UserError(f"--vocab-keep supports BPE tokenizers; this one is {data.get('model', {}).get('type')!r}")
    return data


def _merges(data: dict) -> list[tuple[str, str]]:
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in data["model"].get("merges", [])]


def kept_token_ids(tokenizer, counts: Counter, keep: int, embedding_rows: int) -> list[int]:
    """Sorted ids of the `keep` tokens to keep, given token counts on the calibration corpus (see the module
    docstring for the rule)."""
    data = _bpe_data(tokenizer)
    vocab: dict[str, int] = dict(data["model"]["vocab"])
    for added in data.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    by_id = {i: t for t, i in vocab.items()}
    parts = {a + b: (a, b) for a, b in _merges(data)}
    required = {t["id"] for t in data.get("added_tokens", [])}
    required |= {i for t, i in vocab.items() if len(t) == 1}
    if data["model"].get("byte_fallback"):
        required |= {i for t, i in vocab.items() if BYTE_TOKEN.fullmatch(t)}
    kept: set[int] = set()

    def add(token_id: int, limit: int | None = None) -> None:
        """Add the token and everything it is built from, unless that would exceed `limit`."""
        new, stack = set(), [token_id]
        while stack:
            current = stack.pop()
            if current in kept or current in new or current not in by_id or current >= embedding_rows:
                continue
            new.add(current)
            pieces = parts.get(by_id[current])
            if pieces:
                stack.extend(vocab[p] for p in pieces if p in vocab)
        if limit is None or len(kept) + len(new) <= limit:
            kept.update(new)

    for token_id in sorted(required):
        add(token_id)
    if len(kept) > keep:
        raise UserError(f"--vocab-keep {keep} is below the {len(kept)} tokens every text needs (special tokens, "
                        f"the base alphabet and byte-fallback tokens); pass at least {len(kept)}")
    for token_id, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        if len(kept) >= keep:
            break
        add(token_id, keep)
    for token_id in sorted(by_id):
        if len(kept) >= keep:
            break
        add(token_id, keep)
    return sorted(kept)


def prune_tokenizer_files(folder: Path, kept: list[int]) -> dict[int, int]:
    """Rewrite tokenizer.json / tokenizer_config.json in `folder` to the kept ids; returns old id -> new id.
    A SentencePiece tokenizer.model (the full vocabulary) is removed, and the source tokenizer's llama.cpp
    pre-tokenizer name is recorded (the renumbered ids no longer match llama.cpp's fingerprint of it)."""
    mapping = {old: new for new, old in enumerate(kept)}
    pre_tokenizer = _llama_cpp_pre_tokenizer(folder)
    path = folder / "tokenizer.json"
    data = json.loads(path.read_text())
    vocab = data["model"]["vocab"]
    data["model"]["vocab"] = {t: mapping[i] for t, i in sorted(vocab.items(), key=lambda kv: kv[1]) if i in mapping}
    kept_strings = set(data["model"]["vocab"])
    merges = _merges(data)
    data["model"]["merges"] = [[a, b] for a, b in merges if a in kept_strings and b in kept_strings
                               and a + b in kept_strings]
    data["added_tokens"] = [{**t, "id": mapping[t["id"]]} for t in data.get("added_tokens", []) if t["id"] in mapping]
    _remap_post_processor(data.get("post_processor"), mapping)
    path.write_text(json.dumps(data, ensure_ascii=False))
    config_path = folder / "tokenizer_config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        if pre_tokenizer:
            config[RECORDED_KEY] = pre_tokenizer
        decoder = config.get("added_tokens_decoder")
        if isinstance(decoder, dict):
            config["added_tokens_decoder"] = {str(mapping[int(k)]): v for k, v in decoder.items() if int(k) in mapping}
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False))
    (folder / "tokenizer.model").unlink(missing_ok=True)
    return mapping


def restricted_tokenizer(tokenizer, kept: list[int]):
    """A copy of the tokenizer limited to the kept ids (renumbered 0..K-1 in the order of `kept`)."""
    import tempfile

    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        prune_tokenizer_files(Path(folder), kept)
        return AutoTokenizer.from_pretrained(folder)


def _llama_cpp_pre_tokenizer(folder: Path) -> str | None:
    """The llama.cpp pre-tokenizer name of the (unpruned) tokenizer in `folder`, if known or already recorded."""
    from transformers import AutoTokenizer

    config_path = folder / "tokenizer_config.json"
    recorded = json.loads(config_path.read_text()).get(RECORDED_KEY) if config_path.is_file() else None
    return recorded or known_pre_tokenizer(AutoTokenizer.from_pretrained(str(folder)))


def _remap_post_processor(processor: dict | None, mapping: dict[int, int]) -> None:
    if not isinstance(processor, dict):
        return
    for special in (processor.get("special_tokens") or {}).values():
        if isinstance(special, dict) and "ids" in special:
            special["ids"] = [mapping[i] for i in special["ids"] if i in mapping]
    for key in ("sep", "cls"):
        value = processor.get(key)
        if isinstance(value, list) and len(value) == 2 and value[1] in mapping:
            value[1] = mapping[value[1]]
    for child in processor.get("processors", []) or []:
        _remap_post_processor(child, mapping)


def remap_config_ids(config, mapping: dict[int, int]) -> None:
    """bos/eos/pad ids of a (generation) config to the new ids (None when the token is gone)."""
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            setattr(config, key, mapping.get(value))
        elif isinstance(value, list):
            setattr(config, key, [mapping[v] for v in value if v in mapping] or None)
