"""Which llama.cpp pre-tokenizer (`tokenizer.ggml.pre`) a byte-level BPE tokenizer needs.

llama.cpp re-implements each model family's pre-tokenizer (the regex that splits text before BPE) and picks it by
name. Its HF converter names it by tokenizing a fixed check text and hashing the token ids; the same text and the
hashes of the tokenizers below are reproduced here as data, so an export gets the name llama.cpp's converter would
write. A pruned vocabulary renumbers the ids (the hash no longer matches), so vocabulary pruning records the name
of the source tokenizer in tokenizer_config.json (`RECORDED_KEY`), and that record is used when the hash is unknown.
One correction the hash cannot see (`ISOLATES_DIGITS`): the name is checked against how the tokenizer splits digits.
"""
from __future__ import annotations

from hashlib import sha256

# the check text of llama.cpp's convert_hf_to_gguf.py (whitespace runs, emoji, digit runs, scripts, contractions)
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 "
    "3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= "
    "нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure "
    "I'll make it, 'D you like some tea? We'Ve a'lL"
)
CHECK_TEXT_SHA256 = "a36179c1e2b1cfcfbfad1dc779addad2ffc778201e4cf0d538bddeafa2c526da"  # of CHECK_TEXT in UTF-8

# sha256 of str(tokenizer.encode(CHECK_TEXT)) -> llama.cpp pre-tokenizer name, for tokenizers of Llama/Mistral-
# architecture checkpoints (from llama.cpp's converter, build b11393)
PRE_TOKENIZER_BY_HASH = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Meta-Llama-3-8B
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",  # Smaug-Llama-3-70B-Instruct
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM / SmolLM2
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",  # deepseek-llm-7b-base
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",  # deepseek-coder-6.7b-base
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",  # R1-Distill-Qwen-1.5B
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral-Nemo-Base-2407
    "9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e": "falcon3",  # Falcon3-7B-Base
    "d4c8f286ea6b520b3d495c4455483cfa2302c0cfcd4be05d781b6a8a0a7cdaf1": "megrez",  # Megrez-3B-Instruct
    "d5f1dd6f980fec569fb218a81a7658ac45fc56b38c5a0adeb1c232fbe04ef5ec": "seed-coder",  # Seed-Coder-8B-Base
    "f6791d196f87ce6b56a7d234be618e0d58f8cda3549416635b2bebcd22cd95c4": "midm-2.0",  # Midm-2.0-Base-Instruct
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # gpt2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5-7B
}
RECORDED_KEY = "gguf_pre_tokenizer"

# llama.cpp names whose regex isolates every digit, and the name of the same regex without that. The check text
# never has a space run before a digit, so a tokenizer without the Digits splitter (SmolLM2's as transformers
# rebuilds it from a GGUF) gets the same hash; llama.cpp would then split "  0." unlike the HF tokenizer
ISOLATES_DIGITS = {"smollm": "gpt-2"}


def check_hash(tokenizer) -> str:
    """The converter's fingerprint of a tokenizer: sha256 of its ids on the check text."""
    return sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()


def isolates_digits(tokenizer) -> bool:
    """Whether the tokenizer's pre-tokenizer splits digits from the spaces before them."""
    pre = tokenizer.backend_tokenizer.pre_tokenizer
    return pre is not None and any(piece == "1" for piece, _ in pre.pre_tokenize_str(" 1"))


def matching_pre_tokenizer(name: str, tokenizer) -> str:
    """`name`, or its digit-agnostic sibling when the tokenizer does not isolate digits as `name` does."""
    if name in ISOLATES_DIGITS and not isolates_digits(tokenizer):
        return ISOLATES_DIGITS[name]
    return name


def known_pre_tokenizer(tokenizer) -> str | None:
    """llama.cpp's pre-tokenizer name for `tokenizer` by the check-text hash, or None when it is not in the table."""
    return PRE_TOKENIZER_BY_HASH.get(check_hash(tokenizer))
