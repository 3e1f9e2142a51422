"""Read spans and steering position masks."""

import pytest
import torch

from acteng.errors import ConfigError
from acteng.positions import Positions, parse_positions, read_span


def test_parse() -> None:
    assert parse_positions(None) == Positions()
    assert parse_positions("generated").kind == "generated"
    assert parse_positions("-1:") == Positions("window", -1, None)
    assert parse_positions("2:5") == Positions("window", 2, 5)
    assert str(parse_positions(":4")) == ":4"
    for bad in ("middle", "1-3", "5:2"):
        with pytest.raises(ConfigError):
            parse_positions(bad)


def test_masks() -> None:
    # row 0: 2 pads then 4 prompt tokens; row 1: 6 prompt tokens; then a decoding step.
    index = torch.tensor([[-1, -1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5]])
    plen = torch.tensor([4, 6])
    assert Positions("all").mask(index, plen).tolist() == (index >= 0).tolist()
    assert Positions("prompt").mask(index, plen)[0].tolist() == [0, 0, 1, 1, 1, 1]
    assert not Positions("generated").mask(index, plen).any()
    step = torch.tensor([[4], [6]])
    assert Positions("generated").mask(step, plen).all()
    assert not Positions("prompt").mask(step, plen).any()
    last = parse_positions("-1:")
    assert last.mask(index, plen)[0].tolist() == [0, 0, 0, 0, 0, 1]
    assert last.mask(step, plen).all()
    first_two = parse_positions("0:2")
    assert first_two.mask(index, plen)[1].tolist() == [1, 1, 0, 0, 0, 0]


def test_read_span() -> None:
    text = "Q: pick one<A>(B)"
    offsets = [(0, 2), (2, 7), (7, 11), (11, 14), (14, 15), (15, 16), (16, 17)]
    assert read_span(offsets, "last").start == 6
    span = read_span(offsets, "mean", completion_start=14, text=text)
    assert (span.start, span.end) == (4, 7)
    answer = read_span(offsets, "answer", completion_start=14, text=text)
    assert (answer.start, answer.end) == (5, 6)
    with pytest.raises(ConfigError, match="unknown read position"):
        read_span(offsets, "first")
    with pytest.raises(ConfigError, match="letter or digit"):
        read_span([(0, 1), (1, 2)], "answer", completion_start=1, text="x(")
