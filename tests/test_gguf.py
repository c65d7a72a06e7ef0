"""GGUF export as llama.cpp reads it: tokenizer metadata (pre-tokenizer name, chat template, BOS flag, SentencePiece
vocabularies), RoPE scaling, refusals. The oracles: the values llama.cpp's converter writes (measured with its
convert_hf_to_gguf.py, build b11393, and in a slow test the converter itself when a llama.cpp source tree is at
$LLAMA_CPP_DIR), the real llama.cpp's tokenizer (llama-cpp-cffi) against HF's, sentencepiece itself, and
transformers' own Llama 3 RoPE code."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from depgraph_llm.checkpoint.gguf_export import export_gguf
from depgraph_llm.errors import UserError
from tests.tiny import LICENSES, tiny_model

MIXED_TEXTS = [
    "Call 555-0123 or 1234567 before 3.14159 and 1,000,000 (v2.0.11)",
    "def f(x):\n    return x ** 2  # it's\n\n\tif a != b: print('don''t')",
    "I'm sure they're here, we've seen it; you'll see what I'd done.  She's   gone",
    "spaces    runs\t\ttabs\n\n\nnewlines   \n  trailing   ",
    "Terms:\n\n  0. Definitions.\n\n   1. Source   22 items  333",
    "Ünïcödé naïve café — “quotes” 🚀 日本語 مرحبا",
]
CONVERTER_NOTE = "needs a llama.cpp source tree (convert_hf_to_gguf.py) at $LLAMA_CPP_DIR"


def _fields(path: Path) -> dict:
    import gguf

    reader = gguf.GGUFReader(str(path))
    return {f.name: f.contents() for f in reader.fields.values() if not f.name.startswith("GGUF.")}


def _tiny_with_tokenizer(folder: Path, tokenizer_files: Path | None = None, tokenizer=None, vocab_size=None,
                         **config) -> Path:
    """A 1-layer Llama whose embedding fits the given tokenizer, saved with it."""
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    else:
        folder.mkdir(parents=True)
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            if (tokenizer_files / name).is_file():
                shutil.copy(tokenizer_files / name, folder / name)
    size = vocab_size or len(tokenizer)
    model = tiny_model(hidden_size=16, intermediate_size=24, num_attention_heads=2, num_key_value_heads=1,
                       head_dim=8, num_hidden_layers=1, vocab_size=size, tie_word_embeddings=True,
                       bos_token_id=1, eos_token_id=2, **config)
    model.config.architectures = ["LlamaForCausalLM"]
    model.save_pretrained(folder)
    return folder


def smollm2_tokenizer_files(target: Path) -> Path:
    """SmolLM2's tokenizer files with the published pre-tokenizer (digits isolated, then GPT-2 byte-level).

    The cached default model's tokenizer was rebuilt by transformers from the embedded GGUF, which drops the Digits
    splitter; the check-text hash (no space run before a digit) cannot tell the two apart."""
    from depgraph_llm.checkpoint.loading import default_model_dir

    target.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(default_model_dir() / name, target / name)
    data = json.loads((target / "tokenizer.json").read_text())
    data["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}
    (target / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))
    return target


@pytest.fixture(scope="module")
def smol_tokenizer_dir(tmp_path_factory) -> Path:
    return smollm2_tokenizer_files(tmp_path_factory.mktemp("smol-tok") / "smollm2")


@pytest.fixture(scope="module")
def smol_gguf(tmp_path_factory, smol_tokenizer_dir) -> tuple[Path, Path]:
    folder = _tiny_with_tokenizer(tmp_path_factory.mktemp("smol") / "tiny-smol", smol_tokenizer_dir, vocab_size=49152)
    return folder, export_gguf(folder, folder.parent / "tiny-smol.gguf", "f32")


@pytest.fixture(scope="module")
def rebuilt_gguf(tmp_path_factory) -> tuple[Path, Path]:
    from depgraph_llm.checkpoint.loading import default_model_dir

    folder = _tiny_with_tokenizer(tmp_path_factory.mktemp("rebuilt") / "tiny-rebuilt", default_model_dir(),
                                  vocab_size=49152)
    return folder, export_gguf(folder, folder.parent / "tiny-rebuilt.gguf", "f32")


@pytest.fixture(scope="module")
def spm_gguf(tmp_path_factory) -> tuple[Path, Path, object]:
    from tests.spm_tokenizer import spm_llama_tokenizer, train_sentencepiece

    model = train_sentencepiece()
    folder = _tiny_with_tokenizer(tmp_path_factory.mktemp("spm") / "tiny-spm", tokenizer=spm_llama_tokenizer(model))
    return folder, export_gguf(folder, folder.parent / "tiny-spm.gguf", "f32"), model


def test_byte_level_bpe_metadata_is_what_llama_cpp_converter_writes(smol_gguf, smol_tokenizer_dir):
    """SmolLM2's tokenizer: the values llama.cpp's converter (b11393) writes for this folder, measured."""
    folder, path = smol_gguf
    fields = _fields(path)
    data = json.loads((folder / "tokenizer.json").read_text())
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.pre"] == "smollm"  # was "default": llama.cpp then splits digits and code apart
    assert fields["tokenizer.ggml.add_bos_token"] is False
    assert fields["tokenizer.chat_template"] == (smol_tokenizer_dir / "chat_template.jinja").read_text()
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"],
            fields["tokenizer.ggml.unknown_token_id"], fields["tokenizer.ggml.padding_token_id"]) == (1, 2, 0, 2)
    assert fields["general.type"] == "model" and fields["general.quantization_version"] == 2
    assert len(fields["tokenizer.ggml.merges"]) == len(data["model"]["merges"]) == 48900
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert tokens[1] == "<|im_start|>" and types[1] == 3 and types[1000] == 1
    assert {tokens[i]: i for i in range(len(tokens))} == {**data["model"]["vocab"],
                                                          **{t["content"]: t["id"] for t in data["added_tokens"]}}


def test_pre_tokenizer_follows_how_digits_are_split(rebuilt_gguf):
    """Same check-text hash as SmolLM2, but no Digits splitter: llama.cpp's "gpt-2" regex is the one that splits
    like it (the converter writes "smollm" here, and llama.cpp then splits "\n\n  0." differently)."""
    assert _fields(rebuilt_gguf[1])["tokenizer.ggml.pre"] == "gpt-2"


def test_check_text_is_the_converters():
    """The hash table only means something for the converter's exact check text (sha256 taken from b11393)."""
    from hashlib import sha256

    from depgraph_llm.checkpoint.gguf_pretokenizer import CHECK_TEXT

    assert sha256(CHECK_TEXT.encode()).hexdigest() == "a36179c1e2b1cfcfbfad1dc779addad2ffc778201e4cf0d538bddeafa2c526da"


