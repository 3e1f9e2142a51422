"""``acteng serve``: binding rules and arguments (the server itself is tested elsewhere)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from acteng.cli import main
from acteng.cli.serve_cmd import check_binding, is_loopback
from acteng.errors import ConfigError


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.0.1", "localhost", "::1", "[::1]"])
def test_loopback_addresses(host: str) -> None:
    assert is_loopback(host)
    check_binding(host, None)


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.4", "::", "example.org"])
def test_other_addresses_need_a_key(host: str) -> None:
    assert not is_loopback(host)
    with pytest.raises(ConfigError, match="--api-key"):
        check_binding(host, None)
    check_binding(host, "a-key")


def test_serve_refuses_public_bind_without_key(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ACTENG_API_KEY", raising=False)
    assert main(["serve", "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ACTENG_API_KEY" in err


def test_serve_help_lists_the_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    for option in ("--host", "--port", "--api-key", "--slots", "--guard", "--max-tokens"):
        assert option in out


def _serve_args(*argv: str) -> Any:
    import argparse

    from acteng.cli import serve_cmd

    parser = argparse.ArgumentParser()
    serve_cmd.register(parser.add_subparsers())
    return parser.parse_args(["serve", *argv])


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ((), ("localhost", "127.0.0.1", "::1")),
        (("--host", "127.0.0.2"), ("localhost", "127.0.0.1", "::1", "127.0.0.2")),
        (("--host", "0.0.0.0"), None),  # keyed: the API key protects it
        (("--allowed-hosts", "api.example, Localhost"), ("api.example", "localhost")),
        (("--allowed-hosts", "*"), None),
    ],
)
def test_allowed_hosts_default_to_loopback_names(argv: tuple[str, ...], expected: Any) -> None:
    from acteng.cli.serve_cmd import allowed_hosts

    assert allowed_hosts(_serve_args(*argv)) == expected


def test_serve_refuses_short_keys_and_a_required_guard_without_one(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ACTENG_API_KEY", raising=False)
    monkeypatch.delenv("ACTENG_ADMIN_KEY", raising=False)
    assert main(["serve", "--api-key", "short"]) == 2
    assert "at least 16" in capsys.readouterr().err
    assert main(["serve", "--admin-key", "short"]) == 2
    assert "at least 16" in capsys.readouterr().err
    assert main(["serve", "--guard-required"]) == 2
    assert "--guard NAME" in capsys.readouterr().err
    # a policy alone guarded nothing, silently
    assert main(["serve", "--policy", "block", "--check", "both"]) == 2
    err = capsys.readouterr().err
    assert "--policy and --check set how a guard acts, but no guard is on" in err


def test_serve_guard_thresholds_and_the_generation_check_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from acteng.cli.common import settle_guard_options
    from acteng.cli.serve_cmd import serve_settings

    args = _serve_args("--guard", "harmful_request", "--check", "both", "--threshold", "0")
    settle_guard_options(args)
    assert "--check both without --generation-threshold" in caplog.text
    caplog.clear()
    guard = serve_settings(args, None, None).app_options()["default_guard"]
    assert (guard["policy"], guard["check"], guard["threshold"]) == ("flag", "both", 0.0)
    args = _serve_args("--guard", "harmful_request", "--check", "generation")
    args.generation_threshold = 2.5
    settle_guard_options(args)
    assert caplog.text == ""
    assert (
        serve_settings(args, None, None).app_options()["default_guard"]["generation_threshold"]
        == 2.5
    )


def test_serve_settings_carry_the_new_options() -> None:
    from acteng.cli.serve_cmd import serve_settings

    args = _serve_args("--guard", "harmful_request", "--policy", "block", "--guard-required")
    settings = serve_settings(args, None, "admin-admin-admin-admin")
    options = settings.app_options()
    assert options["guard_required"] is True and options["admin_key"].startswith("admin")
    assert options["default_guard"]["detector"] == "harmful_request"
    assert options["allowed_hosts"] == ("localhost", "127.0.0.1", "::1")


def test_serve_guard_repeats_for_several_detectors() -> None:
    from acteng.cli.serve_cmd import serve_settings

    args = _serve_args("--guard", "harmful_request", "--guard", "prompt_injection")
    guard = serve_settings(args, None, None).app_options()["default_guard"]
    assert guard["detector"] == ["harmful_request", "prompt_injection"]


@pytest.mark.real
def test_serve_guard_names_are_checked_in_command_line_terms(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    home = ["--home", str(tmp_path)]
    assert main(["serve", *home, "--guard", "nope"]) == 2
    err = capsys.readouterr().err
    assert "no detector named 'nope'" in err and "acteng vectors add NAME FILE" in err
    assert "GET /v1/vectors" not in err
    assert main(["serve", *home, "--guard", "./d.safetensors"]) == 2
    assert "the server takes names, not paths" in capsys.readouterr().err
