"""A whole model spread over several GPUs with accelerate's `device_map` (`--device-map`). The in-memory path
slices weights in place and refits each layer where it sits, so every weight must be resident: maps that offload
modules to the CPU or disk (their weights wait on `meta` until a forward pass) are refused, and streaming is the
answer for a model that does not fit on the GPUs."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from depgraph_llm.errors import UserError

log = logging.getLogger(__name__)

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
OFFLOAD = ("cpu", "disk")
DeviceMap = str | dict[str, "str | int"]


def parse_device_map(spec: str) -> DeviceMap:
    """A strategy name, or a JSON object {module name: device} given inline or as a file."""
    if spec in STRATEGIES:
        return spec
    looks_inline = spec.lstrip().startswith("{")
    if not looks_inline and not Path(spec).is_file():
        raise UserError(f"--device-map {spec!r} is neither a strategy ({', '.join(STRATEGIES)}) nor a JSON file; "
                        "pass e.g. --device-map auto or --device-map map.json")
    try:
        mapping = json.loads(spec if looks_inline else Path(spec).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"--device-map {spec[:60]!r}: not valid JSON ({exc}); write an object such as "
                        '{"model.embed_tokens": 0, "model.layers.0": 0, ...}') from None
    if not isinstance(mapping, dict) or not mapping:
        raise UserError(f"--device-map {spec[:60]!r}: expected a non-empty JSON object {{module name: device}}")
    for name, device in mapping.items():
        if not _is_device(device):
            raise UserError(f"--device-map: {name!r} -> {device!r} is not a device; use a GPU index (0), "
                            "'cuda:N', 'cpu' or 'disk'")
    return mapping


def _is_device(value) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return value >= 0
    if not isinstance(value, str):
        return False
    if value in OFFLOAD:
        return True
    try:
        return torch.device(value).type not in ("meta",)
    except RuntimeError:
        return False


def names_gpu(device_map: DeviceMap) -> bool:
    """Does an explicit map place anything on a GPU?"""
    if isinstance(device_map, str):
        return False
    return any(isinstance(d, int) or (d not in OFFLOAD and torch.device(d).type != "cpu") for d in device_map.values())


def check_placeable(device_map: DeviceMap, spec: str) -> None:
    """Before loading: a map that names a GPU needs one and may not offload; a strategy without any GPU keeps
    everything on the CPU."""
    if names_gpu(device_map) and not torch.cuda.is_available():
        raise UserError(f"--device-map {spec[:60]!r} places modules on a GPU, but no CUDA GPU is visible; "
                        "leave --device-map out to prune on the CPU")
    if isinstance(device_map, dict):
        refuse_offload(offloaded_modules(device_map))
    if isinstance(device_map, str) and not torch.cuda.is_available():
        log.warning("--device-map %s: no GPU is visible, so the whole model stays on the CPU", device_map)


def offloaded_modules(placement: dict) -> list[str]:
    """The entries of a map whose weights accelerate offloads: disk always, the CPU beside any GPU."""
    devices = set(placement.values())
    return [name for name, device in placement.items()
            if device == "disk" or (device == "cpu" and devices - {"cpu", "disk"})]


def refuse_offload(offloaded: list[str]) -> None:
    if offloaded:
        raise UserError(f"the device map offloads {', '.join(offloaded[:3])}{' ...' if len(offloaded) > 3 else ''} "
                        "to cpu/disk, whose weights cannot be pruned in place; give the GPUs more memory, or prune "
                        "one layer at a time with --streaming (--device cuda)")


def check_resident(model: nn.Module) -> None:
    """After loading: every weight on a real device (accelerate offloads cpu/disk entries to `meta`)."""
    offloaded = offloaded_modules(getattr(model, "hf_device_map", None) or {})
    if not offloaded:  # a map transformers did not record: the weights themselves say it
        offloaded = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    refuse_offload(offloaded)


def is_spread(model: nn.Module) -> bool:
    """Was the model placed by a device map (its layers stay where the map put them)?"""
    return bool(getattr(model, "hf_device_map", None))

