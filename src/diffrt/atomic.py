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
the hash would otherwise go unseen (git's "racy" case). An entry can only hit while its file
keeps the stamps recorded; once the memo holds more than MEMO_MAX_ENTRIES, each new entry sweeps
out the dead ones (file gone or changed), so the memo stays the size of the large files that still
exist. `DIFFRT_HASH_MEMO=0` turns remembering off.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import hashlib
import itertools
import json
import logging
import os
import re
import secrets
import shutil
import struct
import tempfile
import time
from pathlib import Path
from typing import Any, Collection, Iterator

log = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = _make_temp(path.parent, f".{_fitting(path.name, NAME_MAX - len('..XXXXXXXX.tmp'))}.", ".tmp", directory=False)
    mode = os.stat(tmp_path).st_mode & 0o777  # open()'s: 0666 less the umask
    try:
        yield tmp_path
        if os.stat(tmp_path).st_mode & 0o777 != mode:  # a writer that replaced the file with its own, 0600 (safetensors >= 0.7)
            os.chmod(tmp_path, mode)
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


NAME_MAX = 255  # bytes in a file name, on Linux's file systems and macOS's


def _fitting(name: str, limit: int) -> str:
    """`name` cut to at most `limit` bytes (whole characters): a temporary's name adds 14 to the file's, so a
    long name the file system takes would fail at the write, after the work (`check_writable` passed it)."""
    while len(os.fsencode(name)) > limit:
        name = name[:-1]
    return name


def make_temp_dir(parent: str | os.PathLike, prefix: str) -> Path:
    """A new, empty folder `<prefix>XXXXXXXX` in `parent`, with the mode the umask gives (0755 under
    the usual 022), to be filled and then renamed into place."""
    return _make_temp(Path(parent), prefix, "", directory=True)


def make_temp_file(parent: str | os.PathLike, prefix: str, suffix: str = ".tmp") -> Path:
    """A new, empty file `<prefix>XXXXXXXX<suffix>` in `parent`, with the mode open() gives."""
    return _make_temp(Path(parent), prefix, suffix, directory=False)


def open_file_modes(folder: str | os.PathLike) -> None:
    """Give the files under a folder made by make_temp_dir the mode open() gives, 0666 less the umask (the folder's
    own, less execute), before it is published: safetensors >= 0.7 writes through a 0600 temporary of its own, and
    diffusers' save_pretrained left the weights of a trained model private to the user who trained it."""
    mode = os.stat(folder).st_mode & 0o666
    for path in Path(folder).rglob("*"):
        if path.is_file() and not path.is_symlink() and path.stat().st_mode & 0o777 != mode:
            os.chmod(path, mode)


def _make_temp(parent: Path, prefix: str, suffix: str, directory: bool) -> Path:
    """tempfile's mkstemp/mkdtemp create 0600 files and 0700 folders, which the rename would then
    publish: an artifact exported by one user (CI, a build container) could not be read by the service
    that runs it as another (PermissionError on manifest.json). Created here with the modes open() and
    mkdir() use, 0666/0777 less the umask, as every other file of the artifact is."""
    for _ in range(100):
        path = parent / f"{prefix}{secrets.token_hex(4)}{suffix}"  # 8 characters, as tempfile's names
        try:
            if directory:
                os.mkdir(path, 0o777)
            else:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"no unused temporary name {prefix}XXXXXXXX{suffix} in {parent}")


# Names the temporaries take (8 random characters, here or from tempfile in earlier versions):
# `.<file>.XXXXXXXX.tmp` from atomic_path, `.<component>.XXXXXXXX` folders from export_onnx.
_LEFTOVER_FILE = re.compile(r"^\.(.+)\.[a-z0-9_]{8}\.tmp$")
_LEFTOVER_DIR = re.compile(r"^\.([A-Za-z0-9_-]+)\.[a-z0-9_]{8}$")


def is_temporary(name: str) -> bool:
    """Whether a file name is one of atomic_path's temporaries (`.<file>.XXXXXXXX.tmp`)."""
    return _LEFTOVER_FILE.match(name) is not None