def test_sentencepiece_vocabulary_exports_as_llama_tokenizer(spm_gguf):
    """Byte-fallback BPE: llama.cpp's "llama" model, every <0x..> a byte token, scores that order the merges."""
    import sentencepiece as spm

    folder, path, model = spm_gguf
    processor = spm.SentencePieceProcessor(model_proto=model)
    fields = _fields(path)
    tokens, types, scores = (fields[f"tokenizer.ggml.{k}"] for k in ("tokens", "token_type", "scores"))
    assert fields["tokenizer.ggml.model"] == "llama" and fields["tokenizer.ggml.pre"] == "default"
    assert tokens == [processor.id_to_piece(i) for i in range(processor.get_piece_size())]
    assert [i for i, t in enumerate(types) if t == 6] == [i for i in range(len(tokens)) if processor.is_byte(i)]
    assert len([t for t in types if t == 6]) == 256 and types[:3] == [3, 3, 3]
    assert fields["tokenizer.ggml.add_bos_token"] is True and fields["tokenizer.ggml.add_space_prefix"] is True
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"]) == (1, 2)
    merged = [i for i in range(len(tokens)) if processor.get_score(i) < 0 and not processor.is_byte(i)
              and len(tokens[i]) > 1]
    # sentencepiece's BPE scores rank merged pieces; the exported scores must rank them the same way
    assert sorted(merged, key=lambda i: -scores[i]) == sorted(merged, key=lambda i: -processor.get_score(i))
    assert "tokenizer.ggml.merges" not in fields


