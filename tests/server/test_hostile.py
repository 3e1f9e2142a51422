"""Hostile input never gives a 5xx, a dropped connection or a corrupted library.

Each case below once answered a plain-text 500 (and uvicorn then dropped the keep-alive
connection): wrong types in the extension fields, NaN thresholds, deep nesting, bodies that
are not UTF-8, lone surrogates, vectors whose values overflow. They are sent over one
keep-alive connection to a real server, which must answer each with a 4xx in OpenAI's
error shape and then still answer a good request on the same connection.
"""

from __future__ import annotations

import json
import math
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
import torch
from fastapi.testclient import TestClient

import acteng
from acteng.bundled import bundled_files
from acteng.library import VectorLibrary
from acteng.server.body import decode_body, json_text
from acteng.server.schema import CHAT_BODY, COMPLETION_BODY
from tests.server.serving import make_app, serve_on_loopback

pytestmark = pytest.mark.real

ADMIN = "admin-key-for-hostile-tests"
CHAT = "/v1/chat/completions"
HI = '{"role": "user", "content": "Hi"}'


def chat(**extra: Any) -> str:
    return json.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **extra})


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


HOSTILE: list[tuple[str, str | bytes, str]] = [
    *[
        (f"steering mode {m!r}", chat(steering=[{"vector": "refusal", "mode": m}]), "mode")
        for m in ({}, [], ["add"], 1, None, True)
    ],
    (
        "counter mode {}",
        chat(
            guard={
                "detector": "harmful_request",
                "policy": "steer",
                "counter": [{"vector": "refusal", "mode": {}}],
            }
        ),
        "mode",
    ),
    (
        "guard threshold NaN",
        chat(guard={"detector": "harmful_request", "threshold": math.nan}),
        "finite",
    ),
    (
        "guard threshold Infinity",
        f'{{"messages": [{HI}], "guard": {{"detector": "harmful_request", '
        '"threshold": Infinity}}',
        "finite",
    ),
    *[
        (
            f"nested {d} in a field",
            f'{{"messages": [{HI}], "steering": {nested(d)}}}',
            "nests deeper",
        )
        for d in (1000, 100_000)
    ],
    *[
        (
            f"nested {d} as an extra field",
            f'{{"messages": [{HI}], "x": {nested(d)}}}',
            "nests deeper",
        )
        for d in (40, 1000, 100_000)
    ],
    (
        "invalid UTF-8",
        b'{"messages": [{"role": "user", "content": "hi \xff\xfe"}]}',
        "not valid JSON",
    ),
    (
        "lone surrogate in a message",
        '{"messages": [{"role": "user", "content": "hi \\ud800"}]}',
        "surrogate",
    ),
    (
        "lone surrogate in a key",
        '{"messages": [{"role": "user", "content": "hi"}], "\\udfff": 1}',
        "surrogate",
    ),
    ("monitor item {}", chat(monitor=[{"vector": {}}]), "monitor[0]"),
    ("monitor layers {}", chat(monitor=[{"vector": "refusal", "layers": {}}]), "layers"),
    ("guard policy {}", chat(guard={"detector": "harmful_request", "policy": {}}), "policy"),
    ("guard check []", chat(guard={"detector": "harmful_request", "check": []}), "check"),
    ("guard detector {}", chat(guard={"detector": {}}), "detector"),
    ("guard detector []", chat(guard={"detector": []}), "detector"),
    ("guard detector twice", chat(guard={"detector": ["refusal", "refusal"]}), "detector"),
    ("guard detectors [1]", chat(guard={"detector": ["harmful_request", 1]}), "detector"),
    (
        "guard over two detectors watching the generation",
        chat(guard={"detector": ["harmful_request", "honesty"], "check": "generation"}),
        "check",
    ),
    ("positions {}", chat(steering=[{"vector": "refusal", "positions": {}}]), "positions"),
    ("layers [[1]]", chat(steering=[{"vector": "refusal", "layers": [[1]]}]), "layers"),
    ("layers 1e30", chat(steering=[{"vector": "refusal", "layers": 10**30}]), "layer"),
    ("stop {}", chat(stop={}), "stop"),
    ("seed 1e40", chat(seed=10**40), "seed"),
    ("body is a list", "[1, 2]", "JSON object"),
    ("stream_options a string", chat(stream=True, stream_options="x"), "stream_options"),
]

COMPLETION_HOSTILE = [
    ("lone surrogate in a prompt", '{"prompt": "hi \\ud800", "max_tokens": 2}', "surrogate"),
    ("prompt of numbers", '{"prompt": [1, 2, 3]}', "prompt"),
]


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hostile")


@pytest.fixture(scope="module")
def url(smollm2: acteng.Model, home: Path) -> Iterator[str]:
    app, _engine = make_app(smollm2, home, admin_key=ADMIN)
    with serve_on_loopback(app) as base:
        yield base


@pytest.fixture(scope="module")
def http(url: str) -> Iterator[httpx.Client]:
    """One keep-alive connection for the whole module, as a real client would use."""
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    with httpx.Client(base_url=url, limits=limits, timeout=120) as client:
        yield client


def _post(http: httpx.Client, path: str, body: str | bytes) -> httpx.Response:
    return http.post(path, content=body, headers={"content-type": "application/json"})


def _assert_clear_4xx(response: httpx.Response, words: str) -> None:
    assert 400 <= response.status_code < 500, response.text
    error = response.json()["error"]
    assert words in error["message"], error["message"]
    assert len(error["message"]) <= 2000  # never the whole hostile value quoted back


