"""Corpus files read straight from compressed files and archives, as streams of blocks: nothing uncompressed is
written beside them and memory holds one block, whatever the archive's size.

A file is read by its name: ``.gz``, ``.bz2``, ``.xz`` and ``.zst`` are one compressed stream; ``.zip`` and
``.tar`` (also ``.tar.gz`` / ``.tgz``, ``.tar.bz2``, ``.tar.xz``, ``.tar.zst``) hold members, of which
``data.members`` picks some. Any other name is plain text or bytes.
"""

from __future__ import annotations

import bz2
import fnmatch
import gzip
import lzma
import tarfile
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from charlm import UserError

BLOCK = 1 << 16  # bytes read per step, compressed or not
# name ending -> (container, compression); the longest ending that fits wins, so .tar.gz is a tar, not a stream
FORMATS = {
    ".gz": ("stream", "gz"),
    ".bz2": ("stream", "bz2"),
    ".xz": ("stream", "xz"),
    ".zst": ("stream", "zst"),
    ".zip": ("zip", None),
    ".tar": ("tar", None),
    ".tgz": ("tar", "gz"),
    ".tar.gz": ("tar", "gz"),
    ".tar.bz2": ("tar", "bz2"),
    ".tar.xz": ("tar", "xz"),
    ".tar.zst": ("tar", "zst"),
}
_TESTS = {"gz": "gzip -t", "bz2": "bzip2 -t", "xz": "xz -t", "zst": "zstd -t", "zip": "unzip -t", "tar": "tar -tf"}
ZSTD_INSTALL = 'pip install "charlm-lightning[zstd]" (in a checkout: pip install -e ".[zstd]")'


def archive_format(path: str | Path) -> tuple[str, str | None] | None:
    """(container, compression) of a compressed file or archive, by its name; None for plain text or bytes."""
    name = Path(path).name.lower()
    return next((FORMATS[end] for end in sorted(FORMATS, key=len, reverse=True) if name.endswith(end)), None)


def holds_members(path: str | Path) -> bool:
    """Whether ``data.members`` applies to ``path``: a .zip or a .tar, not a single compressed stream."""
    return (archive_format(path) or ("", None))[0] in ("zip", "tar")


def stem(path: str | Path) -> str:
    """The file's name without its archive ending (``enwik8.zip`` -> ``enwik8``), or its stem if it has none."""
    name = Path(path).name
    end = next((end for end in sorted(FORMATS, key=len, reverse=True) if name.lower().endswith(end)), None)
    return name[: -len(end)] if end else Path(path).stem


def member_globs(members: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """``data.members`` (comma-separated globs, or a list of them) as sorted unique globs; None: every file."""
    if members is None:
        return None
    items = members.split(",") if isinstance(members, str) else members
    if not isinstance(items, Sequence) or not all(isinstance(g, str) for g in items):
        items = ()
    globs = tuple(sorted({g.strip() for g in items} - {""}))
    if not globs:
        raise UserError(
            f"data.members={members!r} names no member; give globs, e.g. data.members='*.c,*.h', or null for"
            " every file of the archive."
        )
    return globs


def picked(name: str, globs: tuple[str, ...] | None) -> bool:
    """Whether the member ``name`` is read: without globs, every member that is not hidden (no part of its name
    starts with ".", as a folder corpus skips such files, and macOS's ``__MACOSX/._*`` copies); with globs, those
    that one matches. A glob matches the whole name inside the archive, and ``*`` also matches "/", so ``*.c``
    picks the .c files of every folder; as in a shell, a hidden member is picked only by a glob with a hidden
    part of its own (``.github/*``)."""
    hidden = any(part.startswith(".") for part in PurePosixPath(name).parts)
    if globs is None:
        return not hidden
    return any(fnmatch.fnmatchcase(name, g) and (not hidden or "/." in f"/{g}") for g in globs)


@dataclass
class Member:
    """A member picked to be read: its name inside the archive, its size where the archive lists it (a zip's,
    a tar's; None for a compressed stream), and its bytes, block by block, as the archive is read (a tar's
    must be read before the next member is asked for)."""

    name: str
    size: int | None
    blocks: Iterator[bytes]


def members(f: BinaryIO, path: Path, globs: tuple[str, ...] | None = None) -> Iterator[Member]:
    """The picked members of the archive or compressed file ``path``, open as ``f``: a zip's in name order, a
    tar's in archive order (a compressed tar cannot be read in any other order without reading it again), a
    compressed stream as one member named after the file. Damage is a UserError naming the file and member."""
    container, compression = archive_format(path)
    if container == "stream":
        stream = _decompressed(f, compression, path)
        yield Member(stem(path), None, _guarded(_read(stream), path, compression, None))
        return
    if container == "zip":
        with _damage(path, "zip", None):
            archive = zipfile.ZipFile(f)
        infos = sorted((i for i in archive.infolist() if not i.is_dir()), key=lambda i: i.filename)
        chosen = [i for i in infos if picked(i.filename, globs)]
        _check_chosen(path, [i.filename for i in infos], chosen, globs)
        for info in chosen:
            yield Member(info.filename, info.file_size, _zip_member(archive, info, path))
        return
    yield from _tar_members(f, path, compression, globs)


def listed_size(path: Path, globs: tuple[str, ...] | None = None) -> int | None:
    """Bytes in the picked members of a zip, from its directory (nothing is decompressed); None for other files."""
    if archive_format(path) != ("zip", None):
        return None
    with _damage(path, "zip", None), zipfile.ZipFile(path) as archive:
        return sum(i.file_size for i in archive.infolist() if not i.is_dir() and picked(i.filename, globs))


def _read(stream: BinaryIO) -> Iterator[bytes]:
    yield from iter(lambda: stream.read(BLOCK), b"")


def _zip_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path) -> Iterator[bytes]:
    with _damage(path, "zip", info.filename), archive.open(info) as member:  # checks the CRC-32 at the end
        yield from _read(member)


