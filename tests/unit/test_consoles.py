"""Messages and results keep long lines whole when the output is a pipe or a log file."""

import pytest

from entroclip.consoles import unwrapped_console


@pytest.mark.parametrize("stderr", [True, False], ids=["stderr", "stdout"])
def test_a_long_path_stays_on_one_line(capsys, stderr):
    path = "/tmp/" + "/".join(f"folder_{i:03d}" for i in range(20)) + "/step_000002"
    unwrapped_console(stderr=stderr).print(f"resumed from {path} (step 2)")
    captured = capsys.readouterr()
    assert (captured.err if stderr else captured.out) == f"resumed from {path} (step 2)\n"


def test_a_quiet_console_prints_nothing(capsys):
    unwrapped_console(quiet=True).print("rank 1")
    assert capsys.readouterr().err == ""
