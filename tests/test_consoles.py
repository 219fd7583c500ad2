"""Messages keep long paths on one line when stderr is a pipe or a log file."""

from entroclip.consoles import message_console


def test_a_long_path_stays_on_one_line(capsys):
    path = "/tmp/" + "/".join(f"folder_{i:03d}" for i in range(20)) + "/step_000002"
    message_console().print(f"resumed from {path} (step 2)")
    assert capsys.readouterr().err == f"resumed from {path} (step 2)\n"


def test_a_quiet_console_prints_nothing(capsys):
    message_console(quiet=True).print("rank 1")
    assert capsys.readouterr().err == ""