def test_rope_scaling_fields(tmp_path, smol_tokenizer_dir):
    """linear / yarn keys as llama.cpp reads them; llama3 as rope_freqs = transformers' inv_freq ratio."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from tests.spm_tokenizer import spm_llama_tokenizer

    tokenizer = spm_llama_tokenizer()
    cases = {"linear": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
             "yarn": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64,
                      "beta_fast": 16.0, "rope_theta": 10000.0},
             "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 32, "rope_theta": 500000.0}}
    for kind, rope in cases.items():
        folder = _tiny_with_tokenizer(tmp_path / kind, tokenizer=tokenizer, rope_parameters=rope)
        fields = _fields(export_gguf(folder, tmp_path / f"{kind}.gguf", "f32"))
        assert fields["llama.rope.freq_base"] == rope["rope_theta"]
        if kind == "linear":
            assert (fields["llama.rope.scaling.type"], fields["llama.rope.scaling.factor"]) == ("linear", 4.0)
        if kind == "yarn":
            assert (fields["llama.rope.scaling.type"], fields["llama.rope.scaling.factor"]) == ("yarn", 2.0)
            assert fields["llama.rope.scaling.original_context_length"] == 64
            assert fields["llama.rope.scaling.yarn_beta_fast"] == 16.0
        if kind == "llama3":
            import gguf

            reader = gguf.GGUFReader(str(tmp_path / f"{kind}.gguf"))
            factors = torch.tensor(next(t for t in reader.tensors if t.name == "rope_freqs.weight").data)
            config = LlamaConfig.from_pretrained(folder)
            scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
            config.rope_parameters = {"rope_type": "default", "rope_theta": rope["rope_theta"]}
            plain = 1.0 / rope["rope_theta"] ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8)
            assert torch.allclose(factors.double(), plain / scaled.double(), rtol=1e-5)
            assert factors.min() == 1.0 and factors.max() == 8.0


def test_refuses_what_llama_cpp_cannot_read_in_one_line(tmp_path, smol_tokenizer_dir):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tests.spm_tokenizer import spm_llama_tokenizer

    def refusal(folder: Path) -> str:
        with pytest.raises(UserError) as info:
            export_gguf(folder, tmp_path / f"{folder.name}.gguf")
        assert not (tmp_path / f"{folder.name}.gguf").exists() and "\n" not in str(info.value)
        return str(info.value)

    unigram = Tokenizer(models.Unigram())
    unigram.train_from_iterator(["a b c abc"] * 10, trainers.UnigramTrainer(vocab_size=20, special_tokens=["<unk>"]))
    assert "'Unigram'" in refusal(_tiny_with_tokenizer(tmp_path / "unigram",
                                                       tokenizer=PreTrainedTokenizerFast(tokenizer_object=unigram)))
    byte_level = Tokenizer(models.BPE())
    byte_level.pre_tokenizer = pre_tokenizers.ByteLevel()
    byte_level.train_from_iterator(["some text 123"] * 10, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    message = refusal(_tiny_with_tokenizer(tmp_path / "unknown-bpe",
                                           tokenizer=PreTrainedTokenizerFast(tokenizer_object=byte_level)))
    assert "pre-tokenizer" in message and "not a known tokenizer" in message
    dynamic = _tiny_with_tokenizer(tmp_path / "dynamic", tokenizer=spm_llama_tokenizer(),
                                   rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4})
    assert "RoPE scaling" in refusal(dynamic) and "'dynamic'" in refusal(dynamic)
    biased = _tiny_with_tokenizer(tmp_path / "biased", tokenizer=spm_llama_tokenizer(), attention_bias=True)
    assert "_proj.bias goes" in refusal(biased)


@pytest.mark.slow
def test_tokenizer_metadata_equals_llama_cpp_converter(smol_gguf, rebuilt_gguf, spm_gguf, tmp_path):
    """Run llama.cpp's own convert_hf_to_gguf.py --vocab-only on the same folders and compare every tokenizer key.
    Known, deliberate differences: we also write add_eos/add_sep_token, add_space_prefix (llama.cpp's defaults made
    explicit), and for a SentencePiece tokenizer without tokenizer.model the converter writes score -1000 for every
    token, where ours are merge ranks (so llama.cpp merges in HF's order: see the llama.cpp tokenization test); for
    SmolLM2's tokenizer rebuilt without its Digits splitter the converter writes "smollm", we write "gpt-2"."""
    source = Path(os.environ.get("LLAMA_CPP_DIR", Path.home() / ".cache" / "depgraph-llm" / "llama.cpp"))
    if not (source / "convert_hf_to_gguf.py").is_file():
        pytest.skip(CONVERTER_NOTE)
    extras = {"tokenizer.ggml.add_eos_token", "tokenizer.ggml.add_sep_token", "tokenizer.ggml.add_space_prefix"}
    for folder, ours, ignore in ((smol_gguf[0], smol_gguf[1], set()),
                                 (rebuilt_gguf[0], rebuilt_gguf[1], {"tokenizer.ggml.pre"}),
                                 (spm_gguf[0], spm_gguf[1], {"tokenizer.ggml.scores"})):
        reference = tmp_path / f"{folder.name}-converter.gguf"
        run = subprocess.run([sys.executable, str(source / "convert_hf_to_gguf.py"), str(folder), "--vocab-only",
                              "--outfile", str(reference)], capture_output=True, text=True, timeout=600,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert run.returncode == 0, run.stderr[-3000:]
        theirs, mine = _fields(reference), _fields(ours)
        keys = {k for k in theirs if k.startswith("tokenizer.")} | {"general.type", "general.quantization_version"}
        for key in sorted(keys - ignore):
            assert mine.get(key) == theirs[key], (folder.name, key)
        assert {k for k in mine if k.startswith("tokenizer.")} - set(theirs) <= extras


@pytest.mark.slow
def test_llama_cpp_tokenizes_like_hf(smol_gguf, rebuilt_gguf, spm_gguf):
    """The real llama.cpp (llama-cpp-cffi) on the exported files: same ids as the HF tokenizer on digits, code,
    contractions, whitespace runs and non-Latin text, for byte-level BPE (smollm) and SentencePiece (llama)."""
    from transformers import AutoTokenizer

    from tests.llama_cpp_helpers import llama_cpp, llama_cpp_runtime

    if llama_cpp_runtime()[1]:
        pytest.skip(llama_cpp_runtime()[1])
    import sentencepiece as spm

    texts = MIXED_TEXTS + [(LICENSES / "GPL-3").read_text()]  # GPL-3 opens with a run of spaces
    for folder, path in (smol_gguf, rebuilt_gguf, spm_gguf[:2]):
        tokenizer = AutoTokenizer.from_pretrained(folder)
        result = llama_cpp(path, texts)
        expected = [tokenizer.encode(text, add_special_tokens=False) for text in texts]
        if folder == spm_gguf[0]:
            # HF's Metaspace adds no "▁" prefix to a text that already starts with a space; SentencePiece (and
            # llama.cpp) always do: there the reference is sentencepiece itself
            assert result["ids"] == spm.SentencePieceProcessor(model_proto=spm_gguf[2]).encode(texts)
            expected, result["ids"] = zip(*[(e, r) for e, r, t in zip(expected, result["ids"], texts)
                                             if not t[:1].isspace()])
            assert len(expected) == len(MIXED_TEXTS)
        assert list(result["ids"]) == list(expected), folder.name
        assert result["add_bos"] == (tokenizer.encode("a")[0] == tokenizer.bos_token_id)


@pytest.mark.slow
def test_llama_cpp_logits_match_hf_with_llama3_rope(tmp_path):
    """A tiny Llama with Llama 3 RoPE scaling, positions past the original context: llama.cpp's last-position
    logits equal transformers' (f32), so the rope_freqs tensor and the q/k row order are read as intended."""
    from tests.llama_cpp_helpers import llama_cpp, llama_cpp_runtime
    from tests.spm_tokenizer import spm_llama_tokenizer

    if llama_cpp_runtime()[1]:
        pytest.skip(llama_cpp_runtime()[1])
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16, "rope_theta": 10000.0}
    folder = _tiny_with_tokenizer(tmp_path / "llama3", tokenizer=spm_llama_tokenizer(), rope_parameters=rope,
                                  max_position_embeddings=256)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():  # sharp attention, large logits: positions (and so RoPE) change the output visibly
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(30)
            layer.self_attn.k_proj.weight.mul_(30)
        model.model.embed_tokens.weight.mul_(20)
    model.save_pretrained(folder)
    path = export_gguf(folder, tmp_path / "llama3.gguf", "f32")
    ids = [1] + [(7 * i + 3) % 600 + 3 for i in range(95)]
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([ids])).logits[0, -1]
        rope_off = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                        rope_parameters={"rope_type": "default",
                                                                         "rope_theta": 10000.0})
        unscaled = rope_off(input_ids=torch.tensor([ids])).logits[0, -1]
    got = torch.tensor(llama_cpp(path, logits=[ids])["logits"][0])
    gap, effect = (got - expected).abs().max(), (unscaled - expected).abs().max()
    assert gap < 1e-3 and gap < effect / 100, (gap, effect)
