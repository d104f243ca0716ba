"""init_from: a new run from another run's weights, on a corpus that may have characters the old vocab lacks."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from charlm import UserError, user_error_in
from charlm.cli import train
from charlm.config import build
from charlm.data.vocab import ByteVocab, CharVocab
from charlm.infer.generation import GenerationConfig, sample_text
from charlm.training.module import load_checkpoint
from tests.conftest import ROOT, compose_train, make_text, run_train, tiny_overrides

NEW = "QZ"  # corpus B's characters that corpus A (make_text) lacks; A's "a" and "b" are not in B


@pytest.fixture(scope="module")
def corpus_b(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus_b") / "b.txt"
    path.write_text(make_text(seed=1).replace("a", NEW[0]).replace("b", NEW[1]), encoding="utf-8")
    return path


QUIET = ("test=false", "sample_length=0", "logger=none")  # what these tests do not read


def overrides(corpus: Path, out: Path, *extra: str) -> list[str]:
    """``tiny_overrides`` without its model.* settings: init_from brings the architecture."""
    return [o for o in tiny_overrides(corpus, out, *extra) if not o.startswith("model.")]


def short_run(corpus: Path, out: Path, *extra: str) -> Path:
    """A run of a few steps; its best checkpoint."""
    steps = ("trainer.max_epochs=1", "trainer.limit_train_batches=5", *QUIET)
    train(compose_train(tiny_overrides(corpus, out, *steps, *extra)))
    return out / "checkpoints" / "best.ckpt"


def val_loss(net, tokens) -> float:
    """Mean NLL of ``tokens`` read as one sequence, in eval mode."""
    net.eval()
    x = torch.as_tensor(tokens.astype("int64"))[None]
    with torch.no_grad():
        logits, _ = net(x[:, :-1])
    return float(F.cross_entropy(logits[0], x[0, 1:]))


def test_an_extended_vocab_keeps_its_ids_and_reads_back_in_their_order():
    old = CharVocab("cab", unk=None)
    grown = old.extend(CharVocab("ebd", unk="\ufffd"))
    assert grown.chars == ["a", "b", "c", "d", "e", "\ufffd"] and grown.unk == "\ufffd"
    older = CharVocab("xyz").extend(CharVocab("ab"))  # new characters before the old ones in code-point order
    assert older.chars[:3] == ["x", "y", "z"] and CharVocab.from_dict(older.to_dict()) == older
    assert older.decode(older.encode("zab")) == "zab" and list(older.encode("xa")) == [0, 3]


@pytest.mark.parametrize("tied", [True, False])
def test_old_rows_are_bit_identical_and_new_characters_get_fresh_rows(tiny_run, corpus_b, tmp_path, tied):
    source = (
        tiny_run.out / "checkpoints" / "best.ckpt"
        if tied
        else short_run(tiny_run.corpus, tmp_path / "src", "model.tie_weights=false")
    )
    start = load_checkpoint(source)
    dm, model, _ = build(compose_train(overrides(corpus_b, tmp_path / "ft", f"init_from={source}")))
    old, net, v = start.net, model.net, len(start.vocab)
    assert dm.vocab.chars[:v] == start.vocab.chars  # "a" and "b", which B lacks, kept their ids too
    assert set(dm.vocab.chars[v:]) == set(NEW)
    assert "".join(dm.vocab.chars) == dm.vocab.decode(range(len(dm.vocab)))
    assert net.decoder.weight.shape[0] == v + len(NEW) and (net.decoder.weight is net.embedding.weight) == tied
    for name in ("embedding.weight", "decoder.weight", "decoder.bias"):
        grown, saved = net.get_parameter(name), old.get_parameter(name)
        assert torch.equal(grown[:v], saved), name
        assert grown[v:].abs().sum() > 0 and not torch.equal(grown[v], grown[v + 1]), name  # fresh, not zeros
    for name, tensor in old.state_dict().items():
        if tensor.shape == net.state_dict()[name].shape:
            assert torch.equal(net.state_dict()[name], tensor), name
    # The corpus is encoded in the extended vocab: B's text reads back through the fine-tuned model's ids.
    text = make_text(seed=1).replace("a", NEW[0]).replace("b", NEW[1])
    assert dm.vocab.decode(dm.parts["train"][:200]) == text[:200]


def test_a_model_fine_tuned_onto_new_characters_learns_and_samples_them(tiny_run, corpus_b, tmp_path):
    source = tiny_run.out  # a run directory: its best.ckpt
    given = overrides(corpus_b, tmp_path / "ft", f"init_from={source}", *QUIET)
    dm, model, _ = build(compose_train(given))
    before = val_loss(model.net, dm.parts["val"])
    train(compose_train(given))
    tuned = load_checkpoint(tmp_path / "ft" / "checkpoints" / "best.ckpt")
    after = val_loss(tuned.net, dm.parts["val"])
    assert after < before - 0.3, (before, after)
    assert tuned.hparams.init_from == str(source / "checkpoints" / "best.ckpt")
    assert tuned.vocab == dm.vocab
    gen = torch.Generator().manual_seed(0)
    settings = GenerationConfig(temperature=1.0)
    prompt = f"{NEW[0]}{NEW[1]}c "  # new characters in the prompt, with unknown=error
    samples = sample_text(tuned.net, tuned.vocab, prompt, 400, settings, unknown="error", generator=gen)
    assert samples[0].startswith(prompt) and set(NEW) & set(samples[0][len(prompt) :])


def test_a_byte_level_checkpoint_needs_no_extension(tiny_run, corpus_b, tmp_path):
    source = short_run(tiny_run.corpus, tmp_path / "src", "data.unit=byte")
    start = load_checkpoint(source)
    dm, model, _ = build(compose_train(overrides(corpus_b, tmp_path / "ft", f"init_from={source}", "data.unit=byte")))
    assert dm.vocab == start.vocab == ByteVocab()
    saved = start.net.state_dict()
    assert all(torch.equal(t, saved[name]) for name, t in model.net.state_dict().items())
    with pytest.raises(UserError, match="data.unit=byte but this run reads data.unit=char; set data.unit=byte"):
        build(compose_train(overrides(corpus_b, tmp_path / "ft2", f"init_from={source}")))


def test_an_architecture_setting_on_the_command_line_that_differs_is_one_line(tiny_run, tmp_path):
    source = tiny_run.out / "checkpoints" / "best.ckpt"
    given = overrides(tiny_run.corpus, tmp_path / "ft", f"init_from={source}")
    # A value from a config file gives way: the default hidden_size (256) becomes the checkpoint's 32.
    _, model, _ = build(compose_train([*given, "model.num_layers=2"], return_hydra_config=True))
    assert model.net.hidden_size == 32
    cfg = compose_train([*given, "model.hidden_size=64"], return_hydra_config=True)
    with pytest.raises(UserError) as error:
        build(cfg)
    assert "has model.hidden_size=32; drop model.hidden_size=64" in str(error.value)
    assert "\n" not in str(error.value)


def test_freeze_keeps_the_frozen_weights_bit_identical_and_trains_the_rest(tiny_run, tmp_path):
    source = tiny_run.out / "checkpoints" / "best.ckpt"
    out = tmp_path / "ft"
    extra = (
        f"init_from={source}",
        "freeze=[embedding,layers:1]",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=10",
    )
    extra += QUIET
    train(compose_train(overrides(tiny_run.corpus, out, *extra)))
    before, after = load_checkpoint(source).net.state_dict(), load_checkpoint(out / "checkpoints/last.ckpt")
    assert after.hparams.freeze == "embedding,layers:1"
    for name, tensor in after.net.state_dict().items():
        frozen = name.startswith(("embedding.", "decoder.weight", "layers.0."))  # tied: the decoder's is the embedding
        assert torch.equal(tensor, before[name]) == frozen, name
    saved = torch.load(out / "checkpoints/last.ckpt", weights_only=True)["optimizer_states"][0]["param_groups"][0]
    assert len(saved["params"]) == sum(p.requires_grad for p in after.parameters())


def test_freeze_is_refused_where_it_cannot_apply(tiny_run, corpus_b, tmp_path):
    source = tiny_run.out / "checkpoints" / "best.ckpt"
    cases = {
        "freeze=layers:3": ("asks for more layers than model.num_layers=2; use freeze=layers:2", tiny_run.corpus),
        "freeze=embedding": ("keep embedding.weight at its random init for the characters new", corpus_b),
        "freeze=decoder": ("freeze='decoder' is not known", tiny_run.corpus),
    }
    for setting, (match, corpus) in cases.items():
        with pytest.raises(Exception) as raised:  # Hydra's instantiate wraps what CharLM raises
            build(compose_train(overrides(corpus, tmp_path / "ft", f"init_from={source}", setting)))
        assert match in str(user_error_in(raised.value)), setting
    with pytest.raises(UserError, match="keeps weights that init_from brings; pass init_from=PATH"):
        build(compose_train(overrides(tiny_run.corpus, tmp_path / "ft", "freeze=embedding")))


def test_init_from_with_ckpt_path_or_a_bad_checkpoint_is_one_line(tiny_run, tmp_path):
    ckpt = tiny_run.out / "checkpoints" / "last.ckpt"
    given = overrides(tiny_run.corpus, tmp_path / "ft", f"init_from={ckpt}", f"ckpt_path={ckpt}")
    with pytest.raises(UserError, match="init_from and ckpt_path are both given; pass init_from alone"):
        build(compose_train(given))
    bad = tmp_path / "bad.ckpt"
    bad.write_text("not a checkpoint")
    for path, match in ((tmp_path / "missing.ckpt", "does not exist"), (bad, "is not a checkpoint")):
        messages = []
        for key in ("init_from", "ckpt_path"):
            with pytest.raises(UserError, match=match) as error:
                build(compose_train(overrides(tiny_run.corpus, tmp_path / key, f"{key}={path}")))
            messages.append(str(error.value))
        assert messages[0] == messages[1]


def test_a_fine_tuned_run_with_an_extended_vocab_resumes(tiny_run, corpus_b, tmp_path):
    out = tmp_path / "ft"
    steps = ("trainer.max_epochs=1", "trainer.limit_train_batches=3", *QUIET)
    train(compose_train(overrides(corpus_b, out, f"init_from={tiny_run.out}", *steps)))
    last = out / "checkpoints" / "last.ckpt"
    more = ("trainer.max_epochs=2", "trainer.limit_train_batches=3", *QUIET)
    metrics = train(compose_train(overrides(corpus_b, out, f"ckpt_path={last}", *more)))
    resumed = load_checkpoint(last)
    assert math.isfinite(metrics["val/loss"]) and resumed.hparams.init_from.endswith("best.ckpt")
    assert set(NEW) <= set(resumed.vocab.chars) and torch.load(last, weights_only=True)["global_step"] == 6


@pytest.mark.slow
def test_a_time_machine_model_fine_tuned_onto_tiny_shakespeare_samples_its_new_characters(tmp_path):
    """The shipped corpora: Tiny Shakespeare has characters The Time Machine lacks ($, &, 3, Z); the fine-tuned
    model takes them in a prompt (unknown=error) and samples them."""
    quick = ["debug=fast", "trainer.max_epochs=1", "trainer.limit_train_batches=60", "sample_length=0", "test=false"]
    cache = f"paths.cache_dir={tmp_path / 'cache'}"
    run_train(tmp_path / "tm", *quick, cache, "logger=none")
    run_train(tmp_path / "ts", *quick, cache, "data=tinyshakespeare", f"init_from={tmp_path / 'tm'}")
    source = load_checkpoint(tmp_path / "tm" / "checkpoints" / "best.ckpt")
    tuned = load_checkpoint(tmp_path / "ts" / "checkpoints" / "best.ckpt")
    new = set(tuned.vocab.chars) - set(source.vocab.chars)
    shakespeare, time_machine = (
        (ROOT / "data" / f).read_text("utf-8") for f in ("tinyshakespeare.txt", "timemachine.txt")
    )
    assert new == set(shakespeare) - set(time_machine) and new
    assert tuned.vocab.chars[: len(source.vocab)] == source.vocab.chars  # old ids first, unchanged
    gen = torch.Generator().manual_seed(0)
    prompt = "KING " + "".join(sorted(new)) + " "
    settings = GenerationConfig(temperature=2.0)  # the new characters are rare: sample them where they show
    (text,) = sample_text(tuned.net, tuned.vocab, prompt, 3000, settings, unknown="error", generator=gen)
    assert text.startswith(prompt) and new & set(text[len(prompt) :])
