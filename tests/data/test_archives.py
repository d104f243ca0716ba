"""Corpora read straight from compressed files and archives: every format gives the tokens of its text, members
are picked by glob and joined in name order, the cache key covers the archive and the pick, a damaged archive is
one line naming the file (and the member), and data=enwik8 reads enwik8.zip as it is distributed."""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import re
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import zstandard
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from bench.tokenize_speed import build_archive, build_corpus
from charlm import UserError
from charlm.data.archives import archive_format
from charlm.data.cache import load_split, load_tokens
from charlm.data.corpus import SEPARATOR
from tests.conftest import assert_user_error, compose_train, make_text, run_cli, run_module

COMPRESS = {
    "gz": gzip.compress,
    "bz2": bz2.compress,
    "xz": lambda raw: lzma.compress(raw, preset=0),
    "zst": zstandard.ZstdCompressor(write_checksum=True).compress,  # the zstd tool writes the checksum too
}
STREAMS = [".txt.gz", ".txt.bz2", ".txt.xz", ".txt.zst"]
ARCHIVES = [".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst"]


def text(seed: int, n: int = 150_000) -> bytes:
    """Pseudo-English with two- to four-byte characters, longer than a read block, so blocks cut characters."""
    rng = np.random.default_rng(seed)
    words = make_text(600, seed).split()
    picks = rng.integers(0, len(words), n // 5)
    return " ".join(words[k] + "é✓🙂"[i % 3] if i % 7 == 0 else words[k] for i, k in enumerate(picks)).encode()


def pack(path: Path, files: dict[str, bytes], zip_method: int = zipfile.ZIP_DEFLATED) -> Path:
    """``files`` in the archive or compressed file ``path`` (its format from its name), in the dict's order."""
    container, compression = archive_format(path)
    if container == "stream":
        (raw,) = files.values()
    elif container == "zip":
        with zipfile.ZipFile(path, "w", zip_method) as archive:
            for name, data in files.items():
                archive.writestr(name, data)
        return path
    else:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as archive:
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
        raw = buffer.getvalue()
    path.write_bytes(COMPRESS[compression](raw) if compression else raw)
    return path


def read(path: Path, cache: Path, **options) -> bytes:
    tokens, vocab = load_tokens(path, cache, **options)
    return vocab.decode(tokens).encode()


@pytest.mark.parametrize("unit", ["char", "byte"])
@pytest.mark.parametrize("ending", STREAMS + ARCHIVES)
def test_every_format_gives_the_tokens_of_its_plain_text(tmp_path, ending, unit):
    files = {"b.txt": text(1), "a.txt": text(2)}  # not in name order: a tar is read in its own order
    if ending in STREAMS:
        files = {"a.txt": files["a.txt"]}
    (tmp_path / "plain").mkdir()
    for name, data in files.items():
        (tmp_path / "plain" / name).write_bytes(data)
    plain = tmp_path / "plain" / "a.txt" if len(files) == 1 else tmp_path / "plain"  # a file, or a folder corpus
    expected, vocab = load_tokens(plain, tmp_path / "cache", unit=unit)
    tokens, archive_vocab = load_tokens(pack(tmp_path / f"corpus{ending}", files), tmp_path / "cache", unit=unit)
    assert archive_vocab == vocab and tokens.dtype == expected.dtype
    assert np.array_equal(tokens, expected)


@pytest.mark.parametrize("ending", [".zip", ".tar.xz"])
def test_members_are_picked_by_glob_and_joined_in_name_order(tmp_path, ending):
    files = {
        "proj/src/z.c": b"zed\n",
        "proj/README": b"read me\n",
        "__MACOSX/proj/src/._z.c": b"\x00\x05\x16\x07 resource fork",  # what a Finder zip carries
        "proj/src/a.h": b"header\n",
        "proj/.git/config": b"[core]\n",
        "proj/src/b.c": b"bee\n",
    }
    archive = pack(tmp_path / f"proj{ending}", files)
    join = SEPARATOR.encode().join
    assert read(archive, tmp_path / "cache", members="*.c,*.h") == join([b"header\n", b"bee\n", b"zed\n"])
    assert read(archive, tmp_path / "cache", members=["proj/src/b.c"]) == b"bee\n"
    assert read(archive, tmp_path / "cache", members="proj/.git/*") == b"[core]\n"
    assert read(archive, tmp_path / "cache") == join([b"read me\n", b"header\n", b"bee\n", b"zed\n"])


def test_the_cache_key_covers_the_archive_bytes_and_the_member_pick(tmp_path):
    cache = tmp_path / "cache"
    archive = pack(tmp_path / "c.tar.gz", {"a.txt": b"first text\n", "b.txt": b"second\n"})
    assert read(archive, cache) == b"first text\n" + SEPARATOR.encode() + b"second\n"
    assert read(archive, cache, members="a.txt") == b"first text\n"
    pack(archive, {"a.txt": b"fresh text\n", "b.txt": b"second\n"})  # same names and sizes, other bytes
    assert read(archive, cache, members="a.txt") == b"fresh text\n"
    assert len(list(cache.iterdir())) == 3


def test_compressed_files_in_a_folder_and_as_splits_are_read_decompressed(tmp_path):
    parts = [text(3, 20_000), text(4, 5_000), text(5, 5_000)]
    plain, packed = tmp_path / "plain", tmp_path / "packed"
    plain.mkdir(), packed.mkdir()
    for i, (data, ending) in enumerate(zip(parts, [".txt.xz", ".zip", ".txt.zst"], strict=True)):
        (plain / f"{i}.txt").write_bytes(data)
        pack(packed / f"{i}{ending}", {f"{i}.txt": data})
    files = [sorted(folder.iterdir()) for folder in (plain, packed)]
    (expected, vocab), (split, split_vocab) = (load_split(f, tmp_path / "cache") for f in files)
    assert split_vocab == vocab and all(np.array_equal(a, b) for a, b in zip(split, expected, strict=True))
    assert read(packed, tmp_path / "cache") == read(plain, tmp_path / "cache")


def _cut(raw: bytes) -> bytes:
    return raw[: len(raw) * 2 // 3]


def _flip(raw: bytes, at: int, byte: int) -> bytes:
    return raw[:at] + bytes([byte]) + raw[at + 1 :]


def _stored_zip_with_a_changed_byte(path: Path, byte: int) -> bytes:
    """A zip whose member a.txt, stored uncompressed, has one byte changed: its CRC-32 no longer matches."""
    raw = pack(path, {"a.txt": b"plain text " * 20_000}, zipfile.ZIP_STORED).read_bytes()  # beyond a block
    return _flip(raw, raw.index(b"plain text ") + 5000, byte)


def _tar_with_a_bad_second_header(path: Path) -> bytes:
    raw = pack(path, {"a.txt": b"x" * 512, "b.txt": b"y" * 512}).read_bytes()
    return _flip(raw, 1024 + 148, ord("9"))  # b.txt's header checksum: tarfile would take it for the end


DAMAGED = {  # name -> (file ending, damage, what the error must name besides the file)
    "cut gz": (".txt.gz", _cut, ""),
    "cut bz2": (".txt.bz2", _cut, ""),
    "cut xz": (".txt.xz", _cut, ""),
    "cut zst": (".txt.zst", _cut, ""),
    "cut tar.xz": (".tar.xz", _cut, ""),
    "cut zip": (".zip", _cut, ""),
    "bad zip CRC": (".zip", lambda path: _stored_zip_with_a_changed_byte(path, ord("X")), "in member 'a.txt'"),
    "bad zip CRC, read as bad UTF-8": (".zip", lambda p: _stored_zip_with_a_changed_byte(p, 0xFF), "in member 'a.txt'"),
    "bad tar header": (".tar", _tar_with_a_bad_second_header, "after member 'a.txt'"),
}


@pytest.mark.parametrize("unit", ["char", "byte"])
@pytest.mark.parametrize("case", list(DAMAGED))
def test_a_damaged_archive_is_one_line_naming_the_file_and_member(tmp_path, case, unit):
    ending, damage, member = DAMAGED[case]
    path = tmp_path / f"corpus{ending}"
    if damage is _cut:
        raw = _cut(
            pack(path, {"a.txt": text(6), "b.txt": text(7)} if ending in ARCHIVES else {"a": text(6)}).read_bytes()
        )
    else:
        raw = damage(path)
    path.write_bytes(raw)
    with pytest.raises(UserError) as error:
        load_tokens(path, tmp_path / "cache", unit=unit)
    message = str(error.value)
    assert "\n" not in message and f"archive '{path}' is damaged" in message and member in message, message
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("manifest.json"))


def test_a_damaged_archive_stops_training_with_one_line(tmp_path):
    path = pack(tmp_path / "corpus.txt.xz", {"corpus.txt": text(8)})
    path.write_bytes(_cut(path.read_bytes()))
    proc = run_cli("train.py", f"data.path={path}", "debug=fast", f"paths.cache_dir={tmp_path / 'cache'}")
    assert_user_error(proc, f"archive '{path}' is damaged (Compressed file ended before the end-of-stream marker")


def test_zstd_without_the_zstandard_package_names_the_install(tmp_path, monkeypatch):
    path = pack(tmp_path / "corpus.txt.zst", {"corpus.txt": b"some text\n"})
    monkeypatch.setitem(sys.modules, "zstandard", None)  # import zstandard: ImportError
    with pytest.raises(UserError, match=re.escape('needs the zstandard package; pip install "charlm-lightning[zstd]"')):
        load_tokens(path, tmp_path / "cache")


@pytest.mark.parametrize(
    "name, members, match",
    [
        ("c.txt", "*.txt", "picks files inside a .zip or .tar, and"),
        ("c.txt.gz", "*.txt", "picks files inside a .zip or .tar, and"),
        ("c.zip", "*.md", "holds a.txt, b.txt, but data.members='*.md' matches none; pick members"),
        ("c.tar.gz", " , ", "data.members=' , ' names no member; give globs"),
    ],
)
def test_member_picks_that_cannot_work_are_one_line_errors(tmp_path, name, members, match):
    path = tmp_path / name
    if archive_format(path):
        pack(path, {"a.txt": b"a\n", "b.txt": b"b\n"} if archive_format(path)[0] != "stream" else {"c": b"c\n"})
    else:
        path.write_text("plain\n", encoding="utf-8")
    with pytest.raises(UserError, match=re.escape(match)):
        load_tokens(path, tmp_path / "cache", members=members)


def test_enwik8_reads_the_zip_as_distributed_in_place_of_the_missing_file(tmp_path, capsys):
    rng = np.random.default_rng(0)
    member = (
        b"<page>\n  <title>caf\xc3\xa9</title>\n</page>\n" * 2500 + rng.integers(0, 256, 100_000, np.uint8).tobytes()
    )
    pack(tmp_path / "enwik8.zip", {"enwik8": member})
    overrides = ["data=enwik8", f"paths.data={tmp_path}", f"paths.cache_dir={tmp_path / 'cache'}"]
    dm = instantiate(compose_train([*overrides, "data.val_chars=null"]).data)
    err = capsys.readouterr().err
    assert f"{tmp_path / 'enwik8.zip'} has {len(member):,} bytes, not the 100,000,000 of the published enwik8" in err
    assert np.concatenate(list(dm.parts.values())).tobytes() == member and dm.vocab.bits == "bpb"
    (tmp_path / "enwik8.zip").unlink()
    with pytest.raises(InstantiationException) as error:
        instantiate(compose_train(overrides).data)
    assert "or 'enwik8.zip' as distributed beside it, and nothing here downloads it" in str(error.value.__cause__)


@pytest.mark.parametrize("fmt", ["gz", "bz2", "xz", "zst"])
def test_the_benchmarks_archive_is_the_corpus_compressed(tmp_path, fmt):
    corpus = tmp_path / "corpus.txt"
    build_corpus(corpus, 200_000)
    archive = build_archive(corpus, fmt)
    assert archive.name == f"corpus.txt.{fmt}" and archive.stat().st_size < corpus.stat().st_size
    assert read(archive, tmp_path / "cache", unit="byte") == corpus.read_bytes()


@pytest.mark.slow  # seven processes, each importing torch: over a minute on two loaded cores
def test_the_benchmarks_read_the_corpus_from_an_archive_too(tmp_path):
    speed, memory = tmp_path / "tokenize.json", tmp_path / "memory.json"
    proc = run_module(
        "bench.tokenize_speed", "--quick", "--archive", "gz", "--tmp-dir", str(tmp_path), "--json", str(speed)
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(speed.read_text())
    assert report["corpus"]["archive"] == "gz" and 0 < report["corpus"]["archive_bytes"] < report["corpus"]["bytes"]
    runs = report["results"]["archive"]["runs"]
    assert [r["characters"] for r in runs] == [report["corpus"]["characters"]] and not runs[0]["cache_hit"]
    assert runs[0]["file_bytes"] == report["corpus"]["archive_bytes"]
    proc = run_module(
        "bench.memory", "--archive", "xz", "--mb", "0.3", "--tmp-dir", str(tmp_path), "--json", str(memory)
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (result,) = json.loads(memory.read_text())["results"]
    assert result["archive"]["tokens"] == result["plain"]["tokens"] > 0 and result["archive_bytes"] < result["bytes"]
    assert (result["archive"]["file_bytes"], result["plain"]["file_bytes"]) == (
        result["archive_bytes"],
        result["bytes"],
    )
    assert not list(tmp_path.glob("charlm-*")), "the temporary corpora and caches are removed"