def remove_leftovers(folder: str | os.PathLike, folders: Collection[str], files: Collection[str]) -> list[str]:
    """Remove the temporaries that writes killed midway (SIGKILL, a power cut: no `finally` ran) left in `folder`:
    those of its own `files` (`.<file>.XXXXXXXX.tmp`) and `folders` (`.<folder>.XXXXXXXX`), and any temporary file
    inside those folders. No manifest names them, so nothing trusts them, but at SD size each holds gigabytes. Only
    these names: the folder may hold the user's own hidden files (a review found `.backup.20240101` removed from an
    --out that was a project folder). Call it only under the folder's lock: a live writer's temporaries look the
    same. Returns the names removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    inside = [p for name in folders if (folder / name).is_dir() and not (folder / name).is_symlink()
              for p in (folder / name).iterdir()]
    removed = []
    for path in [*folder.iterdir(), *inside]:
        top = path.parent == folder
        file, dir_ = _LEFTOVER_FILE.match(path.name), _LEFTOVER_DIR.match(path.name)
        if path.is_file() and not path.is_symlink() and file and (not top or file.group(1) in files):
            path.unlink(missing_ok=True)
        elif top and path.is_dir() and not path.is_symlink() and dir_ and dir_.group(1) in folders:
            shutil.rmtree(path, ignore_errors=True)
        else:
            continue
        removed.append(str(path.relative_to(folder)))
    return removed


def _fsync_dir(folder: Path) -> None:
    # The rename is durable only once the directory entry is on disk (POSIX; a no-op elsewhere).
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def check_writable(path: str | os.PathLike, what: str = "--out", folder: bool = False) -> None:
    """Before long work, one line if `path` cannot be written (its missing parents are made): a folder where a file
    goes (or a file where a folder goes), a file in the way of a parent, or no write permission where it would
    be created, or a folder the operating system refuses files in whatever the permissions say (a read-only mount
    or /proc to root): a file is made there and removed, as the write will make one."""
    from diffrt.errors import DiffrtError

    path = Path(path)
    if len(os.fsencode(path.name)) > NAME_MAX:
        raise DiffrtError(f"{what} {path}: its name is {len(os.fsencode(path.name))} bytes, more than the {NAME_MAX} a file "
                          "name may have; pass a shorter name")
    if path.exists() and path.is_dir() != folder:
        have, want = ("file", "folder") if folder else ("folder", "file")
        raise DiffrtError(f"{what} {path} is a {have}, not a {want}; pass a {want} path")
    start = path if folder else path.parent  # a folder is written into; a file is made in its parent
    dangling = next((p for p in (start, *start.parents) if p.is_symlink() and not p.exists()), None)
    if dangling is not None:  # exists() is False through it: mkdir failed after the work, "File exists"
        raise DiffrtError(f"{what} {path}: {dangling} is a link to {os.readlink(dangling)}, which does not exist; make its "
                          "target, or pass another path")
    existing = next(p for p in (start, *start.parents) if p.exists())
    if not existing.is_dir():
        raise DiffrtError(f"{what} {path}: {existing} is a file, not a folder, so nothing can be made in it; pass another path")
    if what == "--out" and Path(path).resolve().is_relative_to(cache_dir().resolve()):  # an implicit export, no --out
        what = "the export cache (DIFFRT_CACHE_DIR moves it; or `diffrt export --out DIR` first)"
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DiffrtError(f"{what} {path}: {existing} is not writable here (its permissions, or a read-only mount); "
                          "pass another path")
    try:
        fd, probe = tempfile.mkstemp(prefix=".diffrt-probe-", dir=existing)
    except OSError as exc:  # found only at the write, after the work, naming the write's temporary file
        raise DiffrtError(f"{what} {path}: nothing can be written in {existing} ({exc.strerror}); pass another path") from None
    os.close(fd)
    os.unlink(probe)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` (and string `metadata`) to a safetensors file, atomically and always as the same bytes."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    try:
        if metadata is None or len(metadata) < 2:
            # Only the order of two or more metadata entries varies (copy_with_sorted_header): other headers, a
            # checkpoint's among them, come out the same every time and are written once, in place.
            with atomic_path(path) as tmp:
                save_file(tensors, str(tmp), metadata=metadata)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        raw = _make_temp(path.parent, f".{path.name}.", ".tmp", directory=False)  # as written, header unsorted
        try:
            save_file(tensors, str(raw), metadata=metadata)
            copy_with_sorted_header(raw, path)
        finally:
            raw.unlink(missing_ok=True)
    except SafetensorError as exc:  # safetensors' own type for a failed write (a full disk): an OSError to callers
        raise OSError(f"could not write {path}: {exc}") from exc


def copy_with_sorted_header(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy a safetensors file to `dst` (atomically) with its JSON header's keys sorted. safetensors writes the
    __metadata__ entries in the order of a Rust HashMap, which is seeded afresh for every file: two saves of the same
    tensors and metadata came out as different bytes (and sha256s, which manifests and export keys record). The
    tensors' data is copied as it is; their offsets, kept in the header, are relative to it, and the header is
    padded with spaces to a multiple of 8 bytes as safetensors pads it, so the data stays aligned."""
    with open(src, "rb") as f, atomic_path(dst) as tmp, open(tmp, "wb") as out:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.dumps(json.loads(f.read(size)), sort_keys=True, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)
        out.write(struct.pack("<Q", len(header)) + header)
        shutil.copyfileobj(f, out, 1 << 20)


