"""The tokenizer half of a GGUF export: read a checkpoint's HF tokenizer into llama.cpp's vocabulary metadata.

Two tokenizer models, chosen from tokenizer.json (a BPE model either way):
- byte-level BPE (a ByteLevel pre-tokenizer: GPT-2, Llama 3, SmolLM) -> llama.cpp "gpt2", with merges and the
  pre-tokenizer name of `gguf_pretokenizer`;
- SentencePiece-style BPE (byte fallback `<0x..>` tokens, or a Metaspace pre-tokenizer: Llama 2, Mistral, TinyLlama)
  -> llama.cpp "llama", with token scores. llama.cpp merges the adjacent pair whose merged token has the highest
  score; the score written is minus the rank of the first merge that builds the token, so it merges in the HF
  tokenizer's order (llama.cpp's converter writes -1000 for every token when there is no tokenizer.model).
Token types, special ids and the chat template are read as llama.cpp's converter reads them; whether BOS / EOS are
added (and a separator between a pair) is measured by encoding a probe with the HF tokenizer itself.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from depgraph_llm.checkpoint.gguf_pretokenizer import (RECORDED_KEY, check_hash, known_pre_tokenizer,
                                                       matching_pre_tokenizer)
from depgraph_llm.errors import UserError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # llama.cpp token types
SPECIAL_KINDS = ("bos", "eos", "unk", "sep", "pad", "mask")  # the kinds GGUF has a key for
BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
SPIECE_SPACE = "\u2581"


@dataclass
class GgufVocab:
    """Everything llama.cpp reads about a tokenizer, as the values of its `tokenizer.*` keys."""

    model: str
    pre: str
    tokens: list[str]
    types: list[int]
    scores: list[float] | None
    merges: list[str]
    special_ids: dict[str, int]
    add_bos: bool
    add_eos: bool
    add_sep: bool
    add_space_prefix: bool | None
    chat_template: str | list | None


def _components(node: dict | None, key: str) -> list[dict]:
    """A pre-tokenizer / normalizer and, for a Sequence, its members."""
    if not isinstance(node, dict):
        return []
    return [node] + [c for child in node.get(key, []) or [] for c in _components(child, key)]


def tokenizer_family(data: dict, path: Path) -> str:
    """llama.cpp tokenizer model for a tokenizer.json: "gpt2" (byte-level BPE) or "llama" (SentencePiece BPE)."""
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise UserError(f"GGUF export supports BPE tokenizers (byte-level or SentencePiece); {path} is "
                        f"{model.get('type')!r}")
    kinds = {c.get("type") for c in _components(data.get("pre_tokenizer"), "pretokenizers")}
    if model.get("byte_fallback") or "Metaspace" in kinds:
        return "llama"
    if "ByteLevel" in kinds:
        return "gpt2"
    raise UserError(f"GGUF export cannot map the pre-tokenizer of {path} ({sorted(k for k in kinds if k)}) to a "
                    "llama.cpp tokenizer; only byte-level and SentencePiece-style BPE tokenizers are supported")


def _looks_special(token: str) -> bool:
    """Added tokens that are control tokens even when not flagged special (llama.cpp's converter rule)."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<｜") and token.endswith("｜>"))
            or (token.startswith("<unused") and token.endswith(">")))


