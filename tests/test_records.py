"""``--record PATH``: a command's record holds what it wrote and printed, its command line and versions.

A shortened ``entropy-probe demo-guard`` (the demo twice, 3 steps each; ~15 s) recorded through the
command line: the record's data is the command's own ``demo_guard.json`` plus the two runs' demo.json,
its console holds every line the command printed, and the figures a doc would quote read back.
"""

import json
from pathlib import Path

import pytest
from test_demo import SHORT

from entropy_probe import cli
from entropy_probe.records import pop_record_option, versions


def test_a_recorded_command_keeps_its_json_and_its_output(tmp_path, capsys):
    out, record = tmp_path / "pair", tmp_path / "records" / "pair.json"
    argv = ["demo-guard", *SHORT, "--seed", "1", "--out", str(out), "--entropy-budget", "0.001"]
    assert cli.main([*argv, "--record", str(record)]) == 0
    printed = capsys.readouterr().out
    doc = json.loads(record.read_text())
    assert doc["command"] == "entropy-probe " + " ".join(argv)
    assert doc["versions"] == versions() and doc["versions"]["torch"]
    assert {k: v for k, v in doc["data"].items() if "/" not in k} == json.loads(
        (out / "demo_guard.json").read_text()
    )
    for run in ("unguarded", "guarded"):
        assert doc["data"][f"{run}/demo.json"] == json.loads((out / run / "demo.json").read_text())
    # What was printed reached the terminal and the record alike, without the final "recorded" line.
    assert doc["console"] and doc["console"] in printed and printed.endswith(f"recorded {record}\n")
    assert "steps scaled / mean scale" in doc["console"]


@pytest.mark.parametrize(
    "argv, rest, path",
    [
        (["demo", "--steps", "3"], ["demo", "--steps", "3"], None),
        (["demo", "--record", "r.json", "--steps", "3"], ["demo", "--steps", "3"], Path("r.json")),
        (["validate", "--record=x/r.json"], ["validate"], Path("x/r.json")),
    ],
)
def test_the_record_option_is_taken_out_of_the_command_line(argv, rest, path):
    assert pop_record_option(argv) == (rest, path)


@pytest.mark.parametrize("argv", [["demo", "--record"], ["demo", "--record", "--steps", "3"]])
def test_a_record_option_without_a_path_is_refused(argv):
    with pytest.raises(ValueError, match="--record needs a path"):
        pop_record_option(argv)
