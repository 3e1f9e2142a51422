"""``acteng serve --engine vllm`` against ``acteng serve``: same body, same answers (float32).

The vLLM app runs over a real loopback socket, the transformers app in-process; both are
driven through the official openai SDK with ``steering`` in ``extra_body``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest

import acteng
from tests.server.serving import PROMPT, make_app, serve_on_loopback
from tests.vllm_engine.support import VLLM_WARNINGS, needs_vllm

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.real, needs_vllm, *VLLM_WARNINGS]

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("library")


@pytest.fixture(scope="module")
def vllm_sdk(smollm2: acteng.Model, home: Path) -> Iterator[Any]:
    from acteng.library import VectorLibrary
    from acteng.server.app import create_app
    from acteng.server.engine import Engine
    from acteng.server.requests import Limits
    from acteng.vllm_engine.engine import VllmEngine

    engine = VllmEngine(smollm2, dtype="float32", slots=8, context=512)
    limits = Limits(context=512, max_tokens=256)
    app = create_app(cast(Engine, engine), library=VectorLibrary(home), limits=limits)
    try:
        with serve_on_loopback(app) as url:
            yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    finally:
        engine.close()


@pytest.fixture(scope="module")
def transformers_sdk(smollm2: acteng.Model, home: Path) -> Iterator[Any]:
    from starlette.testclient import TestClient

    app, _ = make_app(smollm2, home, context=512)
    with TestClient(app) as client:
        yield openai.OpenAI(
            base_url="http://testserver/v1", api_key="unused", http_client=client, max_retries=0
        )


def chat(sdk: Any, prompt: str = PROMPT, max_tokens: int = 32, **extra: Any) -> str:
    reply = sdk.chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0,
        extra_body=extra or None,
    )
    return str(reply.choices[0].message.content)


@pytest.mark.parametrize("coefficient", [None, -16.0, -12.0, 12.0, 16.0])
def test_same_text_as_the_transformers_engine(
    vllm_sdk: Any, transformers_sdk: Any, coefficient: float | None
) -> None:
    extra = {}
    if coefficient is not None:
        extra["steering"] = [{"vector": "honesty", "coefficient": coefficient}]
    assert chat(vllm_sdk, **extra) == chat(transformers_sdk, **extra)


def test_ablation_and_completions_match_too(vllm_sdk: Any, transformers_sdk: Any) -> None:
    steering = [{"vector": "refusal", "coefficient": 1.0, "mode": "ablate"}]
    assert chat(vllm_sdk, steering=steering) == chat(transformers_sdk, steering=steering)
    texts = []
    for sdk in (vllm_sdk, transformers_sdk):
        reply = sdk.completions.create(
            model="default",
            prompt="The best thing about Mondays is",
            max_tokens=24,
            temperature=0,
            extra_body={"steering": [{"vector": "honesty", "coefficient": 12.0}]},
        )
        texts.append(reply.choices[0].text)
    assert texts[0] == texts[1]


def test_streaming_gives_the_same_text(vllm_sdk: Any) -> None:
    steering = [{"vector": "honesty", "coefficient": 12.0}]
    parts = []
    for chunk in vllm_sdk.chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=32,
        temperature=0,
        stream=True,
        extra_body={"steering": steering},
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
    assert "".join(parts) == chat(vllm_sdk, steering=steering)


def test_bad_requests_get_4xx_and_the_server_keeps_serving(vllm_sdk: Any) -> None:
    with pytest.raises(openai.NotFoundError, match="no vector or detector named 'ghost'"):
        chat(vllm_sdk, steering=[{"vector": "ghost"}])
    with pytest.raises(openai.BadRequestError, match="coefficient"):
        chat(vllm_sdk, steering=[{"vector": "honesty", "coefficient": 1e9}])
    with pytest.raises(openai.BadRequestError, match="out of range"):
        chat(vllm_sdk, steering=[{"vector": "honesty", "layers": [99]}])
    with pytest.raises(openai.BadRequestError, match="more than 2 items on layer"):
        chat(vllm_sdk, steering=[{"vector": "honesty", "coefficient": c} for c in (1, 2, 3)])
    with pytest.raises(openai.BadRequestError, match="only the transformers engine"):
        chat(vllm_sdk, monitor=["honesty"])
    with pytest.raises(openai.BadRequestError, match="only the transformers engine"):
        chat(vllm_sdk, guard={"detector": "harmful_request"})
    assert chat(vllm_sdk, max_tokens=8)  # still serving


def test_cli_offers_the_vllm_engine(capsys: pytest.CaptureFixture[str]) -> None:
    from acteng.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert "--engine {transformers,vllm}" in capsys.readouterr().out