def _token_table(tokenizer, family: str, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings and types for ids 0..vocab_size-1 ("[PADi]" unused rows where the tokenizer has no token)."""
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if by_id and max(by_id) >= vocab_size:
        raise UserError(f"the tokenizer has token id {max(by_id)} but the model has only {vocab_size} embedding rows; "
                        "the checkpoint's tokenizer does not belong to its weights")
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    special_ids = set(tokenizer.all_special_ids)
    tokens, types = [], []
    for index in range(vocab_size):
        token = by_id.get(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            types.append(UNUSED)
            continue
        if family == "llama" and BYTE_TOKEN.fullmatch(token):
            kind = BYTE
        elif token in added:
            if not decoder[index].normalized:  # llama.cpp expects added tokens in normalized form
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            if decoder[index].special or _looks_special(token):
                kind = CONTROL
            else:
                kind = USER_DEFINED
                token = token.replace(SPIECE_SPACE, " ")
        else:
            kind = CONTROL if index in special_ids else NORMAL
        tokens.append(token)
        types.append(kind)
    return tokens, types


def _merge_pairs(data: dict) -> list[tuple[str, str]]:
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in data["model"].get("merges", [])]


def _merge_scores(data: dict, tokens: list[str]) -> list[float]:
    """Minus the rank of the first merge that builds each token (0 for tokens no merge builds)."""
    rank: dict[str, int] = {}
    for index, (left, right) in enumerate(_merge_pairs(data)):
        rank.setdefault(left + right, index)
    return [-float(rank[t] + 1) if t in rank else 0.0 for t in tokens]


def _gguf_merges(data: dict) -> list[str]:
    """Merges in llama.cpp's "left right" form (a space inside a part is written as U+0120)."""
    return [" ".join(part.replace(" ", "\u0120") for part in pair) for pair in _merge_pairs(data)]


def _special_ids(folder: Path, data: dict, vocab_size: int) -> dict[str, int]:
    """bos/eos/... ids: the tokenizer_config token's added-token id, else config.json's *_token_id."""
    tok_config = _read_json(folder / "tokenizer_config.json")
    config = _read_json(folder / "config.json")
    added = data.get("added_tokens", [])
    found: dict[str, int] = {}
    for kind in SPECIAL_KINDS:
        entry = tok_config.get(f"{kind}_token")
        content = entry.get("content") if isinstance(entry, dict) else entry
        token_id = next((t["id"] for t in added if isinstance(content, str) and t.get("content") == content), None)
        if token_id is None:
            token_id = config.get(f"{kind}_token_id")
        if isinstance(token_id, int) and 0 <= token_id < vocab_size:
            found[kind] = token_id
    return found


def _adds(tokenizer, token_id: int | None) -> tuple[bool, bool]:
    """Whether encoding prepends / appends `token_id` (measured on a probe text)."""
    if token_id is None:
        return False, False
    with_special = tokenizer.encode("a b")
    plain = tokenizer.encode("a b", add_special_tokens=False)
    extra = len(with_special) > len(plain)
    return (extra and with_special[0] == token_id and plain[:1] != [token_id],
            extra and with_special[-1] == token_id and plain[-1:] != [token_id])


def _adds_separator(tokenizer, token_id: int | None) -> bool:
    """Whether encoding a pair of texts puts `token_id` between them."""
    if token_id is None:
        return False
    try:
        pair = tokenizer.encode("a", "b")
    except (TypeError, ValueError):  # a tokenizer without pair support
        return False
    return token_id in pair[1:-1] and token_id not in tokenizer.encode("a b", add_special_tokens=False)


def _space_prefix(data: dict, family: str, tok_config: dict) -> bool | None:
    """Whether a space is prepended to the text: the Metaspace scheme (SentencePiece), else the config's flag."""
    if family == "llama":
        for component in _components(data.get("pre_tokenizer"), "pretokenizers"):
            if component.get("type") == "Metaspace":
                return component.get("prepend_scheme", "always") != "never"
        return None
    flag = tok_config.get("add_prefix_space")
    return flag if isinstance(flag, bool) else None


def _chat_template(folder: Path, tok_config: dict) -> str | list | None:
    """The chat template: tokenizer_config's, else chat_template.jinja (plus named extra templates), else .json."""
    if isinstance(tok_config.get("chat_template"), (str, list)):
        return tok_config["chat_template"]
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        extra = sorted((folder / "additional_chat_templates").glob("*.jinja"))
        if not extra:
            return jinja.read_text(encoding="utf-8")
        return [{"name": "default", "template": jinja.read_text(encoding="utf-8")}] + [
            {"name": p.stem, "template": p.read_text(encoding="utf-8")} for p in extra]
    template = _read_json(folder / "chat_template.json").get("chat_template")
    return template if isinstance(template, (str, list)) else None


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _pre_tokenizer(tokenizer, family: str, tok_config: dict, path: Path) -> str:
    if family == "llama":
        return "default"
    name = known_pre_tokenizer(tokenizer) or tok_config.get(RECORDED_KEY)
    if not isinstance(name, str):
        raise UserError(f"cannot tell which llama.cpp pre-tokenizer {path} needs (check-text hash "
                        f"{check_hash(tokenizer)[:12]} is not a known tokenizer); llama.cpp would split text "
                        "differently from it, so the export is refused")
    return matching_pre_tokenizer(name, tokenizer)


def read_vocab(folder: Path, vocab_size: int) -> GgufVocab:
    """The GGUF tokenizer metadata of the checkpoint in `folder` whose embedding has `vocab_size` rows."""
    from transformers import AutoTokenizer

    path = folder / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"{folder} has no tokenizer.json; GGUF export needs a fast (tokenizer.json) tokenizer")
    data = json.loads(path.read_text(encoding="utf-8"))
    family = tokenizer_family(data, path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load the tokenizer in {folder}: {str(exc).splitlines()[0]}") from exc
    tok_config = _read_json(folder / "tokenizer_config.json")
    tokens, types = _token_table(tokenizer, family, vocab_size)
    special = _special_ids(folder, data, vocab_size)
    add_bos, _ = _adds(tokenizer, special.get("bos"))
    _, add_eos = _adds(tokenizer, special.get("eos"))
    return GgufVocab(model=family, pre=_pre_tokenizer(tokenizer, family, tok_config, path), tokens=tokens,
                     types=types, scores=_merge_scores(data, tokens) if family == "llama" else None,
                     merges=_gguf_merges(data) if family == "gpt2" else [], special_ids=special, add_bos=add_bos,
                     add_eos=add_eos, add_sep=_adds_separator(tokenizer, special.get("sep", special.get("eos"))),
                     add_space_prefix=_space_prefix(data, family, tok_config),
                     chat_template=_chat_template(folder, tok_config))


def write_vocab(writer, vocab: GgufVocab) -> None:
    """Add the `tokenizer.*` keys to a gguf.GGUFWriter."""
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    for kind, token_id in vocab.special_ids.items():
        getattr(writer, f"add_{kind}_token_id")(token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    writer.add_add_sep_token(vocab.add_sep)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.chat_template is not None:
        writer.add_chat_template(vocab.chat_template)
