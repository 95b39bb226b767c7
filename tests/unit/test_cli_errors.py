"""Every command refuses a bad value with exit code 2 and one line on stderr that names the field
or flag, never a traceback, and before it starts any work (these run in well under a second)."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import candgen.cli.data
from candgen.cli import build_parser, main

# One bad value per command: (argv, what the one line must say). "{tmp}" is a fresh folder.
BAD_VALUES: dict[str, tuple[list[str], str]] = {
    "data synth": (["--users", "0"], "users: must be between 1"),
    "data real": (["--dataset", "beauty", "--data-dir", "{tmp}/none"], "data_dir: "),
    "features build": (["--short-seq-len", "0"], "short_seq_len: must be"),
    "features long-term": (["--epochs", "0"], "epochs: must be > 0"),
    "features apply": (["--online", "mongo"], "online: must be one of"),
    "features materialize": (["--end", "soon"], "end: must be an ISO timestamp"),
    "features online": ([], "user_id: give exactly one of"),
    "features push": (["--user-id", "1", "--item-id", "2", "--max-len", "0"], "max_len: must be"),
    "features campaign": (["--campaign-id", "5", "--pacing", "fast"], "pacing: campaign 5: must"),
    "features impression": (
        ["--user-id", "1", "--ad-id", "2", "--advertiser-id", "0"],
        "advertiser_id: user 1: must be a positive integer id",
    ),
    "features hide": (["--user-id", "0", "--advertiser-id", "3"], "user_id: must be a positive"),
    "features serve": (["--port", "0"], "port: must be a TCP port"),
    "features training-set": (["--limit", "-1", "--out", "{tmp}/t.parquet"], "limit: must be"),
    "train": (["--model", "bert4rec"], "model: 'bert4rec' is not one of"),
    "evaluate": (["--model", "{tmp}/model.pt", "-k", "0"], "k: must be >= 1"),
    "registry register": (
        ["--name", "m", "--run-id", "r", "--primary-metric", "auc"],
        "primary_metric: expected hr@K",
    ),
    "registry promote": (["--name", ""], "name: must not be empty"),
    "registry show": (["--name", " "], "name: must not be empty"),
    "index build": (["--model-uri", "models:/m@champion", "--kind", "lsh"], "kind: 'lsh'"),
    "semantic-ids": (["--model", "{tmp}/m.pt", "--codebook-size", "0"], "codebook_size: must be"),
    "serve": (["--http-port", "0"], "http_port: must be a TCP port"),
    "serving export": (
        ["--model-uri", "models:/m@champion", "--keep-versions", "0"],
        "keep_versions: must be >= 1",
    ),
    "serving swap": (["--model-repository", "{tmp}/none"], "model_repository: "),
    "quotas learn": (["--model", "{tmp}/model.pt", "--pooling", "none"], "pooling: 'none'"),
    "quotas compare": (["--model", "{tmp}/model.pt", "-k", "0", "50"], "k: must be >= 1"),
    "quotas show": (["{tmp}/quotas.json", "-k", "0"], "k: must be >= 1"),
    "query": (["1", "--recent", "12,seven"], "recent: expected comma-separated item ids"),
    "pipeline compile": (["--out", "{tmp}"], "out: "),
    "pipeline run": ([], "local: only --local runs here"),
    "pipeline submit": (["--host", "ml-pipeline:8888"], "host: must be the KFP API's http(s)"),
    "demo": (["--users", "0"], "users: must be >= 1"),
}


def run(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """main's exit code (argparse's own errors exit through SystemExit) and its stderr."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code  # type: ignore[assignment]
    return int(code), capsys.readouterr().err