MEMO_MIN_BYTES = 64 << 20  # smaller files hash in milliseconds: not worth an entry
MEMO_SETTLE_NS = 3_000_000_000  # a file changed more recently than this is hashed, not remembered
MEMO_MAX_ENTRIES = 1024  # beyond this many entries, a new one sweeps out those that can no longer hit


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
            _prune_memo(memo.parent)
    return hexdigest


def _prune_memo(folder: Path) -> None:
    """Past MEMO_MAX_ENTRIES, remove the entries whose file is gone or no longer has the recorded stamps: a
    lookup needs them exact, so such an entry can never hit again. Live entries stay, however many."""
    entries = list(folder.glob("*.json"))
    if len(entries) <= MEMO_MAX_ENTRIES:
        return
    for entry in entries:
        try:
            recorded = json.loads(entry.read_text())
            alive = _stamps(os.stat(recorded["path"])) == recorded["stamps"]
        except (OSError, ValueError, KeyError, TypeError):  # the file is gone, or the entry is odd or already swept
            alive = False
        if not alive:
            with contextlib.suppress(OSError):
                entry.unlink()


def _stamps(stat: os.stat_result) -> list[int]:
    return [stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]


def cache_dir() -> Path:
    """Where diffrt keeps what it can make again (automatic exports, TensorRT timing caches, bench models, the hash
    memo): DIFFRT_CACHE_DIR (a container's volume; the test suite's own folder), else the user cache
    (~/.cache/diffrt on Linux)."""
    from platformdirs import user_cache_dir

    return Path(os.environ.get("DIFFRT_CACHE_DIR") or user_cache_dir("diffrt"))


def _memo_path(resolved: str) -> Path:
    name = hashlib.blake2b(resolved.encode(), digest_size=16).hexdigest()
    return cache_dir() / "sha256" / f"{name}.json"


