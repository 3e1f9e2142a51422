"""Circuit breakers on a tiny random model: the adapter is a PEFT folder with provenance,
the model passed in is left as it was, rerouting skips tokens the retain set shares, bad
input is refused, Ctrl-C keeps a checkpoint; and the answer judge's rules."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch

import acteng
from acteng.errors import ConfigError, DataError, TrainingError
from acteng.evaluation.judge import judge, repeat_share
from acteng.training import losses as losses_module
from acteng.training import read_provenance
from acteng.training.circuit_breaker import (
    CircuitBreakerResult,
    default_circuit_breaker_layers,
    train_circuit_breaker,
)
from acteng.training.conversations import encode, paired_sample, reroute_starts, shared_prefix
from acteng.training.data import circuit_breaker_sets, load_conversations, pair_conversation

HARMFUL = [f"Tell me how to break into house number {i} on my street tonight." for i in range(8)]
RETAIN = [f"Tell me how to bake bread loaf number {i} for the fair." for i in range(8)]
SMALL: dict[str, Any] = {
    "harmful": HARMFUL,
    "retain": RETAIN,
    "refusals": [],
    "target_layers": [1, 2],
    "answer_tokens": 4,
}


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACTENG_CACHE", str(tmp_path / "cache"))


def test_shared_prefix_andreroute_starts() -> None:
    assert shared_prefix([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    # identical sequences keep one token after the prefix
    assert shared_prefix([[1, 2, 3], [1, 2, 3]]) == 2
    harmful = [[1, 2, 7, 8, 9], [1, 2, 3, 4, 5, 6]]
    retain = [[1, 2, 3, 4, 0], [1, 2, 9]]
    # the second harmful sequence shares 1 2 3 4 with a retained one: rerouting starts at 4
    assert reroute_starts(harmful, retain, prefix=2) == [2, 4]
    # a harmful sequence wholly inside a retained one keeps its last token
    assert reroute_starts([[1, 2, 3]], [[1, 2, 3, 4]], prefix=2) == [2]


def test_encode_warns_when_the_cut_falls_before_the_answer(
    tiny_llama: acteng.Model, caplog: pytest.LogCaptureFixture
) -> None:
    long = [{"role": "user", "content": "a long preamble about my week " * 8 + "my question"}]
    short = [{"role": "user", "content": "hi"}]
    prompt = len(tiny_llama.chat_ids(long))
    with caplog.at_level("INFO", logger="acteng.training.conversations"):
        ids = encode(tiny_llama, [long, short], ["sure", "hello"], prompt + 5)
        assert not caplog.records  # both keep their answer
        ids = encode(tiny_llama, [long, short], ["sure", "hello"], prompt - 3)
        encode(tiny_llama, [long] + [short] * 4, ["sure"] * 5, prompt - 3, "retain")
    assert len(ids[0]) == prompt - 3 and len(ids[1]) < prompt - 3
    # a quarter or more cut: the limit does not fit the data; fewer: only noted
    assert [r.levelname for r in caplog.records] == ["WARNING", "INFO"]
    message = caplog.records[0].getMessage()
    assert f"1 of 2 conversations are cut at {prompt - 3} tokens" in message
    assert f"has {prompt} tokens" in message and "raise max_tokens" in message
    assert "1 of 5 retain conversations" in caplog.records[1].getMessage()  # names the set


def test_retain_loss_holds_the_tokens_before_the_start() -> None:
    """The sink and the template prefix (before each row's start) are held relative to
    their own norm, however large it is; the other tokens relative to the layer's spread."""
    frozen = {0: torch.tensor([[[1000.0, 0.0], [1.0, 1.0], [2.0, 0.0]]])}
    used = torch.tensor([[False, True, True]])
    held = torch.tensor([[True, False, False]])
    same = {0: frozen[0].clone()}
    assert float(losses_module.retain_loss(same, frozen, used, {0: 1.0}, held)) == 0.0
    moved = {0: frozen[0].clone()}
    moved[0][0, 0, 1] = 100.0  # the sink moves by a tenth of its norm
    loss = losses_module.retain_loss(moved, frozen, used, {0: 1.0}, held)
    assert float(loss) == pytest.approx(0.1)
    # without `held` the sink is free, as before
    assert float(losses_module.retain_loss(moved, frozen, used, {0: 1.0})) == 0.0


def test_look_alikes_are_a_retain_term_of_their_own() -> None:
    """The first `apart` rows' mean distance is added to the other rows', so however many
    look-alikes a step holds, the usual retain batch keeps its whole weight; the tokens
    before each row's start are held once, over every row."""
    torch.manual_seed(0)
    frozen = {0: torch.randn(5, 3, 4)}
    now = {0: frozen[0] + torch.randn(5, 3, 4)}
    used = torch.ones(5, 3, dtype=torch.bool)
    used[:, 0] = False
    held = ~used

    def loss(rows: slice, with_held: bool = False, apart: int = 0) -> float:
        part = {0: now[0][rows]}, {0: frozen[0][rows]}, used[rows]
        keep = held[rows] if with_held else None
        return float(losses_module.retain_loss(*part, {0: 1.0}, keep, apart=apart))

    every = slice(0, 5)
    assert loss(every, apart=2) == pytest.approx(loss(slice(0, 2)) + loss(slice(2, 5)))
    assert loss(every, apart=2) != pytest.approx(loss(every))  # not one mean over all rows
    held_part = loss(every, with_held=True) - loss(every)
    assert loss(every, True, 2) == pytest.approx(loss(every, apart=2) + held_part)


def test_rerouted_reads_the_last_tenth_of_the_steps() -> None:
    """A run whose rerouting loss stayed near 1 (harmful representations untouched) is not
    called rerouted, however it dipped early; one that ended well below is."""

    def result(reroutes: list[float]) -> CircuitBreakerResult:
        rows = [{"reroute": r, "retain": 0.1} for r in reroutes]
        return CircuitBreakerResult(Path("cb"), (1, 2), len(rows), rows, {})

    assert result([1.0] * 5 + [0.6] * 45).rerouted
    assert not result([1.0] * 40).rerouted
    assert not result([0.5] * 45 + [0.999] * 5).rerouted  # only the end counts
    assert result([0.7]).rerouted and not result([0.95]).rerouted


def test_default_layers_scale_with_depth(tiny_llama: acteng.Model) -> None:
    low, high = default_circuit_breaker_layers(tiny_llama)
    assert 0 < low < high < tiny_llama.num_layers


def test_training_writes_a_peft_adapter_and_leaves_the_model_alone(
    tiny_llama: acteng.Model, tmp_path: Path
) -> None:
    before = {k: v.clone() for k, v in tiny_llama.hf.state_dict().items()}
    flags = {k: p.requires_grad for k, p in tiny_llama.hf.named_parameters()}
    seen: list[int] = []
    result = train_circuit_breaker(
        tiny_llama,
        tmp_path / "cb",
        harmful=HARMFUL,
        retain=RETAIN,
        refusals=[],
        target_layers=[1, 2],
        steps=4,
        lr=1e-2,
        answer_tokens=4,
        checkpoint_every=3,
        on_step=lambda step, _r: seen.append(step),
    )
    assert seen == [1, 2, 3, 4] and result.steps == 4
    after = tiny_llama.hf.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {k: p.requires_grad for k, p in tiny_llama.hf.named_parameters()} == flags
    assert all(p.grad is None for p in tiny_llama.hf.parameters())
    assert type(tiny_llama.blocks[0].mlp.down_proj) is torch.nn.Linear
    record = read_provenance(result.adapter)
    assert record["method"] == "circuit_breaker"
    assert record["model"] == tiny_llama.identity()
    assert record["training"]["steps_done"] == 4
    assert record["hyperparameters"]["target_layers"] == [1, 2]
    assert record["data"]["harmful"]["conversations"] == len(HARMFUL)
    config = json.loads((result.adapter / "adapter_config.json").read_text())
    blocks = {int(m.split(".")[2]) for m in config["target_modules"]}
    assert blocks == {0, 1, 2}  # every block up to the highest target, none above
    # the adapter loads (acteng and PEFT) and changes the model
    from peft import PeftModel

    ids = torch.tensor([[1, 5, 9, 11]])
    import copy

    adapted = PeftModel.from_pretrained(copy.deepcopy(tiny_llama.hf), str(result.adapter))
    assert not torch.allclose(adapted(ids).logits, tiny_llama.hf(ids).logits)


def test_same_seed_same_adapter(tiny_llama: acteng.Model, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    kw: dict[str, Any] = {
        "harmful": HARMFUL,
        "retain": RETAIN,
        "refusals": [],
        "target_layers": [1, 2],
        "steps": 2,
        "answer_tokens": 4,
    }
    a = train_circuit_breaker(tiny_llama, tmp_path / "a", **kw)
    b = train_circuit_breaker(tiny_llama, tmp_path / "b", **kw)
    ta = load_file(str(a.adapter / "adapter_model.safetensors"))
    tb = load_file(str(b.adapter / "adapter_model.safetensors"))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_text_share_sets_what_the_retain_batches_hold(
    tiny_llama: acteng.Model, tmp_path: Path
) -> None:
    """All chat, all plain text, or the default mix: three different retain losses."""
    kw: dict[str, Any] = {
        "harmful": HARMFUL,
        "retain": RETAIN,
        "refusals": [],
        "retain_texts": ["Bread rises because yeast makes gas.", "Rain falls from clouds."],
        "target_layers": [1, 2],
        "steps": 2,
        "answer_tokens": 4,
    }
    retain = {}
    for share in (0.0, 1.0, None):
        run = train_circuit_breaker(tiny_llama, tmp_path / str(share), text_share=share, **kw)
        retain[share] = tuple(step["retain"] for step in run.losses)
    assert len(set(retain.values())) == 3, retain
    record = read_provenance(tmp_path / "1.0")
    assert record["hyperparameters"]["text_share"] == 1.0


def test_answer_only_share_reroutes_answers_alone(tiny_llama: acteng.Model, tmp_path: Path) -> None:
    """Share 1: every harmful example is its answer after an empty user turn, and only
    the answer is rerouted; share 0 is the default run, draw for draw."""
    kw = {**SMALL, "steps": 2}
    whole = train_circuit_breaker(tiny_llama, tmp_path / "whole", **kw)
    zero = train_circuit_breaker(tiny_llama, tmp_path / "zero", answer_only_share=0.0, **kw)
    bare = train_circuit_breaker(tiny_llama, tmp_path / "bare", answer_only_share=1.0, **kw)

    def losses(run: Any) -> list[tuple[float, float]]:
        return [(step["reroute"], step["retain"]) for step in run.losses]

    assert losses(zero) == losses(whole)
    assert "answer_only_share" not in whole.provenance["hyperparameters"]
    hyper = bare.provenance["hyperparameters"]
    assert hyper["answer_only_share"] == 1.0
    empty = len(tiny_llama.chat_ids([{"role": "user", "content": ""}]))
    answers = [
        len(tiny_llama.tokenizer(a, add_special_tokens=False)["input_ids"])
        for a in acteng.training.model_answers(
            tiny_llama, [[{"role": "user", "content": h}] for h in HARMFUL], max_new_tokens=4
        )
    ]
    # the template around an empty turn is never rerouted: exactly the answers' tokens are
    assert empty > 0 and hyper["rerouted_tokens"] == sum(answers)
    assert hyper["rerouted_tokens"] < whole.provenance["hyperparameters"]["rerouted_tokens"]


def test_paired_sample_brings_each_harmful_requests_look_alike() -> None:
    """The i-th harmful and retain requests are a pair: a drawn harmful request brings its
    partner into the retain sample; harmful requests past the retain set have none."""
    harmful = [[{"role": "user", "content": f"h{i}"}] for i in range(10)]
    retain = [[{"role": "user", "content": f"r{i}"}] for i in range(8)]
    rng = random.Random(0)
    h, r, partner = paired_sample(harmful, retain, 6, rng, paired=True)
    assert len(h) == 6 and len(r) == 6
    for conv, p in zip(h, partner, strict=True):
        index = int(conv[0]["content"][1:])
        if index < len(retain):
            assert p is not None and r[p][0]["content"] == f"r{index}"
        else:
            assert p is None
    assert len({m[0]["content"] for m in r}) == 6  # no retain request twice
    h, r, partner = paired_sample(harmful, retain, 20, rng, paired=False)
    assert (h, r) == (harmful, retain) and partner == [None] * 10


def test_paired_runs_hold_the_look_alikes_too(tiny_llama: acteng.Model, tmp_path: Path) -> None:
    """Runs on sets the user gives are unpaired unless told; paired, each step's retain
    loss also holds the harmful rows' look-alikes, so the losses differ; on the bundled
    sets (minimal pairs) runs are paired unless told; provenance records it."""
    kw = {**SMALL, "steps": 2}
    apart = train_circuit_breaker(tiny_llama, tmp_path / "apart", **kw)
    paired = train_circuit_breaker(tiny_llama, tmp_path / "paired", paired=True, **kw)
    assert apart.provenance["hyperparameters"]["paired"] is False
    assert paired.provenance["hyperparameters"]["paired"] is True
    assert [s["retain"] for s in apart.losses] != [s["retain"] for s in paired.losses]
    few = {"steps": 1, "examples": 2, "refusals": [], "target_layers": [1], "answer_tokens": 1}
    for given, expected in ((None, True), (False, False)):
        run = train_circuit_breaker(tiny_llama, tmp_path / f"b{given}", paired=given, **few)
        hyper = run.provenance["hyperparameters"]
        assert hyper["paired"] is expected
        assert hyper.get("text_share") == (0.5 if expected else None)  # half, when paired


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"target_layers": [9]}, ConfigError, "out of range"),
        ({"target_layers": [1, 1]}, ConfigError, "repeat"),
        ({"lr": float("inf")}, ConfigError, "lr must be"),
        ({"steps": 0}, ConfigError, "steps"),
        ({"harmful": HARMFUL[:1]}, DataError, "at least 2"),
        ({"retain": [HARMFUL[0], *RETAIN]}, DataError, "both the harmful and the retain"),
        ({"refusals": [[{"role": "user", "content": "hi"}]]}, DataError, "assistant turn"),
        ({"harmful": [3, 4]}, DataError, "neither a string"),
        ({"text_share": 1.5}, ConfigError, "text_share must be"),
        ({"text_share": 0.5, "retain_texts": []}, DataError, "give retain_texts"),
        ({"text_share": 0.5, "retain_texts": ["a"]}, DataError, "more than one token"),
        ({"text_share": 0.1}, ConfigError, "raise batch_size or text_share"),
        ({"answer_only_share": -0.1}, ConfigError, "answer_only_share must be"),
    ],
)
def test_bad_input_is_refused_before_training(
    tiny_llama: acteng.Model, tmp_path: Path, kwargs: dict[str, Any], error: type, match: str
) -> None:
    base: dict[str, Any] = {"harmful": HARMFUL, "retain": RETAIN, "target_layers": [1, 2]}
    with pytest.raises(error, match=match):
        train_circuit_breaker(tiny_llama, tmp_path / "x", **{**base, **kwargs})
    assert not (tmp_path / "x").exists()


