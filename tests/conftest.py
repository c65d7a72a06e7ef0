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

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
logging.getLogger("transformers").setLevel(logging.ERROR)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    from tests.tiny import save_tiny_checkpoint

    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny-llama", tie=True)
