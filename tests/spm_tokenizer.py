"""A tiny SentencePiece BPE tokenizer with byte fallback (the Llama 2 / Mistral kind), trained in memory on licence
text with the `sentencepiece` trainer and wrapped as a HF LlamaTokenizer (no download, no protobuf)."""
from __future__ import annotations

import io

from tests.tiny import LICENSES


def train_sentencepiece(vocab_size: int = 700) -> bytes:
    """A serialized SentencePiece BPE model: byte fallback, single digits, ids 0/1/2 = <unk>/<s>/</s>."""
    import sentencepiece as spm

    text = "\n".join((LICENSES / name).read_text() for name in ("GPL-2", "Apache-2.0"))
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text.splitlines()), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, split_digits=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    return model.getvalue()


def spm_llama_tokenizer(model: bytes | None = None):
    """The model as a HF LlamaTokenizer: vocabulary in piece order, merges ordered by the merged piece's score."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    processor = spm.SentencePieceProcessor(model_proto=model or train_sentencepiece())
    vocab = {processor.id_to_piece(i): i for i in range(processor.get_piece_size())}
    merges = []
    for piece, index in sorted(vocab.items(), key=lambda item: item[1]):
        if processor.is_byte(index) or processor.is_control(index) or processor.is_unknown(index):
            continue
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        merges += sorted(splits, key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
    return LlamaTokenizer(vocab=vocab, merges=merges, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                          add_bos_token=True)
