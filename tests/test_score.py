"""``charlm-score`` and beam search on the shared tiny run: the score is the run's own test metric and the
generation path's own probabilities, it reads its input in chunks, and the beams beat greedy decoding."""

from __future__ import annotations

import io
import json

import pytest
import torch
from hydra.utils import instantiate

from charlm import UserError
from charlm.cli import sample
from charlm.config import compose
from charlm.data.chunks import ChunkedText
from charlm.data.vocab import CharVocab
from charlm.infer.beam import beam_search
from charlm.infer.generation import GenerationConfig, generate, sample_text, start_ids
from charlm.nn.stepper import Stepper
from charlm.score import run, score
from charlm.training.module import load_checkpoint
from tests.conftest import assert_user_error, compose_generate, compose_train, run_module, tiny_overrides

GREEDY = GenerationConfig(temperature=0)


@pytest.fixture(autouse=True)
def one_thread():
    """A 32-wide model's products are too small to share: with two threads each waits on the other, and on a busy
    machine that costs these tests ten times their work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tiny_run):
    """(best checkpoint, its model in eval mode, the corpus text) of the shared tiny run."""
    ckpt = tiny_run.out / "checkpoints/best.ckpt"
    return ckpt, load_checkpoint(ckpt).eval(), tiny_run.corpus.read_text(encoding="utf-8")


def scored(model, text, **options) -> list[float]:
    """Every scored token's log-probability, in text order (``each`` gets streams one after another)."""
    chunks = []
    score(model.net, model.vocab, text, each=chunks.append, **options)
    return [lp for c in sorted(chunks, key=lambda c: c.stream) for lp in c.logprob.tolist()]


def stepped_logprobs(model, prompt: str, ids: list[int]) -> list[float]:
    """The log-probability of each of ``ids`` as generation computes it: the prompt (or its newline) in one pass,
    then one Stepper step per character."""
    step = Stepper(model.net)
    with torch.inference_mode():
        logits, state = model.net(torch.tensor(start_ids(model.vocab, prompt))[None])
        logits, layers, out = logits[:, -1], step.split(state), []
        for i in ids:
            out.append(torch.log_softmax(logits.float(), -1)[0, i].item())
            logits, layers = step.advance(torch.tensor([i]), layers)
    return out


def test_the_test_split_scores_the_runs_test_bpc(tiny_run, tiny):
    _, model, _ = tiny
    cfg = compose_train(tiny_overrides(tiny_run.corpus, tiny_run.out))
    dm = instantiate(cfg.data)
    tokens, streams = dm.parts["test"], cfg.data.eval_batch_size
    part = (len(tokens) - 1) // streams  # CharDataModule's evaluation streams: the first token is input only
    text = model.vocab.decode(tokens[1 : streams * part + 1])
    # the run's precision (bf16-mixed on a CPU with bf16: autocast), and its batches' columns: chunks of seq_len
    bf16 = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.trainer.precision == "bf16-mixed")
    with bf16:
        result = score(
            model.net,
            model.vocab,
            text,
            prompt=model.vocab.decode(tokens[:1]),
            streams=streams,
            chunk=streams * cfg.data.seq_len,
        )
    assert result.tokens == streams * part
    assert result.bits_per_token == pytest.approx(tiny_run.metrics["test/bpc"], abs=1e-6)


def test_jsonl_lines_are_the_text_in_order_and_sum_to_the_total(tiny, tmp_path, capsys):
    ckpt, model, text = tiny
    path = tmp_path / "part.txt"
    path.write_text(text[:700], encoding="utf-8")
    args = [f"ckpt={ckpt}", f"file={path}", "format=jsonl", "top=3", "streams=3", "chunk=64"]
    result = run(compose(args, config_name="score"))
    *lines, last = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert "".join(r["char"] for r in lines) == text[:700]  # streams 2 and 3 come after stream 1, in order
    assert sum(r["logprob"] for r in lines) == pytest.approx(-result.nats, rel=1e-9)
    assert last["summary"]["chars"] == 700 and last["summary"]["nats"] == pytest.approx(result.nats)
    for r in lines:
        (best, best_lp), *_ = r["top"]
        assert len(r["top"]) == 3 and best_lp >= r["logprob"] and (r["rank"] == 1) == (best == r["char"])
        assert r["rank"] > 3 or [c for c, _ in r["top"]][r["rank"] - 1] == r["char"]


