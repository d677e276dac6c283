"""The study's intervals and verdicts, against values worked out by hand."""
import math

import pytest

from postdiff_compile.lab.intervals import WITHIN, interval, t975, verdict


def test_interval_is_students_t_times_the_standard_error():
    # mean 2, sample std 1, n 3: half-width t(0.975, 2) * 1 / sqrt(3) = 4.303 / 1.7321
    mean, half = interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.303 / math.sqrt(3), rel=1e-6)
    assert math.isnan(interval([5.0])[1])
    assert t975(1) == pytest.approx(12.706) and t975(500) == 1.96
    with pytest.raises(ValueError, match="at least 2"):
        t975(0)


def test_verdicts_need_the_interval_to_exclude_zero():
    # Paired differences of a lower-is-better metric: all clearly negative -> better.
    assert verdict([-3.0, -3.2, -2.9], lower_is_better=True)["verdict"] == "better"
    assert verdict([-3.0, -3.2, -2.9], lower_is_better=False)["verdict"] == "worse"
    # Mean -1 with a spread that covers zero: not a finding.
    said = verdict([-4.0, 0.5, 0.5], lower_is_better=True)
    assert said["verdict"] == WITHIN and said["delta"] == pytest.approx(-1.0)
    assert verdict([-1.0], lower_is_better=True)["verdict"] == WITHIN      # one set: no interval, no verdict
    assert verdict([0.0, 0.0, 0.0], lower_is_better=True)["verdict"] == WITHIN
