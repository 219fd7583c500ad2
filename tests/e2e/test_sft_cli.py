"""`entroclip sft` input checks and folders: the model source, the output folder, numeric ranges, help, and
failures after the folder was made."""

import errno

import pytest
from support import assert_help_is_whole, error_line, files
from typer.testing import CliRunner

from entroclip.cli import app

runner = CliRunner()
#: a run of a few seconds
FAST = ["--steps", "2", "--batch-size", "4", "--eval-prompts", "4"]


def sft(*args: object):
    return runner.invoke(app, ["sft", *FAST, *map(str, args)])


@pytest.mark.parametrize("model", ["/nonexistent", "tiny-typo", "folder without config.json"])
def test_model_must_be_a_builtin_name_or_a_model_folder(tmp_path, model):
    if model.startswith("folder"):
        model = tmp_path / "folder"
        model.mkdir()
    result = sft("--model", model, "--out", tmp_path / "m")
    line = error_line(result)
    assert result.exit_code == 2 and "--model must be a built-in model (tiny-0.1m," in line
    assert "config.json" in line and repr(str(model)) in line
    assert not (tmp_path / "m").exists()


def test_out_must_be_new_empty_or_an_earlier_output_with_overwrite(tmp_path):
    foreign = tmp_path / "thesis"
    foreign.mkdir()
    (foreign / "chapter1.tex").write_text("years of work")
    for extra in ([], ["--overwrite"]):
        result = sft("--out", foreign, *extra)
        assert result.exit_code == 2 and "not an sft output folder" in error_line(result)
    assert files(foreign) == {"chapter1.tex": b"years of work"}

    out = tmp_path / "m"
    out.mkdir()  # an empty folder is fine
    assert sft("--out", out).exit_code == 0 and (out / "sft_summary.json").is_file()
    before = files(out)
    result = sft("--out", out, "--seed", "1")
    assert result.exit_code == 2 and "use --overwrite" in error_line(result)
    assert files(out) == before
    result = sft("--out", out, "--seed", "1", "--overwrite")
    assert result.exit_code == 0, result.output
    assert files(out)["model.safetensors"] != before["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "thesis"]  # no temporary folder is left


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--lr", "0", "--lr must be in (0, 1], got 0"),
        ("--lr", "-0.001", "--lr must be in (0, 1], got -0.001"),
        ("--lr", "nan", "--lr must be in (0, 1], got nan"),
        ("--lr", "3", "--lr must be in (0, 1], got 3"),
        ("--steps", "0", "--steps must be in [1, 1000000], got 0"),
        ("--steps", "10000000000", "--steps must be in [1, 1000000], got 10000000000"),
        ("--batch-size", "0", "--batch-size must be in [1, 65536], got 0"),
        ("--batch-size", "1000000000", "--batch-size must be in [1, 65536], got 1000000000"),
        ("--eval-prompts", "0", "--eval-prompts must be in [1, 65536], got 0"),
        ("--eval-prompts", "1000000000", "--eval-prompts must be in [1, 65536], got 1000000000"),
        ("--seed", "-1", "--seed must be in [0, 4294967295], got -1"),
        ("--seed", str(2**40), f"--seed must be in [0, 4294967295], got {2**40}"),
        ("--threads", "0", "--threads must be in [1, "),
        ("--threads", "100000", "--threads must be in [1, "),
    ],
)
def test_numeric_options_are_range_checked(tmp_path, option, value, message):
    result = sft("--out", tmp_path / "m", option, value)
    assert result.exit_code == 2 and message in error_line(result)
    assert list(tmp_path.iterdir()) == []


def test_a_failure_after_the_folder_was_made_leaves_nothing_half_written(tmp_path, monkeypatch):
    earlier = tmp_path / "earlier"
    assert sft("--out", earlier).exit_code == 0
    before = files(earlier)

    def disk_full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("entroclip.sft.accuracy", disk_full)  # after the model was saved
    for out, extra in ((earlier, ["--overwrite"]), (tmp_path / "new", [])):
        result = sft("--out", out, *extra)
        assert result.exit_code == 1 and "Traceback" not in result.output
        last = result.output.strip().splitlines()[-1]
        assert last.startswith("error: [Errno 28] No space left on device") and "run sft again" in last
    assert files(earlier) == before  # --overwrite replaces the earlier output only with a finished one
    assert [p.name for p in tmp_path.iterdir()] == ["earlier"]

    monkeypatch.undo()
    result = sft("--out", tmp_path / "new")
    assert result.exit_code == 0 and (tmp_path / "new" / "sft_summary.json").is_file(), result.output


def test_sft_help_shows_every_option_whole():
    assert_help_is_whole("sft")
