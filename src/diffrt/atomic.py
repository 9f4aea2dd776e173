"""Atomic file writes and content hashes.

A reader must never see half a file: an interrupted export or checkpoint leaves either the
old file or the new one. Each write goes to a temporary name in the same folder (so the
rename stays on one filesystem), is fsynced, and is moved into place with `os.replace`.

Hashes. Artifacts and their sources are content-addressed, so opening an SD-1.5-sized artifact
would hash ~7 GB (seconds) every time. The digest of a large file is therefore remembered
under the user cache with the file's identity and change stamps (device, inode, size, mtime,
ctime), as git's index and ccache do, and reused while all of them are unchanged. A rewrite
or an atomic replace changes them; ctime cannot be set back by a user. A file changed within
a few seconds before its read began, or while it was read, is not remembered: timestamps are
coarse (a kernel tick; a second on some filesystems), and a second write in the same tick as
the hash would otherwise go unseen (git's "racy" case). Entries are small and never pruned.
`DIFFRT_HASH_MEMO=0` turns remembering off.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _fsync_dir(folder: Path) -> None:
    # The rename is durable only once the directory entry is on disk (POSIX; a no-op elsewhere).
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)


MEMO_MIN_BYTES = 64 << 20  # smaller files hash in milliseconds: not worth an entry
MEMO_SETTLE_NS = 3_000_000_000  # a file changed more recently than this is hashed, not remembered


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The file's sha256, remembered for large files while their stamps are unchanged (see above)."""
    started = time.time_ns()  # before the stamps are read: the settle window must cover the whole read
    with open(path, "rb") as f:  # open first: on NFS, open revalidates the attributes fstat then returns
        stamps = _stamps(os.fstat(f.fileno()))
        remember = stamps[2] >= MEMO_MIN_BYTES and os.environ.get("DIFFRT_HASH_MEMO", "1") != "0"
        resolved = str(Path(path).resolve()) if remember else ""
        memo = _memo_path(resolved) if remember else None
        if memo is not None:
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):  # a missing or odd entry: hash
                entry = json.loads(memo.read_text())
                if entry["path"] == resolved and entry["stamps"] == stamps:
                    return entry["sha256"]
        digest = hashlib.sha256()
        while block := f.read(chunk):
            digest.update(block)
        unchanged = _stamps(os.fstat(f.fileno())) == stamps  # nothing wrote to it while it was read
    hexdigest = digest.hexdigest()
    if memo is not None and unchanged and started - max(stamps[3], stamps[4]) > MEMO_SETTLE_NS:
        with contextlib.suppress(OSError):  # an optimisation: a read-only cache costs only time
            write_json(memo, {"path": resolved, "stamps": stamps, "sha256": hexdigest})
    return hexdigest


def _stamps(stat: os.stat_result) -> list[int]:
    return [stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]


def _memo_path(resolved: str) -> Path:
    from platformdirs import user_cache_dir

    name = hashlib.blake2b(resolved.encode(), digest_size=16).hexdigest()
    return Path(user_cache_dir("diffrt")) / "sha256" / f"{name}.json"


def sha256_folder(folder: str | os.PathLike, patterns: tuple[str, ...] = ("*.json", "*.safetensors")) -> str:
    """Hash of the named files in a folder tree (relative path + content), independent of mtimes."""
    folder = Path(folder)
    digest = hashlib.sha256()
    files = sorted({p for pattern in patterns for p in folder.rglob(pattern) if p.is_file()})
    for p in files:
        digest.update(str(p.relative_to(folder)).encode())
        digest.update(sha256_file(p).encode())
    return digest.hexdigest()


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """An exclusive advisory lock, so that two builders of one artifact do not interleave."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