def test_an_error_quoting_a_huge_value_is_cut(http: httpx.Client) -> None:
    body = chat(monitor=[{"vector": "refusal", "layers": [10] * 50000}])
    response = _post(http, CHAT, body)
    assert response.status_code == 400 and len(response.content) < 3000
    assert "characters, cut)" in response.json()["error"]["message"]


@pytest.mark.parametrize(("case", "body", "words"), HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_chat_bodies_get_a_clear_4xx(
    http: httpx.Client, case: str, body: str | bytes, words: str
) -> None:
    _assert_clear_4xx(_post(http, CHAT, body), words)
    # the same connection still serves
    ok = _post(http, CHAT, chat())
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize(("case", "body", "words"), COMPLETION_HOSTILE)
def test_hostile_completion_bodies_get_a_clear_4xx(
    http: httpx.Client, case: str, body: str, words: str
) -> None:
    _assert_clear_4xx(_post(http, "/v1/completions", body), words)


def _vector(model: acteng.Model, value: float) -> bytes:
    directions = {10: torch.full((model.hidden_size,), value)}
    return acteng.SteeringVector(directions, {"model": model.identity()}).to_bytes()


@pytest.mark.parametrize("value", [3e38, 1e30])
def test_overflowing_vectors_are_refused_at_upload_and_not_stored(
    http: httpx.Client, smollm2: acteng.Model, home: Path, value: float
) -> None:
    before = [e.name for e in VectorLibrary(home).list()]
    response = http.post(
        "/v1/vectors",
        params={"name": "huge"},
        content=_vector(smollm2, value),
        headers={"Authorization": f"Bearer {ADMIN}"},
    )
    _assert_clear_4xx(response, "norms out of range")
    assert [e.name for e in VectorLibrary(home).list()] == before
    used = _post(http, CHAT, chat(steering=[{"vector": "huge"}]))
    assert used.status_code == 404


def test_a_detector_with_a_degenerate_scale_gives_a_4xx(
    http: httpx.Client, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vector = acteng.SteeringVector.load(bundled_files()["harmful_request"])
    spec = dict(vector.metadata["detector"])
    spec["scales"] = {k: 5e-324 for k in spec["scales"]}
    broken = acteng.SteeringVector(dict(vector.directions), {**vector.metadata, "detector": spec})
    # Stored behind the server's back (as an older acteng could have): uploads refuse it.
    uploaded = http.post(
        "/v1/vectors",
        params={"name": "tiny-scale"},
        content=broken.to_bytes(),
        headers={"Authorization": f"Bearer {ADMIN}"},
    )
    _assert_clear_4xx(uploaded, "scales")
    VectorLibrary(home).add("tiny-scale", broken)
    response = _post(http, CHAT, chat(guard={"detector": "tiny-scale", "policy": "block"}))
    _assert_clear_4xx(response, "scales")


def test_a_chunked_body_is_refused_once_it_passes_the_limit(url: str) -> None:
    """The 413 comes while the body is still arriving: the server never holds it whole."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as conn:
        conn.sendall(
            f"POST {CHAT} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n\r\n".encode()
        )
        chunk = b" " * 65536
        for _ in range(48):  # 3 MiB, more than the 1 MiB limit; the body never ends
            conn.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        conn.settimeout(30)
        answer = conn.recv(4096)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    with httpx.Client(base_url=url, timeout=60) as client:
        assert _post(client, CHAT, chat()).status_code == 200


def test_replies_never_carry_nan_or_infinity() -> None:
    text = json_text({"score": math.nan, "scores": [1.0, math.inf, -math.inf], "ok": 2.5})
    assert json.loads(text) == {"score": None, "scores": [1.0, None, None], "ok": 2.5}
    assert "NaN" not in text and "Infinity" not in text


def test_decode_body_checks_depth_and_text() -> None:
    assert decode_body(b'{"a": [[1]]}') == {"a": [[1]]}
    with pytest.raises(acteng.RequestError, match="nests deeper"):
        decode_body(("[" * 50 + "]" * 50).encode())
    with pytest.raises(acteng.RequestError, match=r"messages\[0\].content"):
        decode_body(b'{"messages": [{"content": "\\ud800"}]}')


def test_openapi_describes_the_extensions(http: httpx.Client) -> None:
    schema = http.get("/openapi.json").json()
    chat_body = schema["paths"][CHAT]["post"]["requestBody"]["content"]["application/json"]
    properties = chat_body["schema"]["properties"]
    assert {"steering", "monitor", "guard", "messages"} <= set(properties)
    assert properties["steering"]["items"]["properties"]["mode"]["enum"] == [
        "add",
        "ablate",
        "clamp",
    ]


@pytest.mark.parametrize(
    ("path", "schema"), [(CHAT, CHAT_BODY), ("/v1/completions", COMPLETION_BODY)]
)
def test_the_schemas_examples_are_served(
    http: httpx.Client, path: str, schema: dict[str, Any]
) -> None:
    response = _post(http, path, json.dumps(schema["example"]))
    assert response.status_code == 200, response.text


def test_in_process_client_sees_no_server_error(smollm2: acteng.Model, tmp_path: Path) -> None:
    """The same cases without the network: nothing raises inside the app."""
    app, _engine = make_app(smollm2, tmp_path)
    with TestClient(app, raise_server_exceptions=True) as client:
        for _case, body, _words in HOSTILE[:8]:
            response = client.post(CHAT, content=body, headers={"content-type": "application/json"})
            assert 400 <= response.status_code < 500
