import logging
import os

import pytest
from hypothesis import settings

# Hypothesis: derandomized by default so that `python -m pytest` is deterministic (CI decides nothing by chance);
# `HYPOTHESIS_PROFILE=random python -m pytest tests/test_properties.py` runs a fresh random search. No example
# database: a failure found by the random search is kept as an explicit @example in the test instead.
settings.register_profile("derandomized", derandomize=True, database=None, print_blob=True)
settings.register_profile("random", derandomize=False, database=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "derandomized"))

# Under pytest-xdist each worker (and every process a test starts) gets its share of the CPUs, so parallel
# workers do not oversubscribe the machine with one full-width thread pool each.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    _threads = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    os.environ["OMP_NUM_THREADS"] = _threads
    import torch

    torch.set_num_threads(int(_threads))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
logging.getLogger("transformers").setLevel(logging.ERROR)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    from tests.tiny import save_tiny_checkpoint

    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny-llama", tie=True)
