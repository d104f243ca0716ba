import re

import pytest
import torch

from charlm import UserError
from charlm.data.vocab import CharVocab
from charlm.infer.generation import (
    GenerationConfig,
    Stepper,
    generate,
    next_token,
    sample_text,
    start_ids,
    stream_text,
    unescape,
)
from tests.conftest import rnn

VOCAB = CharVocab.from_text("abcdefghij ", unk="?")
GREEDY = GenerationConfig(temperature=0)


@pytest.fixture
def net():
    torch.manual_seed(0)
    return rnn(len(VOCAB), cell="lstm", num_layers=2, hidden_size=32).eval()


def naive_greedy(net, ids: list[int], length: int) -> list[int]:
    """Re-feed the whole context every step: the slow reference the stateful sampler must equal."""
    out = list(ids)
    for _ in range(length):
        logits, _ = net(torch.tensor([out]))
        out.append(int(logits[0, -1].argmax()))
    return out[len(ids) :]


def test_stateful_generation_equals_refeeding_the_context(net):
    prompt = "abc def"
    fast = torch.stack(list(generate(net, VOCAB, prompt, 40, GREEDY)), 1)[0].tolist()
    assert fast == naive_greedy(net, VOCAB.encode(prompt).tolist(), 40)


def test_batched_samples_match_single_runs_and_are_reproducible(net):
    greedy = sample_text(net, VOCAB, "ab", 30, GREEDY, num_samples=3)
    assert len(set(greedy)) == 1 and greedy[0] == sample_text(net, VOCAB, "ab", 30, GREEDY)[0]
    a = sample_text(net, VOCAB, "ab", 30, num_samples=4, generator=torch.Generator().manual_seed(1))
    b = sample_text(net, VOCAB, "ab", 30, num_samples=4, generator=torch.Generator().manual_seed(1))
    assert a == b and len(set(a)) > 1  # same seed, same text; samples in a batch differ


def test_samples_start_with_prompt_and_have_requested_length(net):
    for prompt in ("hello", ""):
        (text,) = sample_text(net, VOCAB, prompt, 25, unknown="skip", generator=torch.Generator().manual_seed(0))
        assert text.startswith(prompt) and len(text) == len(prompt) + 25
        assert set(text[len(prompt) :]) <= set(VOCAB.chars)


def test_top_k_and_top_p_restrict_the_choices():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]]).expand(2000, -1)
    g = torch.Generator().manual_seed(0)
    assert set(next_token(logits, 1.0, top_k=2, generator=g).tolist()) == {0, 1}
    # softmax mass: 0.64, 0.23, 0.09, ... -> top_p=0.8 keeps the first two
    assert set(next_token(logits, 1.0, top_p=0.8, generator=g).tolist()) == {0, 1}
    assert set(next_token(logits, 1.0, top_k=1, generator=g).tolist()) == {0}
    assert set(next_token(logits, 0.0).tolist()) == {0}
    assert set(next_token(logits, 1.0, generator=g).tolist()) == {0, 1, 2, 3, 4}


def test_low_temperature_sharpens():
    logits = torch.tensor([[1.0, 0.0]]).expand(4000, -1)
    g = torch.Generator().manual_seed(0)
    hot = (next_token(logits, 2.0, generator=g) == 0).float().mean()
    cold = (next_token(logits, 0.25, generator=g) == 0).float().mean()
    assert 0.55 < hot < 0.7 and cold > 0.95


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"length": -1}, "length=-1 must be a whole number >= 0"),
        ({"length": 2.5}, "length=2.5 must be a whole number"),
        ({"num_samples": 0}, "num_samples=0 must be a whole number >= 1"),
        ({"prompt": "xyz"}, "not in the vocab"),
        ({"unknown": "ignore"}, "unknown='ignore' is not known; use one of error, unk, skip."),
        ({"quantize": "int4"}, "quantize='int4' is not known"),
    ],
)
def test_bad_generation_arguments_fail_before_any_output(net, kwargs, match):
    with pytest.raises(UserError, match=re.escape(match)):
        generate(net, VOCAB, **{"prompt": "ab", **kwargs})  # raised on the call, not on the first next()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"temperature": -1.0}, "temperature=-1.0 must be >= 0"),
        ({"temperature": float("nan")}, "temperature=nan must be >= 0; e.g. temperature=0.8."),
        ({"temperature": float("inf")}, "temperature=inf must be >= 0"),
        ({"top_k": -2}, "top_k=-2 must be a whole number >= 0"),
        ({"top_k": 1.5}, "top_k=1.5 must be a whole number >= 0"),
        ({"top_p": 0.0}, "top_p=0.0 must be in (0, 1]"),
        ({"top_p": 1.5}, "top_p=1.5 must be in (0, 1]"),
        ({"temperature": True}, "temperature=True must be >= 0"),
    ],
)
def test_bad_sampling_settings_are_refused_on_construction(kwargs, match):
    with pytest.raises(UserError, match=re.escape(match)):
        GenerationConfig(**kwargs)