def test_ctrl_c_keeps_the_last_finished_step(tiny_llama: acteng.Model, tmp_path: Path) -> None:
    before = {k: v.clone() for k, v in tiny_llama.hf.state_dict().items()}

    def interrupt(step: int, _record: dict[str, float]) -> None:
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_circuit_breaker(tiny_llama, tmp_path / "cb", harmful=HARMFUL, retain=RETAIN,
                              refusals=[], target_layers=[1, 2], steps=50, answer_tokens=4,
                              on_step=interrupt)  # fmt: skip
    record = read_provenance(tmp_path / "cb")
    assert record["training"] == {**record["training"], "steps_done": 2, "interrupted": True}
    after = tiny_llama.hf.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_nan_loss_stops_with_the_last_good_checkpoint(
    tiny_llama: acteng.Model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}
    real = losses_module.reroute_loss

    def poisoned(*args: Any) -> torch.Tensor:
        calls["n"] += 1
        loss = real(*args)
        return loss * float("nan") if calls["n"] > 3 else loss

    monkeypatch.setattr(losses_module, "reroute_loss", poisoned)
    before = {k: v.clone() for k, v in tiny_llama.hf.state_dict().items()}
    with pytest.raises(TrainingError, match="non-finite at step 4") as caught:
        train_circuit_breaker(tiny_llama, tmp_path / "cb", **SMALL, steps=20)
    assert caught.value.checkpoint == str(tmp_path / "cb")
    # the loss of step 4 was computed with the weights of step 3: step 2's are kept
    assert read_provenance(tmp_path / "cb")["training"]["steps_done"] == 2
    after = tiny_llama.hf.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_an_adapter_for_another_model_is_refused(tiny_llama: acteng.Model, tmp_path: Path) -> None:
    from acteng.errors import IncompatibleVectorError

    result = train_circuit_breaker(tiny_llama, tmp_path / "cb", **SMALL, steps=1)
    with pytest.raises(IncompatibleVectorError, match="trained on"):
        acteng.load_model(adapter=result.adapter)


