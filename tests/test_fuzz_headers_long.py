"""The slow tier's header fuzz: 20,000 cases from another seed than the default tier's (test_fuzz_headers.py)."""
import pytest
from header_fuzz import run
from test_fuzz_headers import check


@pytest.mark.slow
def test_fuzzed_headers_long(tmp_path):
    check(run(20000, seed=1, folder=tmp_path))