def sha256_folder(folder: str | os.PathLike, patterns: tuple[str, ...] = ("*.json", "*.safetensors")) -> str:
    """Hash of the named files in a folder tree (relative path + content), independent of mtimes.

    Subfolders that are symbolic links are walked too (a model assembled from shared components,
    `unet -> ../base/unet`): pathlib's rglob skips them, and their weights would not be in the hash,
    so editing them left the cache key unchanged."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for p in sorted(_walk_files(folder, patterns)):  # sorted as Paths, as before: keys of plain folders stay
        digest.update(str(p.relative_to(folder)).encode())
        digest.update(sha256_file(p).encode())
    return digest.hexdigest()


def _walk_files(folder: Path, patterns: tuple[str, ...]) -> set[Path]:
    """The files under `folder`, through linked subfolders, matching a pattern. A link back to a folder
    it is inside (a cycle) or to one the model folder is inside is not entered; a folder reached again
    through another link is hashed once, under the name the sorted walk meets first: folders each holding
    two links to the next made 2^N paths of N levels, and an export that never finished hashing."""
    found, top, entered = set(), Path(os.path.realpath(folder)), set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs.sort()  # the walk's order, and so the name a repeated folder is hashed under, is the names'
        here = Path(root)
        real = Path(os.path.realpath(here))
        inside = {Path(os.path.realpath(p)) for p in here.parents if p == folder or folder in p.parents}
        if (here != folder and (real in inside or real in top.parents)) or real in entered:
            dirs[:] = []  # a cycle, a link up out of the model, or a folder walked already
            continue
        entered.add(real)
        for name in [*files, *dirs]:  # a pattern may match a folder's name too: only files count
            path = here / name
            if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns) and path.is_file():
                found.add(path)
    return found


def _still_there(f, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(f.fileno()), os.stat(path))
    except FileNotFoundError:
        return False


class LockHeld(BlockingIOError):
    """An exclusive lock that another process holds, asked for without waiting; `holder` is that process's id
    as its lock file records it ("" if it recorded none)."""

    def __init__(self, path: Path, holder: str):
        super().__init__(f"{path} is locked by {'process ' + holder if holder else 'another process'}")
        self.holder = holder


LOCK_ATTEMPTS = 100  # file_lock's tries at a lock file whose folder keeps vanishing


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, *, shared: bool = False, waiting: str | None = None,
              wait: bool = True) -> Iterator[None]:
    """An advisory lock on `path` (made if missing): exclusive, so that two builders of one artifact do not
    interleave, or `shared`, for readers, which any number hold at once while no builder does. `waiting`:
    logged once if the lock is held elsewhere and this call has to wait for it; with `wait=False` an exclusive
    lock held elsewhere raises LockHeld at once instead. An exclusive holder writes its process id into the file.

    A shared lock that cannot be had (no lock file on a read-only mount, where nothing writes either; a
    filesystem without locks) is no lock, with a debug line; an exclusive one raises."""
    import fcntl

    path = Path(path)
    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    f = None
    try:
        for attempt in itertools.count(1):
            if not shared:
                path.parent.mkdir(parents=True, exist_ok=True)
            # A reader opens the lock file read-only when it exists (a service running as another user than the
            # exporter may read it, not write it); a read fd is also what NFS's emulated shared flock needs.
            try:
                f = open(path, "r" if shared and path.exists() else "a+")
            except FileNotFoundError:
                # Its folder was removed after the mkdir (by a holder that removes it): make it again. Not for ever: a
                # file that cannot be made in a folder that is there (a link to a missing folder, /proc) spun at 100% CPU.
                if shared:
                    raise
                if attempt >= LOCK_ATTEMPTS:
                    raise FileNotFoundError(errno.ENOENT, "cannot make a lock file there (is it a link to a missing "
                                                          "folder?); choose another folder", str(path)) from None
                continue
            try:
                fcntl.flock(f.fileno(), mode | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait and not shared:
                    f.seek(0)
                    raise LockHeld(path, f.read(32).strip()) from None
                if waiting:
                    log.info("%s", waiting)
                fcntl.flock(f.fileno(), mode)
            if shared or _still_there(f, path):
                break
            # A holder removed the file (training's holds_out does, for a run refused after its checks) after
            # this call opened it: the lock taken is on a file no other call can find. Lock the one there now.
            f.close()
            f = None
        if not shared:
            f.truncate(0)  # "a+" writes at the end, which is now 0
            f.write(f"{os.getpid()}\n")
            f.flush()
    except OSError as exc:
        if f is not None:
            f.close()
        if not shared:
            raise
        log.debug("no shared lock on %s (%s): reading without one", path, exc)
        f = None
    if f is None:  # outside the handler: errors raised while the caller reads do not chain to this one
        yield
        return
    with f:
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
