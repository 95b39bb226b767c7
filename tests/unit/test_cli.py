"""The CLI: flags map onto config fields, and bad input exits 2 naming the field."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from candgen.cli import main


def test_synth_writes_a_marketplace(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "m"
    rc = main(["data", "synth", "--users", "20", "--ads", "30", "--days", "2", "--seed", "3",
               "--surface-mix", "0.2", "0.3", "0.5", "--out", str(out), "--quiet"])  # fmt: skip
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["rows"]["users"] == 20 and printed["rows"]["ads"] == 30
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["surface_mix"] == [0.2, 0.3, 0.5]
    assert manifest["config"]["seed"] == 3


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["data", "synth", "--users", "0"], "users: must be between 1"),
        (["data", "synth", "--ctr-min", "0.5", "--ctr-max", "0.1"], "ctr_min: must be below"),
        (["data", "synth", "--surface-mix", "1", "1", "1"], "surface_mix: must be 3"),
        (["features", "build", "--short-seq-len", "0"], "short_seq_len: must be"),
        (["features", "apply", "--online", "mongo"], "online: must be one of"),
        (["features", "materialize", "--end", "soon"], "end: must be an ISO"),
        (["features", "online"], "user_id: give exactly one of"),
        (
            ["features", "campaign", "--campaign-id", "5", "--status", "stopped"],
            "status: campaign 5: must be one of",
        ),
        (
            ["features", "campaign", "--campaign-id", "5", "--target-devices", "tv"],
            "target_devices: campaign 5: unknown value(s) ['tv']",
        ),
        (
            ["features", "campaign", "--campaign-id", "5", "--throttle", "2"],
            "throttle: campaign 5: must be in [0, 1]",
        ),
        (
            ["features", "impression", "--user-id", "3", "--ad-id", "0", "--advertiser-id", "1"],
            "ad_id: user 3: must be a positive integer id",
        ),
        (
            ["features", "hide", "--user-id", "3", "--advertiser-id", "-1"],
            "advertiser_id: user 3: must be a positive integer id",
        ),
    ],
)
def test_bad_arguments_exit_2_naming_the_field(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    argv = [*argv, "--state-dir", str(tmp_path)] if argv[0] == "features" else argv
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_malformed_real_file_exits_2_with_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "amazon-games").mkdir()
    (tmp_path / "amazon-games" / "Video.txt").write_text("1 2\nthree 4\n")
    assert main(["data", "real", "--dataset", "games", "--data-dir", str(tmp_path)]) == 2
    assert "Video.txt:2: expected integer ids" in capsys.readouterr().err


def test_argparse_type_errors_exit_2() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "candgen.cli", "data", "synth", "--users", "many"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "--users: invalid int value: 'many'" in proc.stderr


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--model", "bert4rec"], "model: 'bert4rec' is not one of"),
        (["train", "--num-heads", "3"], "num_heads: 3 does not divide dim 64"),
        (["train", "--protocol", "sampled50"], "protocol: 'sampled50' is not one of"),
        (["train", "--data-dir", "/nonexistent", "--no-track"], "Beauty.txt: no such file"),
        (["train", "--dataset", "sequences", "--no-track"], "data_dir: the sequences data set"),
        (
            [
                "train",
                "--dataset",
                "sequences",
                "--data-dir",
                "/nonexistent/Toys.txt",
                "--no-track",
            ],
            "/nonexistent/Toys.txt: no such file",
        ),
        (["evaluate", "--model", "/nonexistent/model.pt"], "/nonexistent/model.pt: no such"),
        (["train", "--model", "generative", "--no-track"], "semantic_ids: the generative model"),
        (["train", "--model", "bsarec", "--no-track"], "examples: bsarec's frequency filter"),
        (
            ["train", "--model", "generative", "--semantic-ids", "/nonexistent/ids.npz"],
            "/nonexistent/ids.npz: not a semantic ID table",
        ),
        (["semantic-ids", "--model", "/nonexistent/model.pt"], "/nonexistent/model.pt: no such"),
        (["semantic-ids", "--model", "m.pt", "--levels", "0"], "levels: must be an integer >= 1"),
    ],
)
def test_bad_train_arguments_exit_2_naming_the_field(
    argv: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_train_then_evaluate(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    rc = main(["train", "--dataset", "planted", "--model", "two_tower", "--epochs", "3",
               "--batch-size", "64", "--max-len", "20", "--no-track", "--no-progress",
               "--out-dir", str(out)])  # fmt: skip
    assert rc == 0
    trained = json.loads(capsys.readouterr().out)
    assert trained["test"]["users"] == 600 and trained["world_size"] == 1
    assert main(["evaluate", "--model", str(out / "model.pt")]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["model"]["hr@10"] == pytest.approx(trained["test"]["hr@10"])
    assert evaluated["model"]["hr@10"] > evaluated["popularity"]["hr@10"]