@pytest.mark.parametrize("prompt", ["", "abc de"])
def test_scores_are_the_generation_paths_probabilities(tiny, prompt):
    _, model, _ = tiny
    ids = torch.stack(list(generate(model.net, model.vocab, prompt, 30, GREEDY)), 1)[0].tolist()
    continuation = model.vocab.decode(ids)
    # no prompt: the first character is scored after a newline, as generation's first is drawn
    assert scored(model, continuation, prompt=prompt) == pytest.approx(stepped_logprobs(model, prompt, ids), abs=1e-5)
    (greedy,) = beam_search(model.net, model.vocab, prompt, 30, beam=1)
    assert greedy.logprob == pytest.approx(-score(model.net, model.vocab, continuation, prompt=prompt).nats, abs=1e-4)


def test_bad_input_is_one_line_naming_the_fix(tiny, tmp_path):
    ckpt, _, _ = tiny
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("abc caf\xe9".encode("latin-1"))
    cases = [
        ([], "no checkpoint given"),
        ([f"ckpt={tmp_path}/none.ckpt", "text=ab"], "does not exist"),
        ([f"ckpt={ckpt}", f"file={tmp_path}/none.txt"], "does not exist; pass a UTF-8 text file"),
        ([f"ckpt={ckpt}", f"file={bad}", "text=ab"], "pass only one of them"),
        ([f"ckpt={ckpt}", f"file={bad}"], r"not UTF-8 \(bad byte at offset 7\)"),
        ([f"ckpt={ckpt}", "text=abc XYZ"], "characters not in the vocab: 'XYZ'"),
        ([f"ckpt={ckpt}", "text=abc", "streams=5"], "streams=5 but the text has 3 chars"),
        ([f"ckpt={ckpt}", "text=abc", "format=csv"], "format='csv' is not known"),
    ]
    for args, match in cases:
        with pytest.raises(UserError, match=match):
            run(compose(args, config_name="score"))
    proc = run_module("charlm.score", f"ckpt={ckpt}", f"file={bad}", "format=jsonl")
    assert_user_error(proc, "is not UTF-8")
    assert proc.stdout == ""  # refused before the first line


class Reads(io.BytesIO):
    """A file that records the size of every read."""

    sizes: list[int]

    def read(self, size: int = -1) -> bytes:
        self.sizes = [*getattr(self, "sizes", []), size]
        return super().read(size)


@pytest.mark.parametrize("streams", [1, 3])
def test_a_file_is_read_and_scored_a_chunk_at_a_time(tiny, streams):
    _, model, text = tiny
    text = text[:240].replace("e", "é")  # outside the vocab, and two bytes each: chunks cut characters in half
    whole = score(model.net, model.vocab, text, unknown="skip", streams=streams)
    for chunk in range(5, 12):  # streams start in blocks cut at every place
        file = Reads(text.encode("utf-8"))
        chunked = score(model.net, model.vocab, file, unknown="skip", streams=streams, chunk=chunk)
        assert max(file.sizes) == chunk and len(file.sizes) > 2 * len(text.encode("utf-8")) / chunk  # counted, scored
        assert chunked.nats == pytest.approx(whole.nats, rel=1e-6) and chunked.tokens == whole.tokens
        assert chunked.unknown == whole.unknown == text.count("é")


def test_a_cursor_reads_on_from_any_token_of_a_chunked_file():
    vocab = CharVocab("abc é€")  # characters of 1, 2 and 3 bytes; "ü" is outside
    text = "abc é€ ü€éa " * 5
    ids = vocab.encode(text, unknown="skip").tolist()
    for chunk in range(1, 9):  # blocks cut characters at every place
        reader = ChunkedText(io.BytesIO(text.encode("utf-8")), vocab, "skip", chunk)
        assert reader.count() == (len(ids), text.count("ü"))
        for start in range(len(ids)):
            assert reader.cursor(start).take(len(ids)).tolist() == ids[start:], (chunk, start)


