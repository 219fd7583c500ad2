"""Behaviour is kept: the golden runs' metrics equal, bit for bit (time/* aside), what the code wrote when
they were stored (tests/golden_runs.py)."""

import pytest
from golden_runs import RUNS, stored, train


@pytest.mark.parametrize("name", list(RUNS))
def test_golden_run_is_bit_identical(tmp_path, name):
    rows = train(name, tmp_path / name)
    golden = stored(name)
    assert [r["step"] for r in rows] == [r["step"] for r in golden]
    for row, expected in zip(rows, golden, strict=True):
        assert row == expected, f"step {row['step']} differs from tests/golden/{name}.metrics.jsonl"
