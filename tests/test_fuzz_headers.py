"""Fuzzed safetensors headers (issue 20): every outcome is a loaded model or the project's one-line error
naming the file; no other exception type, no run over 5 s. The generator is tests/header_fuzz.py."""
import pytest
from header_fuzz import MAX_SECONDS, run


def check(report) -> None:
    print(report.table())
    assert report.findings == [], "\n".join(report.findings[:20])
    assert not any(k.startswith("ESCAPED") for k in report.outcomes)
    assert report.slowest <= MAX_SECONDS
    # The mutations reach every stage: header parsing, detection, the build and reading tensors.
    kinds = " ".join(report.outcomes)
    for stage in ("malformed header JSON", "unknown architecture", "file is truncated", "loaded"):
        assert stage in kinds, report.table()


def test_fuzzed_headers(tmp_path):
    check(run(2000, seed=0, folder=tmp_path))


@pytest.mark.slow
def test_fuzzed_headers_long(tmp_path):
    check(run(20000, seed=1, folder=tmp_path))