class _CheckedInfo(tarfile.TarInfo):
    """Reads tar headers as TarInfo does, and keeps why the last read failed: tarfile takes a damaged header
    after the first member, or a stream that stops between members, for the archive's end, so without this a
    damaged tar would read as a shorter corpus. Only the end-of-archive block (zeros) is a proper end."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except tarfile.HeaderError as e:
            tar.charlm_stop = e  # type: ignore[attr-defined]
            raise


def _tar_members(f: BinaryIO, path: Path, compression: str | None, globs) -> Iterator[Member]:
    fmt, last, names, chosen = compression or "tar", None, [], []
    source = _decompressed(f, compression, path) if compression else f
    # mode "r|": a stream, read once from start to end, never seeking back
    with _damage(path, fmt, None), tarfile.open(fileobj=source, mode="r|", tarinfo=_CheckedInfo) as archive:
        while True:
            with _damage(path, fmt, last):
                info = archive.next()
            if info is None:
                break
            if not info.isfile():  # folders, links, devices
                continue
            name = PurePosixPath(info.name).as_posix()  # without a leading "./"
            names.append(name)
            if picked(name, globs):
                chosen.append(name)
                yield Member(name, info.size, _guarded(_read(archive.extractfile(info)), path, fmt, name))
            last = name
        if not isinstance(stop := getattr(archive, "charlm_stop", None), tarfile.EOFHeaderError):
            where = f" after member {last!r}" if last else ""
            raise _damaged(path, fmt, None, f"the archive stops{where}, before tar's end block: {stop}")
        for _ in _read(source):  # the rest, padding: so that a cut or damaged compressed end shows too
            pass
    _check_chosen(path, names, chosen, globs)


def _check_chosen(path: Path, names: list[str], chosen: list, globs: tuple[str, ...] | None) -> None:
    if chosen:
        return
    if not names:
        raise UserError(f"archive {str(path)!r} holds no files; pass an archive with text files in it.")
    some = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    what = f"data.members={','.join(globs)!r} matches none" if globs else "all are hidden"
    raise UserError(f"archive {str(path)!r} holds {some}, but {what}; pick members, e.g. data.members='*.txt'.")


def _decompressed(f: BinaryIO, compression: str | None, path: Path) -> BinaryIO:
    if compression == "gz":
        return gzip.GzipFile(fileobj=f, mode="rb")
    if compression == "bz2":
        return bz2.BZ2File(f)
    if compression == "xz":
        return lzma.LZMAFile(f)
    return _Zstd(f, _zstandard(path))


def _zstandard(path: Path):
    try:
        import zstandard
    except ImportError:
        raise UserError(f"reading {str(path)!r} needs the zstandard package; {ZSTD_INSTALL}.") from None
    return zstandard


class _Zstd:
    """A .zst file's bytes, frame after frame, read(n) at a time; a frame cut short is an EOFError, as gzip, bz2
    and lzma say it (zstandard's stream_reader would end quietly instead)."""

    def __init__(self, f: BinaryIO, zstandard):
        self._chunks = self._decompress(f, zstandard.ZstdDecompressor())
        self._left = b""

    @staticmethod
    def _decompress(f: BinaryIO, dctx) -> Iterator[bytes]:
        frame = None
        for chunk in _read(f):
            while chunk:
                frame = frame or dctx.decompressobj()
                if out := frame.decompress(chunk):
                    yield out
                chunk, frame = (frame.unused_data, None) if frame.eof else (b"", frame)
        if frame is not None:
            raise EOFError("the zstd stream ends inside a frame")

    def read(self, n: int = BLOCK) -> bytes:
        if not self._left:
            self._left = next(self._chunks, b"")
        out, self._left = self._left[:n], self._left[n:]
        return out


def _damage_types() -> tuple[type[BaseException], ...]:
    """What the stdlib readers (and zstandard, when present) raise on a damaged or cut file."""
    types = [EOFError, OSError, zlib.error, lzma.LZMAError, zipfile.BadZipFile, tarfile.TarError, NotImplementedError]
    try:
        import zstandard

        types.append(zstandard.ZstdError)
    except ImportError:
        pass
    return tuple(types)


def _damaged(path: Path, fmt: str, member: str | None, reason: str) -> UserError:
    where = f" in member {member!r}" if member else ""
    reason = " ".join(reason.split()) or "no reason given"
    return UserError(
        f"archive {str(path)!r} is damaged{where} ({reason}); check it with {_TESTS[fmt]} and download or pack it"
        " again."
    )


@contextmanager
def _damage(path: Path, fmt: str, member: str | None) -> Iterator[None]:
    """Turns what a reader raises on a damaged or cut file into one UserError naming the file and the member."""
    try:
        yield
    except _damage_types() as e:
        raise _damaged(path, fmt, member, str(e)) from None


def _guarded(blocks: Iterator[bytes], path: Path, fmt: str, member: str | None) -> Iterator[bytes]:
    with _damage(path, fmt, member):
        yield from blocks