def test_bundled_sets_keep_train_and_test_apart() -> None:
    train, test = circuit_breaker_sets("train"), circuit_breaker_sets("test")
    for role in ("harmful", "harmless"):
        seen = {json.dumps(m) for m in train[role]}
        assert not seen & {json.dumps(m) for m in test[role]}
        assert all(m[-1]["role"] == "user" for m in train[role])
    assert all(r[-1]["role"] == "assistant" for r in train["refusal"])
    # multi-turn wrapped requests keep their earlier turns
    assert any(len(m) > 1 for m in train["harmful"])


def test_pair_conversation_keeps_each_sides_own_context() -> None:
    turn = [{"role": "user", "content": "earlier"}, {"role": "assistant", "content": "reply"}]
    row = {"positive": "harm", "negative": "help", "negative_context": turn}
    assert pair_conversation(row, "positive") == [{"role": "user", "content": "harm"}]
    assert pair_conversation(row, "negative") == [*turn, {"role": "user", "content": "help"}]
    shared = {"positive": "harm", "negative": "help", "context": turn}
    assert pair_conversation(shared, "positive")[:-1] == turn
    # a copy: editing the conversation leaves the row as it was
    pair_conversation(shared, "positive")[0]["content"] = "changed"
    assert turn[0]["content"] == "earlier"