def test_unknown_prompt_characters_policies(net):
    """``error`` names the character; ``skip`` feeds the prompt without it; ``unk`` feeds the unk id in its place.
    What reaches the network decides the continuation, so each policy must sample what its prompt ids sample."""
    a, b, unk = (VOCAB.chars.index(c) for c in "ab?")
    assert VOCAB.encode("aXb", unknown="skip").tolist() == start_ids(VOCAB, "aXb", "skip") == [a, b]
    assert VOCAB.encode("aXb", unknown="unk").tolist() == start_ids(VOCAB, "aXb", "unk") == [a, unk, b]
    for refuse in (lambda: VOCAB.encode("aXb"), lambda: generate(net, VOCAB, "aXb", 5)):
        with pytest.raises(UserError, match="not in the vocab: 'X'"):
            refuse()
    with pytest.raises(UserError, match="unk character"):
        generate(net, CharVocab.from_text("abcdefghij "), "aXb", 5, unknown="unk")  # a vocab without unk

    fed, first = [], []  # per generation: the prompt batch [N, P] and the logits [N, V] of the first new character

    def record(module, args, out) -> None:
        fed.append(args[0])
        first.append(out[0][:, -1])

    hook = net.register_forward_hook(record)
    sampled = {}
    for prompt, policy in (("aXb", "skip"), ("ab", "error"), ("aXb", "unk"), ("a?b", "error")):
        ids = generate(net, VOCAB, prompt, 40, GenerationConfig(temperature=1.0), unknown=policy, generator=seeded())
        sampled[prompt, policy] = torch.stack(list(ids), 1)[0].tolist()
    hook.remove()
    assert [x.tolist() for x in fed] == [[[a, b]], [[a, b]], [[a, unk, b]], [[a, unk, b]]]
    # skip continues as if X was never typed, unk as if "?" was, and the two states differ
    assert sampled["aXb", "skip"] == sampled["ab", "error"] and sampled["aXb", "unk"] == sampled["a?b", "error"]
    assert torch.equal(first[0], first[1]) and torch.equal(first[2], first[3])
    assert not torch.allclose(first[0], first[2])
    # the text keeps the prompt as typed, whatever the policy
    for policy in ("skip", "unk"):
        (text,) = sample_text(net, VOCAB, "aXb", 5, GREEDY, unknown=policy)
        assert text.startswith("aXb") and len(text) == 8


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(
    "kw",
    [
        {"cell": "lstm"},
        {"cell": "gru"},
        {"cell": "rnn_tanh", "embedding_size": 0, "tie_weights": False},  # one-hot input
        {"cell": "rnn_relu", "tie_weights": False},  # untied (the default ties)
        {"cell": "lstm", "impl": "scratch", "layer_norm": True},
        {"cell": "gru", "impl": "scratch", "layer_norm": True, "num_layers": 3},
    ],
)
def test_fast_step_equals_a_one_character_forward(kw):
    torch.manual_seed(0)
    net = rnn(len(VOCAB), **({"num_layers": 2, "hidden_size": 24} | kw)).eval()
    step = Stepper(net)
    ids = torch.tensor([0, 5, 9])
    state = torch.randn(net.state_slots, net.num_layers, 3, 24)
    with torch.no_grad():
        expected_logits, expected_state = net(ids[:, None], state)
    logits, new_state = step(ids, state)
    torch.testing.assert_close(logits, expected_logits[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(new_state, expected_state, atol=1e-5, rtol=1e-5)


def test_generation_gives_the_same_text_as_stepping_the_forward_pass(net):
    """generate() steps through the cell equations; stepping net.forward one character at a time (the slow
    path it replaced) must produce the very same sampled characters."""
    prompt, length = "abc", 300
    fast = torch.stack(list(generate(net, VOCAB, prompt, length, generator=seeded(3))), 1)  # GenerationConfig()
    g = seeded(3)
    slow = []
    with torch.no_grad():
        logits, state = net(torch.tensor([VOCAB.encode(prompt).tolist()]))
        for _ in range(length):
            ids = next_token(logits[:, -1], GenerationConfig().temperature, generator=g)
            slow.append(ids)
            logits, state = net(ids[:, None], state)
    assert fast[0].tolist() == torch.stack(slow, 1)[0].tolist()


def test_stop_ends_each_stream_at_its_first_stop_text_and_nothing_else_changes(net):
    gen = lambda: torch.Generator().manual_seed(6)  # noqa: E731
    free = sample_text(net, VOCAB, "ab", 60, num_samples=6, generator=gen())
    stopped = sample_text(net, VOCAB, "ab", 60, GenerationConfig(stop=" a"), num_samples=6, generator=gen())
    hits = 0
    for whole, cut in zip(free, stopped, strict=True):
        at = whole.find(" a", 1)  # the first occurrence a generated character completes ("ab" holds none)
        expected = whole if at < 0 else whole[: at + 2]
        assert cut == expected
        hits += at >= 0
    assert 0 < hits < 6  # the seed gives streams that stop and streams that run to `length`


def test_stop_text_may_begin_in_the_prompt_and_generation_ends_when_every_stream_stopped(net):
    (first,) = sample_text(net, VOCAB, "ab", 1, GREEDY)
    stop = "b" + first[-1]  # completed by the first generated character, begun by the prompt
    pieces = list(stream_text(net, VOCAB, "ab", 50, GenerationConfig(temperature=0, stop=stop), num_samples=2))
    assert len(pieces) == 2  # the prompt, one character: no further steps were computed
    assert ["".join(p) for p in zip(*pieces, strict=True)] == [first, first]


@pytest.mark.parametrize("stop", ["", 3])
def test_a_bad_stop_text_is_a_one_line_error(stop):
    with pytest.raises(UserError, match="must be non-empty text"):
        GenerationConfig(stop=stop)


@pytest.mark.parametrize(
    ("typed", "meant"),
    [
        (r"\n\n", "\n\n"),  # 'stop="\n\n"' on the command line: a blank line
        (r"a\tb", "a\tb"),
        (r"a\\n", "a\\n"),  # an escaped backslash: a backslash, then n
        (r"\\\n", "\\\n"),
        (r"C:\dir\q", r"C:\dir\q"),  # other escapes keep their backslash
        ("ends\\", "ends\\"),
        ("plain", "plain"),
    ],
)
def test_command_line_text_decodes_newline_tab_and_backslash_escapes(typed, meant):
    assert unescape(typed) == meant


@pytest.mark.parametrize("cell", ["lstm", "gru", "minlstm"])
def test_an_int8_step_stays_close_to_the_exact_step_and_generates(cell):
    torch.manual_seed(0)
    net = rnn(len(VOCAB), cell=cell, num_layers=2, hidden_size=64).eval()
    ids, state = torch.tensor([0, 5, 9]), torch.randn(net.state_slots, 2, 3, 64) * 0.5
    exact, exact_state = Stepper(net)(ids, state)
    int8, int8_state = Stepper(net, "int8")(ids, state)
    assert not torch.equal(int8, exact)  # the int8 path really runs
    torch.testing.assert_close(int8, exact, atol=0.02 * exact.abs().max().item(), rtol=0)
    torch.testing.assert_close(int8_state, exact_state, atol=0.02, rtol=0)
    text = sample_text(net, VOCAB, "abc", 30, GREEDY, quantize="int8")[0]
    assert text.startswith("abc") and len(text) == 33


def test_an_unknown_quantize_is_a_one_line_error(net):
    with pytest.raises(UserError, match="quantize='int4' is not known; use quantize=none"):
        generate(net, VOCAB, "ab", 5, quantize="int4")