def commands(parser: argparse.ArgumentParser, path: str = "") -> Iterator[str]:
    """Every command that runs something: ``data synth``, ``train``, ..."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path
    for sub in subs:
        for name, child in sub.choices.items():
            yield from commands(child, f"{path} {name}".strip())


def test_every_command_has_a_bad_value_case() -> None:
    assert set(BAD_VALUES) == set(commands(build_parser()))


def test_swap_refuses_a_bad_timeout_naming_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    code, err = run(["serving", "swap", "--timeout-s", "0"], capsys)
    assert code == 2 and err.startswith("candgen: error: timeout_s: must be > 0"), err


def test_the_lean_front_refuses_workers_naming_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    argv = ["features", "serve", "--lean", "--workers", "2", "--state-dir", str(tmp_path / "s")]
    code, err = run(argv, capsys)
    assert code == 2 and err.startswith("candgen: error: workers: the lean front runs one"), err


def test_a_gpu_index_with_a_selector_is_refused_naming_the_field(
    capsys: pytest.CaptureFixture,
) -> None:
    argv = ["index", "build", "--model-uri", "models:/m@champion", "--device", "cuda",
            "--filter-mode", "selector"]  # fmt: skip
    code, err = run(argv, capsys)
    assert code == 2 and err.startswith("candgen: error: filter_mode: FAISS's GPU indexes"), err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["index", "build", "--kind", "ivfpq", "--refine", "sq4"], "refine: 'sq4' is not one of"),
        (["index", "build", "--ivf-quantizer", "lsh"], "ivf_quantizer: 'lsh' is not one of"),
        (["serving", "export", "--ad-shard-urls", "shard0"], "ad_shard_urls: expected host:port"),
        (["serving", "export", "--ad-shard-timeout-s", "0"], "ad_shard_timeout_s: must be"),
    ],
)
def test_bad_compressed_or_sharded_index_settings_are_refused_naming_the_field(
    argv: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    code, err = run([*argv, "--model-uri", "models:/m@champion"], capsys)
    assert code == 2 and err.startswith(f"candgen: error: {message}"), err


@pytest.mark.parametrize("command", sorted(BAD_VALUES))
def test_a_bad_value_exits_2_with_one_line_naming_the_field(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    args, message = BAD_VALUES[command]
    argv = [*command.split(), *(a.replace("{tmp}", str(tmp_path)) for a in args)]
    if argv[0] == "features":  # never the repository's own feature store
        argv += ["--state-dir", str(tmp_path / "state")]
    code, err = run(argv, capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("candgen: error: ") and message in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (
            ["features", "push", "--user-id", "1", "--item-id", "2", "--action-type", "jump"],
            "--action-type",
        ),
        (["query", "1", "--protocol", "smtp"], "--protocol"),
        (["train", "--label-weights", "1", "2"], "--label-weights"),
        (["data", "synth", "--users", "many"], "--users"),
        (["quotas"], "quotas_command"),
    ],
)
def test_argparse_errors_are_one_line_too(
    argv: list[str], flag: str, capsys: pytest.CaptureFixture
) -> None:
    code, err = run(argv, capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert flag in err and f"see candgen {' '.join(argv[:1])}" in err


def test_a_missing_file_is_one_line_but_a_bug_keeps_its_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    def missing(args: object) -> int:
        raise FileNotFoundError(2, "No such file or directory", "/data/given.parquet")

    monkeypatch.setattr(candgen.cli.data, "cmd_data_synth", missing)
    assert main(["data", "synth"]) == 2
    assert capsys.readouterr().err == (
        "candgen: error: /data/given.parquet: No such file or directory\n"
    )

    def bug(args: object) -> int:
        raise RuntimeError("a bug")

    monkeypatch.setattr(candgen.cli.data, "cmd_data_synth", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["data", "synth"])


def test_the_installed_command_prints_one_line_and_no_traceback(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "candgen.cli", "train", "--num-heads", "3", "--no-track"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr == "candgen: error: num_heads: 3 does not divide dim 64\n"


# Bare errors left on purpose, per file: invariants only a bug in candgen can break
# (all_action_targets without windows, paired_difference and recall_at_k of mismatched lists),
# and orchestrate's ValueError that parse_overrides catches two lines below; and the KeyError
# of a mapping's missing key (IdIndex, TextVectors: Mapping's protocol, which `in` and `.get`
# rely on). Every other error a user can cause is a CandgenError, which main prints as one line.
INTERNAL_RAISES = {
    "data/batches.py": 1,
    "data/ids.py": 1,
    "evaluation/metrics.py": 1,
    "index/ann.py": 1,
    "orchestrate.py": 1,
    "serving/generators.py": 1,
}


def test_errors_a_user_can_cause_are_candgen_errors() -> None:
    src = Path(candgen.cli.__file__).parents[1]
    bare = re.compile(r"raise (ValueError|TypeError|KeyError|RuntimeError)\(")
    found = {}
    for path in sorted(src.rglob("*.py")):
        count = len(bare.findall(path.read_text()))
        if count:
            found[path.relative_to(src).as_posix()] = count
    assert found == INTERNAL_RAISES