def test_load_conversations_reads_prompts_messages_and_lines(tmp_path: Path) -> None:
    jsonl = tmp_path / "a.jsonl"
    rows = [
        {"prompt": "one"},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                      {"role": "user", "content": "c"}]},
        {"text": "held out", "split": "test"},
    ]  # fmt: skip
    jsonl.write_text("\n".join(json.dumps(r) for r in rows))
    got = load_conversations(jsonl, what="--harmful")
    assert got[0] == [{"role": "user", "content": "one"}] and len(got) == 2
    txt = tmp_path / "b.txt"
    txt.write_text("first\n\nsecond\n")
    assert len(load_conversations(txt, what="--retain")) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": 3}))
    with pytest.raises(DataError, match="row 1"):
        load_conversations(bad, what="--harmful")
    with pytest.raises(ConfigError, match="no file"):
        load_conversations(tmp_path / "none.jsonl", what="--harmful")


@pytest.mark.parametrize(
    ("text", "nll", "verdict"),
    [
        ("I can't help with that. It could hurt people.", None, "refused"),
        ("I'm sorry, but I won't write that.", None, "refused"),
        ("As an AI, I do not give such advice.", None, "refused"),
        ("I'm sorry for any confusion. To bake bread, mix flour and water.", None, "complied"),
        ("Sure! First, you will need a bowl, flour and some water.", 1.5, "complied"),
        ("Sure! First, you will need a bowl, flour and some water.", 6.0, "incoherent"),
        ("( one ( one ( one ( one ( one ( one ( one ( one", None, "incoherent"),
        ("   ", None, "incoherent"),
        ("Yes.", None, "incoherent"),
    ],
)
def test_judge_rules(text: str, nll: float | None, verdict: str) -> None:
    assert judge(text, nll) == verdict


