"""The CLI, run in-process as a user would."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from acteng.cli import main
from acteng.cli.generate_cmd import run_chat, side_by_side
from acteng.errors import ActengError

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def vector_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "sentiment.safetensors"
    assert (
        main(
            [
                "extract",
                "--pairs",
                "sentiment",
                "--layers",
                "7-9",
                "--position",
                "mean",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    return out


def test_extract_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "v.safetensors"
    assert (
        main(
            [
                "extract",
                "--pairs",
                "formality",
                "--layers",
                "8",
                "--method",
                "pca",
                "--out",
                str(out),
                "--json",
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["layers"] == [8] and summary["method"] == "pca"
    assert summary["pairs"] >= 100 and out.is_file()


def test_generate_compare(vector_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            [
                "generate",
                "--prompt",
                "Describe your morning.",
                "--vector",
                f"{vector_path}:6",
                "--layers",
                "8",
                "--compare",
                "--max-new-tokens",
                "12",
                "--json",
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    row = result["results"][0]
    assert row["steered"] != row["unsteered"]
    assert result["steering"][0]["layers"] == [8]
    assert (
        main(
            [
                "generate",
                "--prompt",
                "Hi",
                "--vector",
                f"{vector_path}:6",
                "--compare",
                "--max-new-tokens",
                "8",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "unsteered" in text and "steered (add 6 @ L7-9)" in text


def test_chat_live_coefficients(vector_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from acteng.cli import build_parser

    args = build_parser().parse_args(
        ["chat", "--vector", f"{vector_path}:0", "--max-new-tokens", "8"]
    )
    assert isinstance(args, argparse.Namespace)
    script = "Hello\n/coef 8\n/show\n/off\n/on\n/reset\n/bogus\n/coef x\n/quit\n"
    assert run_chat(args, io.StringIO(script)) == 0
    out = capsys.readouterr().out
    assert out.count("model> ") == 1
    assert "coefficient set to 8" in out and "add 8 @ L7-9" in out
    assert "unknown command /bogus" in out and "error: /coef 'x': give a number" in out


def test_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["extract", "--pairs", str(tmp_path / "none.jsonl"), "--out", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("acteng extract: error: no dataset at") and "Traceback" not in err
    assert main(["generate", "--prompt", "x", "--vector", "nope.safetensors:2"]) == 2
    assert "no vector file at nope.safetensors" in capsys.readouterr().err
    assert main(["generate", "--prompt", "x", "--vector", "v.safetensors:abc"]) == 2
    assert "cannot read coefficient 'abc'" in capsys.readouterr().err


def test_datasets_listing(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["datasets", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in rows} >= {"sentiment", "refusal", "myopia"}
    assert main(["datasets", "myopia"]) == 0
    assert "acteng team" in capsys.readouterr().out


def test_dataset_card_as_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["datasets", "myopia", "--json"]) == 0
    card = json.loads(capsys.readouterr().out)
    assert card["name"] == "myopia" and card["pairs"] > 0 and "acteng team" in card["card"]


def test_a_closed_pipe_is_not_an_error() -> None:
    acteng = Path(sys.executable).parent / "acteng"
    # buffered output (as in a pipe by default) is written at the end, after the reader left
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    done = subprocess.run(
        f"'{acteng}' datasets | true; echo \"status ${{PIPESTATUS[0]}}\"",
        shell=True,
        executable="/bin/bash",
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert "status 0" in done.stdout and "BrokenPipe" not in done.stderr, done.stderr


def test_failed_commands_leave_no_folders_and_bad_values_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "a" / "b" / "v.safetensors"
    assert main(["extract", "--pairs", str(tmp_path / "none.jsonl"), "--out", str(out)]) == 2
    assert not (tmp_path / "a").exists()
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["monitor", "--vector", "x", "--prompt", "hi", "--generate", "-3"])
    assert "-3 is below 0" in capsys.readouterr().err
    assert (
        main(["generate", "--prompt", "x", "--guard", "harmful_request", "--policy", "steer"]) == 2
    )
    assert "add --counter NAME:COEF" in capsys.readouterr().err
    home = tmp_path / "file"
    home.write_text("not a folder")
    monkeypatch.setenv("ACTENG_HOME", str(home))
    assert main(["vectors", "list"]) == 2
    assert "point $ACTENG_HOME (or --home) at a folder" in capsys.readouterr().err


def test_layer_spans() -> None:
    from acteng.cli.common import layer_span

    assert [layer_span(x) for x in ([8], [0, 8], [5, 7, 9], [6, 7, 8, 10])] == [
        "8",
        "0,8",
        "5,7,9",
        "6-8,10",
    ]


def test_side_by_side_layout() -> None:
    text = side_by_side("left text", "right text", ("a", "b"), width=43)
    assert text.splitlines()[0].startswith("a") and " | b" in text.splitlines()[0]


def test_unwritable_output_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            [
                "extract",
                "--pairs",
                "sentiment",
                "--layers",
                "8",
                "--out",
                "/proc/acteng/v.safetensors",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("acteng extract: error:") and "Traceback" not in err


def test_vectors_library_and_gguf_commands(
    vector_path: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ACTENG_HOME", str(tmp_path / "home"))
    assert main(["vectors", "add", "happy", str(vector_path), "--tag", "sentiment"]) == 0
    assert main(["vectors", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert [e["name"] for e in listed] == ["happy"] and listed[0]["layers"] == [7, 8, 9]
    assert main(["vectors", "show", "happy", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["metadata"]["method"] == "mean_diff"
    # commands resolve library names
    assert (
        main(
            ["generate", "--prompt", "Hi", "--vector", "happy:4", "--max-new-tokens", "4", "--json"]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["steering"][0]["layers"] == [7, 8, 9]
    gguf = tmp_path / "happy.gguf"
    assert main(["export", "happy", str(gguf)]) == 0
    back = tmp_path / "back.safetensors"
    assert main(["import", str(gguf), str(back), "--check-model"]) == 0
    assert main(["vectors", "rename", "happy", "joy"]) == 0
    assert main(["vectors", "rm", "joy"]) == 0
    capsys.readouterr()
    assert main(["vectors", "show", "joy"]) == 2
    assert "no vector named 'joy'" in capsys.readouterr().err
    assert main(["vectors", "add", "../x", str(vector_path)]) == 2
    assert "invalid vector name" in capsys.readouterr().err


def test_monitor_heatmap_and_html(
    vector_path: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    page = tmp_path / "new folder" / "m.html"
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)  # colours go to terminals only
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert (
        main(
            [
                "monitor",
                "--vector",
                str(vector_path),
                "--prompt",
                "What a lovely day",
                "--layers",
                "8",
                "--generate",
                "6",
                "--html",
                str(page),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "\x1b[48;2;" in out and "lovely" in out
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False)  # a file or a pipe
    argv = ["monitor", "--vector", str(vector_path), "--prompt", "What a lovely day"]
    assert main([*argv, "--layers", "8"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "\x1b" not in "".join(lines) and any("lovely" in line for line in lines)
    float(lines[0].split()[0])  # each line: the score, then the token
    text = page.read_text()
    assert text.startswith("<!doctype html>") and "lovely" in text and "<script" not in text
    assert main(["monitor", "--vector", str(vector_path), "--prompt", "Sad news", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["tokens"]) == len(result["aggregate"]) and set(result["per_layer"]) == {
        "7",
        "8",
        "9",
    }


def test_debug_counts_after_the_command_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["extract", "--pairs", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "v")]
    assert main(argv) == 2  # one line, no traceback
    assert "acteng extract: error:" in capsys.readouterr().err
    for debug in (["--debug", *argv], [*argv, "--debug"]):  # the traceback, either way
        with pytest.raises(ActengError):
            main(debug)
    # after `--` it is a value like any other, not the option
    assert main(["datasets", "--", "--debug"]) == 2


def test_options_are_taken_only_as_written(capsys: pytest.CaptureFixture[str]) -> None:
    # argparse's default read `export --model` as `--model-hint` and `--mode` as
    # `--model`: a mistyped option silently meant another one
    for argv in (
        ["export", "v", "v.gguf", "--model", "x"],
        ["monitor", "--vector", "v", "--prompt", "p", "--mode", "ablate"],
        ["train", "rmu", "--forget", "f.txt", "--out", "o", "--ste", "3"],
    ):
        with pytest.raises(SystemExit) as stop:
            main(argv)
        assert stop.value.code == 2
        err = capsys.readouterr().err
        assert "unrecognized arguments" in err and argv[-2] in err
    assert "--ste: did you mean --steps?" in err  # the command's own option is suggested
    # the exact names still work, in nested commands too
    with pytest.raises(SystemExit) as stop:
        main(["train", "rmu", "--help"])
    assert stop.value.code == 0 and "--steps" in capsys.readouterr().out


def test_an_output_replaces_only_a_file_of_its_kind(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    notes = tmp_path / "notes.md"
    notes.write_text("mine")
    for argv in (
        ["extract", "--pairs", "sentiment", "--out", str(notes)],
        ["export", "refusal", str(notes)],
        ["import", str(notes), str(notes)],
    ):
        assert main(argv) == 2
        assert "exists and is not a" in capsys.readouterr().err
        assert notes.read_text() == "mine"


def test_a_second_adapter_or_model_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    # argparse kept the last: `--adapter A --adapter B` loaded B alone, silently
    for flag in ("--adapter", "--model"):
        with pytest.raises(SystemExit) as stop:
            main(["generate", "--prompt", "hi", flag, "a", flag, "b"])
        assert stop.value.code == 2
        assert f"{flag} is given twice; give it once" in capsys.readouterr().err