def test_streams_are_exact_for_each_part(tiny):
    _, model, text = tiny
    text = text[:301]
    parts = [text[:100], text[100:200], text[200:]]  # 301 = 3 x 100 + 1: the last stream takes the rest
    alone = [scored(model, p, prompt=text[i * 100 - 1] if i else "") for i, p in enumerate(parts)]
    assert scored(model, text, streams=3, chunk=20) == pytest.approx([lp for a in alone for lp in a], abs=1e-5)


def test_beam_1_is_greedy_decoding(tiny):
    _, model, _ = tiny
    for prompt, stop in [("", None), ("abc ", None), ("ab", " "), ("a", ". ")]:
        (greedy,) = sample_text(model.net, model.vocab, prompt, 40, GenerationConfig(temperature=0, stop=stop))
        (beam,) = beam_search(model.net, model.vocab, prompt, 40, beam=1, stop=stop)
        assert prompt + beam.completion == greedy


def test_beams_beat_greedy_decoding_and_come_sorted(tiny):
    """Beam search is no optimiser: greedy's prefix can fall out of the K beams and win in the end (on this model,
    2 prompts of 50 with K=4), so the claim is most prompts and on average."""
    _, model, text = tiny
    net, vocab = model.net, model.vocab
    gains = []
    for i in range(50):
        prompt = text[97 * i : 97 * i + 6]
        (best, *rest) = beam_search(net, vocab, prompt, 25, beam=4, num_samples=4)
        (greedy,) = beam_search(net, vocab, prompt, 25, beam=1)  # greedy decoding: test_beam_1_is_greedy_decoding
        nats = [score(net, vocab, b.completion, prompt=prompt).nats for b in (best, greedy)]
        assert best.logprob == pytest.approx(-nats[0], abs=1e-4)
        gains.append(nats[1] - nats[0])
        scores = [b.score for b in (best, *rest)]
        assert scores == sorted(scores, reverse=True) and len({b.completion for b in (best, *rest)}) == 4
    assert sum(g >= -1e-4 for g in gains) >= 45 and sum(gains) / len(gains) > 0.5, gains


def test_a_beam_as_wide_as_every_prefix_finds_the_likeliest_text(tiny):
    _, model, _ = tiny
    net, vocab, v = model.net, model.vocab, len(model.vocab)
    every = torch.cartesian_prod(*[torch.arange(v)] * 3)  # [V^3, 3]: every 3-character continuation
    with torch.inference_mode():
        logits, _ = net(torch.cat([torch.tensor(start_ids(vocab, "ab")).expand(len(every), -1), every[:, :-1]], 1))
        logp = torch.log_softmax(logits[:, -3:].float(), -1).gather(-1, every[..., None]).sum((1, 2))  # [V^3]
    (best,) = beam_search(net, vocab, "ab", 3, beam=v * v)  # keeps every 2-character prefix: exhaustive
    assert best.ids == every[logp.argmax()].tolist() and best.logprob == pytest.approx(logp.max().item(), abs=1e-4)


def test_stop_ends_a_beam(tiny):
    _, model, _ = tiny
    beams = beam_search(model.net, model.vocab, "ab", 60, beam=4, num_samples=4, stop=" ", length_penalty=1.0)
    assert all(b.stopped and b.completion.endswith(" ") and " " not in b.completion[:-1] for b in beams)
    assert [b.score for b in beams] == sorted((b.logprob / len(b.ids) for b in beams), reverse=True)


def test_generate_beam_prints_scored_beams_and_refuses_more_samples_than_beams(tiny, capsys):
    ckpt, _, _ = tiny
    args = [f"ckpt={ckpt}", "beam=3", "num_samples=3", "length=20", "format=jsonl", "prompt=ab"]
    texts = sample(compose_generate(args))
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] + r["completion"] for r in records] == texts and len(texts) == 3
    assert [r["score"] for r in records] == sorted((r["logprob"] for r in records), reverse=True)
    with pytest.raises(UserError, match="num_samples=4 but beam=3 keeps only 3"):
        sample(compose_generate([*args[:1], "beam=3", "num_samples=4"]))
