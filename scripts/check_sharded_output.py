"""Check a sharded slim checkpoint without loading its weights: the index names every tensor once, every shard
it names exists and holds exactly its tensors, every tensor's shape (read from the safetensors headers) matches
the shape a model built from config.json on `meta` expects, and the index total equals the stored bytes.

    python scripts/check_sharded_output.py OUT_DIR

Prints a JSON summary; exits 1 when something does not match."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "BOOL": 1, "U8": 1}


def check(folder: Path) -> dict:
    """The summary: tensors, shards, parameters, problems found."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from depgraph_llm.checkpoint.loading import load_config

    index = json.loads((folder / "model.safetensors.index.json").read_text())
    weight_map: dict[str, str] = index["weight_map"]
    problems, shapes, stored = [], {}, 0
    for shard in sorted(set(weight_map.values())):
        with safe_open(folder / shard, framework="pt") as handle:
            names = set(handle.keys())
            expected = {n for n, s in weight_map.items() if s == shard}
            if names != expected:
                problems.append(f"{shard}: holds {len(names)} tensors, the index names {len(expected)}")
            for name in names:
                view = handle.get_slice(name)
                shapes[name] = tuple(view.get_shape())
                count = 1
                for size in shapes[name]:
                    count *= size
                stored += count * _BYTES[view.get_dtype()]
    config = load_config(folder)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    skeleton.tie_weights()
    expected_shapes = {n: tuple(p.shape) for n, p in skeleton.named_parameters()}
    for name, shape in expected_shapes.items():
        if name not in shapes:
            problems.append(f"missing {name}")
        elif shapes[name] != shape:
            problems.append(f"{name}: stored {shapes[name]}, config expects {shape}")
    problems += [f"unexpected {name}" for name in shapes if name not in expected_shapes]
    if index.get("metadata", {}).get("total_size") not in (None, stored):
        problems.append(f"index total_size {index['metadata']['total_size']} != stored {stored}")
    return {"folder": str(folder), "tensors": len(shapes), "shards": len(set(weight_map.values())),
            "parameters": sum(p.numel() for p in skeleton.parameters()), "stored_tensor_bytes": stored,
            "problems": problems}


def main() -> None:
    summary = check(Path(sys.argv[1]))
    print(json.dumps(summary, indent=1))
    sys.exit(1 if summary["problems"] else 0)


if __name__ == "__main__":
    main()
