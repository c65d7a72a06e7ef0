"""The layer pipeline: the ported passes (OBS statistics, activation statistics, depth metrics, reconstruction)
give byte-identical plans and weights to the hand-written passes they replaced (fingerprints saved from the old
code in tests/data/layer_pipeline_oracle.json)."""
import json

import pytest

from tests.layer_oracle import CASES, ORACLE, prune_case, run_case


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_port_is_byte_identical_to_the_old_passes(name):
    expected = json.loads(ORACLE.read_text())[name]
    assert run_case(name, prune_case) == expected