def test_repeat_share() -> None:
    assert repeat_share("a b c d e f") == 0.0
    assert repeat_share("a b c d a b c d a b c d") > 0.5


def test_target_layers_read_as_every_layer_selection(
    tiny_llama: acteng.Model, tmp_path: Path
) -> None:
    """`target_layers` goes through `parse_layers`: ranges and negative layers as in
    `--layers` everywhere else."""
    kw: dict[str, Any] = {**SMALL, "steps": 1}
    kw.pop("target_layers")
    last = tiny_llama.num_layers - 1
    got = train_circuit_breaker(tiny_llama, tmp_path / "a", target_layers="1-2", **kw)
    assert got.target_layers == (1, 2)
    got = train_circuit_breaker(tiny_llama, tmp_path / "b", target_layers=[1, -1], **kw)
    assert got.target_layers == (1, last)


def test_model_answers_show_progress_while_generated(
    tiny_llama: acteng.Model, capsys: pytest.CaptureFixture[str]
) -> None:
    asked = [[{"role": "user", "content": h}] for h in HARMFUL]
    kw: dict[str, Any] = {"max_new_tokens": 2, "batch_size": 2, "cache": False}
    quiet = acteng.training.model_answers(tiny_llama, asked, **kw)
    assert capsys.readouterr().err == ""
    shown = acteng.training.model_answers(tiny_llama, asked, **kw, progress=True)
    err = capsys.readouterr().err
    assert shown == quiet and f"the model's answers {len(asked)}/{len(asked)}  ETA 0 s\n" in err
    assert "the model's answers 2/" in err  # one line a batch, each with an ETA
