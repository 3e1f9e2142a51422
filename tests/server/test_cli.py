"""``acteng serve``: binding rules and arguments (the server itself is tested elsewhere)."""

from __future__ import annotations

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
