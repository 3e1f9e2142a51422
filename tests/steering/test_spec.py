"""`SteeringSpec`'s one JSON form (`from_json` / `to_json`) and the one reading of layers.

The second half runs the same steering items through every door that takes them (the
library, the HTTP ``steering`` field, vLLM ``extra_args`` and the CLI's ``--vector`` flags)
and requires the same specs, or the same refusal, from each.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

import acteng
from acteng.errors import ConfigError, RequestError
from acteng.layer_selection import parse_layers
from acteng.steering.spec import JSON_FIELDS, SteeringSpec, check_coefficient
from tests.helpers import random_vector

VECTOR_LAYERS = [1, 2, 3]  # of the tiny 4-layer model


@pytest.fixture()
def vector(tiny_llama: acteng.Model) -> acteng.SteeringVector:
    return random_vector(tiny_llama, VECTOR_LAYERS)


def _reader(tiny_llama: acteng.Model, vector: acteng.SteeringVector) -> Any:
    def lookup(name: str) -> acteng.SteeringVector:
        if name != "happy":
            raise RequestError(f"no vector named {name!r}", status=404)
        return vector

    return lambda obj: SteeringSpec.from_json(obj, lookup, tiny_llama, where="steering[0]")


def test_to_json_then_from_json_gives_the_same_spec(
    tiny_llama: acteng.Model, vector: acteng.SteeringVector
) -> None:
    read = _reader(tiny_llama, vector)
    specs = [
        SteeringSpec(vector, name="happy"),
        SteeringSpec(vector, -2.5, (1, 3), "generated", "add", name="happy"),
        SteeringSpec(vector, 1.0, (2,), "-1:", "ablate", name="happy"),
        SteeringSpec(vector, 0.5, None, "0:8", "clamp", name="happy"),
    ]
    for spec in specs:
        data = spec.to_json()
        assert tuple(data) == JSON_FIELDS
        back = read(data)
        # the JSON form names the layers steered, so None comes back as the vector's own
        assert back == replace(spec, layers=spec.active_layers) and back.name == "happy"
        assert back.to_json() == data  # canonical: a second round changes nothing


def test_from_json_defaults_and_canonical_form(
    tiny_llama: acteng.Model, vector: acteng.SteeringVector
) -> None:
    read = _reader(tiny_llama, vector)
    assert read({"vector": "happy"}).to_json() == {
        "vector": "happy",
        "coefficient": 1.0,
        "layers": [1, 2, 3],
        "positions": "all",
        "mode": "add",
    }
    # every way of naming layers 2 and 3 writes the same list
    for layers in ([3, 2], [2, -1], "2-3", "2-", "2,3", "-2,-1"):
        assert read({"vector": "happy", "layers": layers}).to_json()["layers"] == [2, 3]
    assert read({"vector": "happy", "layers": -1}).layers == (3,)
    assert read({"vector": "happy", "layers": None}).layers is None


@pytest.mark.parametrize(
    ("obj", "param", "message"),
    [
        ([], "steering[0]", "must be an object"),
        ({"vector": "happy", "weight": 2}, "steering[0]", "unknown field(s) ['weight']"),
        ({"coefficient": 2}, "steering[0]", "vector is missing"),
        ({"vector": 7}, "steering[0].vector", "must be a vector name"),
        ({"vector": "happy", "coefficient": "4"}, "steering[0].coefficient", "must be a number"),
        ({"vector": "happy", "coefficient": 1e9}, "steering[0].coefficient", "finite number"),
        ({"vector": "happy", "layers": [4]}, "steering[0].layers", "layers 0 to 3"),
        ({"vector": "happy", "layers": [0]}, "steering[0]", "not in the vector"),
        ({"vector": "happy", "layers": [2, -2]}, "steering[0].layers", "repeat a layer"),
        ({"vector": "happy", "mode": ["add"]}, "steering[0].mode", "use one of add"),
        ({"vector": "happy", "positions": 3}, "steering[0].positions", "'start:end'"),
        ({"vector": "happy", "positions": "later"}, "steering[0]", "'start:end'"),
    ],
)
def test_from_json_names_the_bad_field(
    tiny_llama: acteng.Model,
    vector: acteng.SteeringVector,
    obj: Any,
    param: str,
    message: str,
) -> None:
    with pytest.raises(RequestError, match="steering\\[0\\]") as caught:
        _reader(tiny_llama, vector)(obj)
    assert caught.value.param == param and caught.value.status == 400
    assert message in str(caught.value)


def test_lookup_errors_pass_through(
    tiny_llama: acteng.Model, vector: acteng.SteeringVector
) -> None:
    with pytest.raises(RequestError, match="no vector named 'sad'") as caught:
        _reader(tiny_llama, vector)({"vector": "sad"})
    assert caught.value.status == 404


def test_a_spec_without_a_name_has_no_json_form(vector: acteng.SteeringVector) -> None:
    with pytest.raises(ConfigError, match="no vector name"):
        SteeringSpec(vector).to_json()
    assert SteeringSpec(vector, name="a") == SteeringSpec(vector, name="b")  # a label only


def test_check_coefficient_is_the_one_check() -> None:
    assert check_coefficient(4) == 4.0
    with pytest.raises(ConfigError, match="c is nan; give a finite number between -3 and 3"):
        check_coefficient(float("nan"), name="c", bound=3)
    with pytest.raises(ConfigError, match="must be a number"):
        check_coefficient(True)


def test_steer_reads_layers_against_the_model(
    tiny_llama: acteng.Model, vector: acteng.SteeringVector
) -> None:
    with acteng.steer(tiny_llama, vector, layers=-1):
        pass
    with pytest.raises(ConfigError, match="negative layers count from the model's last"):
        SteeringSpec(vector, layers=(-1,))


# --- one reader behind every door ------------------------------------------------------
ACCEPTED: list[tuple[Any, tuple[int, ...]]] = [
    (-1, (3,)),
    ("-1", (3,)),
    ("1-2", (1, 2)),
    ("2-", (2, 3)),
    ("1,3", (1, 3)),
    ([3, -2], (2, 3)),
]
REFUSED: list[tuple[Any, str]] = [
    ([9], "out of range"),
    ("9", "out of range"),
    ("one", "cannot read layers"),
    ("1,1", "repeat a layer"),
    ([0], "not in the vector"),
    ([True], "whole numbers"),
    ([], "non-empty list"),
]


def _doors(model: acteng.Model, home: Path) -> dict[str, Any]:
    """For each entry point, a function: layers -> the specs it builds from one item."""
    from acteng.cli.common import build_specs
    from acteng.library import VectorLibrary, load_vector
    from acteng.server.requests import Limits, parse_steering
    from acteng.server.resolve import Resolver
    from acteng.vllm_engine.requests import ModelShape, parse_extra_args

    shape = ModelShape(model.name, model.num_layers, model.hidden_size)
    resolver = Resolver(model, VectorLibrary(home))

    def item(layers: Any) -> dict[str, Any]:
        return {"vector": "happy", "coefficient": 2.0, "layers": layers, "mode": "add"}

    def vllm(layers: Any) -> list[SteeringSpec]:
        parsed = parse_extra_args({"steering": [item(layers)]}, shape, home=str(home))
        assert parsed is not None
        return list(parsed.specs)

    def cli(layers: Any) -> list[SteeringSpec]:
        if not isinstance(layers, str | int):
            pytest.skip("a flag is text")
        return build_specs(model, ["happy:2"], layers=str(layers), positions="all", mode="add")

    def library(layers: Any) -> list[SteeringSpec]:
        def lookup(name: str) -> acteng.SteeringVector:
            return load_vector(name, model=model)

        return [SteeringSpec.from_json(item(layers), lookup, model, where="steering[0]")]

    return {
        "library": library,
        "http": lambda layers: parse_steering([item(layers)], "steering", resolver, Limits()),
        "vllm": vllm,
        "cli": cli,
    }


@pytest.fixture()
def home(
    tiny_llama: acteng.Model,
    vector: acteng.SteeringVector,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Path:
    from acteng.library import VectorLibrary

    VectorLibrary(tmp_path).add("happy", vector)
    monkeypatch.setenv("ACTENG_HOME", str(tmp_path))  # the CLI and load_vector look here
    return tmp_path


@pytest.mark.parametrize("door", ["library", "http", "vllm", "cli"])
@pytest.mark.parametrize(("layers", "expected"), ACCEPTED)
def test_every_door_reads_layers_alike(
    tiny_llama: acteng.Model,
    vector: acteng.SteeringVector,
    home: Path,
    door: str,
    layers: Any,
    expected: tuple[int, ...],
) -> None:
    [spec] = _doors(tiny_llama, home)[door](layers)
    assert spec.to_json() == {
        "vector": "happy",
        "coefficient": 2.0,
        "layers": list(expected),
        "positions": "all",
        "mode": "add",
    }
    # the library's copy of the same numbers
    assert all(torch.equal(spec.vector[x].cpu(), vector[x]) for x in VECTOR_LAYERS)
    assert parse_layers(tiny_llama, layers) == list(expected)


@pytest.mark.parametrize("door", ["library", "http", "vllm", "cli"])
@pytest.mark.parametrize(("layers", "message"), REFUSED)
def test_every_door_refuses_alike(
    tiny_llama: acteng.Model, home: Path, door: str, layers: Any, message: str
) -> None:
    with pytest.raises(RequestError, match="steering\\[0\\]") as caught:
        _doors(tiny_llama, home)[door](layers)
    assert message in str(caught.value)
