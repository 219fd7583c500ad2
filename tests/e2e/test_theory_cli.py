"""``entroclip theory ...``: JSON output, files written with --out, and exit code 2 on bad input."""

import csv
import json

import pytest
from typer.testing import CliRunner

from entroclip.cli import app

SMALL = ["--n", "50", "--seeds", "200"]
DRIFT_KEYS = {"drift", "stderr", "effect_low", "effect_high", "closed_form", "first_order", "drift_unclipped"}


def invoke(*args):
    return CliRunner().invoke(app, ["theory", *args])


def test_drift_json_is_one_object_with_the_keys():
    result = invoke("drift", "--eps-low", "0.2", "--eps-high", "none", "--json", *SMALL)
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload.keys() >= DRIFT_KEYS
    assert payload["effect_high"] == 0.0 and payload["closed_form_high"] == 0.0
    assert payload["closed_form"] is not None and payload["closed_form"] > 0  # clip-low only
    assert payload["settings"]["eps_high"] is None and payload["settings"]["lr"] == 1.0
    assert payload["seeds"] == 200


def test_drift_json_has_null_closed_form_where_it_does_not_apply():
    result = invoke("drift", "--json", "--optimiser", "adam", "--mu", "2", *SMALL)
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["closed_form"] is None and payload["settings"]["lr"] == 0.05


def test_commands_write_csv_and_png(tmp_path):
    runs = {
        "drift": ["drift"],
        "trajectory": ["trajectory", "--updates", "3"],
        "phase": ["phase", "--eps-low-grid", "0.1,0.3", "--eps-high-grid", "0.1:0.3:3"],
        "balance": ["balance", "--eps-high", "0.2", "--tolerance", "0.05", "--seeds", "2000", "--n", "100"],
    }
    for name, (command, *args) in runs.items():
        result = invoke(command, *SMALL, *args, "--out", str(tmp_path))
        assert result.exit_code == 0, (name, result.output)
        rows = list(csv.DictReader((tmp_path / f"{name}.csv").open()))
        assert rows, name
        assert (tmp_path / f"{name}.png").read_bytes().startswith(b"\x89PNG"), name
    assert len(list(csv.DictReader((tmp_path / "phase.csv").open()))) == 6
    assert len(list(csv.DictReader((tmp_path / "trajectory.csv").open()))) == 4
    (balance,) = csv.DictReader((tmp_path / "balance.csv").open())
    assert 0 < float(balance["eps_low_stderr"]) < 0.5 and 0 < float(balance["eps_low"]) < 1
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporary files


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["drift", "--n", "1"], "'--n': Input should be greater than or equal to 2"),
        (["drift", "--seeds", "1"], "'--seeds': Input should be greater than or equal to 2"),
        (["drift", "--eps-low", "1.5"], "'--eps-low': '1.5' is not in the range [0, 1]"),
        (["drift", "--eps-low", "abc"], "'--eps-low': 'abc' is not in the range [0, 1]"),
        (["drift", "--eps-high", "-0.1"], "'--eps-high': '-0.1' is not in the range [0, inf)"),
        (["drift", "--dual-clip", "0.5"], "'--dual-clip': '0.5' is not in the range (1, inf)"),
        (["drift", "--p", "1.5"], "'--p': 1.5 is not in the range (0, 1)"),
        (["drift", "--lr", "0"], "'--lr': 0.0 is not in the range (0, inf)"),
        (["drift", "--optimiser", "sgd"], "'--optimiser'"),
        (["drift", "--entropy", "9"], "entropy must be in (0, log n"),
        (["drift", "--minibatches", "3"], "prompts (4) must be a multiple of minibatches (3)"),
        (["trajectory", "--updates", "0"], "'--updates'"),
        (["phase", "--eps-low-grid", "0.1:x:3"], "'--eps-low-grid': '0.1:x:3' is not START:STOP:COUNT"),
        (
            ["phase", "--eps-high-grid", "0.1,2"],
            "'--eps-high-grid': '0.1,2': every value must be in the range [0, 1]",
        ),
        (["balance", "--eps-high", "0.2,-1"], "'--eps-high': '-1' is not in the range [0, inf)"),
    ],
)
def test_bad_input_exits_2_with_the_option_and_its_range(args, message):
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    # rich draws the message in a box and may wrap it: compare with the box and line breaks removed
    text = " ".join(line.strip("│ ") for line in result.output.splitlines())
    assert message in text, text


def test_impossible_balance_is_a_one_line_error():
    result = invoke("balance", "--eps-high", "none", "--init", "uniform", *SMALL)
    assert result.exit_code == 1
    assert result.output.count("error:") == 1 and "does not change sign" in result.output
