"""The sha256 of large files is remembered while their stamps are unchanged, and never trusted
once the file could have changed: an edit in place (even with its mtime put back), an atomic
replace, a truncation, or a write too recent for timestamps to tell apart."""

from __future__ import annotations

import hashlib
import json
import os
import time
import types

import pytest

from diffrt import atomic


@pytest.fixture
def memo(tmp_path, monkeypatch):
    """Remembering on for small files, in a cache of the test's own; records each real hashing
    (and runs `during_read`, if set, while the file is being read)."""
    monkeypatch.setenv("DIFFRT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("DIFFRT_HASH_MEMO", raising=False)
    monkeypatch.setattr(atomic, "MEMO_MIN_BYTES", 0)
    monkeypatch.setattr(atomic, "MEMO_SETTLE_NS", 0)
    hashings = []

    def counting_sha256():
        hashings.append(1)
        return Hasher()

    class Hasher:
        def __init__(self):
            self.inner = hashlib.sha256()

        def update(self, block):
            if getattr(memo_state, "during_read", None):
                memo_state.during_read()
                memo_state.during_read = None
            self.inner.update(block)

        def hexdigest(self):
            return self.inner.hexdigest()

    memo_state = types.SimpleNamespace(during_read=None, hashings=hashings)
    monkeypatch.setattr(atomic, "hashlib", types.SimpleNamespace(sha256=counting_sha256, blake2b=hashlib.blake2b))
    return memo_state


def remembered(tmp_path) -> list:
    return list((tmp_path / "cache").rglob("*.json"))


def settle():
    time.sleep(0.05)  # past a kernel tick, so that a new write gets new timestamps


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_an_unchanged_file_is_hashed_once(memo, tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"a" * 1000)
    settle()
    assert atomic.sha256_file(path) == digest(b"a" * 1000)
    assert atomic.sha256_file(path) == digest(b"a" * 1000)
    assert len(memo.hashings) == 1


@pytest.mark.parametrize("change", ["edit in place", "edit with mtime put back", "atomic replace", "truncate"])
def test_a_changed_file_is_hashed_again(memo, tmp_path, change):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"a" * 1000)
    settle()
    atomic.sha256_file(path)
    stat = path.stat()
    settle()
    new = b"a" * 999 + b"b" if change != "truncate" else b"a" * 500
    if change == "atomic replace":
        atomic.write_bytes(path, new)
    elif change == "truncate":
        with open(path, "r+b") as f:
            f.truncate(500)
    else:
        with open(path, "r+b") as f:
            f.write(new)
        if change == "edit with mtime put back":
            os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # ctime still moves: it cannot be set
    settle()
    assert atomic.sha256_file(path) == digest(new)
    assert len(memo.hashings) == 2


def test_a_file_written_just_now_is_not_remembered(memo, tmp_path, monkeypatch):
    """Two writes inside one timestamp tick look alike: a fresh file is hashed every time until it settles."""
    monkeypatch.setattr(atomic, "MEMO_SETTLE_NS", 60_000_000_000)
    path = tmp_path / "weights.bin"
    path.write_bytes(b"a" * 1000)
    atomic.sha256_file(path)
    assert not remembered(tmp_path)
    with open(path, "r+b") as f:
        f.write(b"b")  # may share the first write's timestamps
    assert atomic.sha256_file(path) == digest(b"b" + b"a" * 999)
    assert len(memo.hashings) == 2


def test_remembering_can_be_turned_off_and_small_files_are_never_remembered(memo, tmp_path, monkeypatch):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"a" * 1000)
    settle()
    monkeypatch.setenv("DIFFRT_HASH_MEMO", "0")
    atomic.sha256_file(path)
    atomic.sha256_file(path)
    monkeypatch.delenv("DIFFRT_HASH_MEMO")
    monkeypatch.setattr(atomic, "MEMO_MIN_BYTES", 1001)
    atomic.sha256_file(path)
    atomic.sha256_file(path)
    assert len(memo.hashings) == 4


def test_a_file_written_while_it_is_read_is_not_remembered(memo, tmp_path):
    """The stamps taken before the read must still hold after it: a write in between (same tick or
    not) leaves nothing remembered, so the next hash reads the file again."""
    path = tmp_path / "weights.bin"
    path.write_bytes(b"a" * 1000)
    settle()

    def append():
        with open(path, "ab") as f:
            f.write(b"b")

    memo.during_read = append
    atomic.sha256_file(path)
    assert not remembered(tmp_path)
    settle()
    assert atomic.sha256_file(path) == digest(b"a" * 1000 + b"b") and len(memo.hashings) == 2


def test_an_odd_memo_entry_means_hashing_not_a_crash(memo, tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"a" * 1000)
    settle()
    atomic.sha256_file(path)
    [entry] = remembered(tmp_path)
    entry.write_text('{"stamps": 3}')
    assert atomic.sha256_file(path) == digest(b"a" * 1000) and len(memo.hashings) == 2


# --- sha256_folder: what a model folder's content address covers --------------------------------------


def test_a_folder_hash_covers_linked_subfolders_and_keeps_the_keys_of_plain_ones(tmp_path):
    """The bug: pathlib's rglob does not enter a subfolder that is a symbolic link, so a model folder
    assembled from shared components (`unet -> ../base/unet`) was hashed without its weights, and
    editing them left the export's cache key unchanged: a stale cache hit."""
    real = tmp_path / "base"
    (real / "unet").mkdir(parents=True)
    (real / "unet" / "config.json").write_text("{}")
    (real / "unet" / "weights.safetensors").write_bytes(b"weights v1")
    (real / "notes.txt").write_text("not hashed")
    old_digest = hashlib.sha256()  # the digest as it always was computed, for a folder without links
    for p in sorted({p for pattern in ("*.json", "*.safetensors") for p in real.rglob(pattern) if p.is_file()}):
        old_digest.update(str(p.relative_to(real)).encode())
        old_digest.update(atomic.sha256_file(p).encode())
    assert atomic.sha256_folder(real) == old_digest.hexdigest()  # existing artifacts' keys are unchanged

    model = tmp_path / "model"
    model.mkdir()
    (model / "unet").symlink_to(real / "unet", target_is_directory=True)
    (model / "unet" / "loop").symlink_to(model, target_is_directory=True)  # a cycle is not entered
    (model / "up").symlink_to(tmp_path, target_is_directory=True)  # nor a link up out of the model folder
    before = atomic.sha256_folder(model)
    assert before == atomic.sha256_folder(real)  # the same files under the same relative names
    (real / "unet" / "weights.safetensors").write_bytes(b"weights v2")
    assert atomic.sha256_folder(model) != before


def test_links_that_fan_out_to_one_folder_are_walked_once(tmp_path):
    """From a security review: folders each holding two links to the next made 2^N paths from 2N links, and hashing
    a model folder holding such a chain (30 levels: 10^9 paths) never finished. A folder is walked once."""
    import time

    model = tmp_path / "model"
    (model / "unet").mkdir(parents=True)
    (model / "unet" / "config.json").write_text("{}")
    levels = [tmp_path / f"level{i}" for i in range(31)]
    for level in levels:
        level.mkdir()
    (levels[-1] / "deep.json").write_text("{}")
    for level, below in zip(levels, levels[1:]):
        for name in ("a", "b"):
            (level / name).symlink_to(below, target_is_directory=True)
    (model / "extras").symlink_to(levels[0], target_is_directory=True)
    t0 = time.perf_counter()
    first = atomic.sha256_folder(model)
    assert time.perf_counter() - t0 < 10
    assert first == atomic.sha256_folder(model)  # the same walk, the same name for the folder met twice
    (levels[-1] / "deep.json").write_text('{"changed": true}')
    assert atomic.sha256_folder(model) != first  # its files are still in the hash, once


def test_past_its_limit_the_memo_sweeps_out_entries_that_can_no_longer_hit(memo, tmp_path, monkeypatch):
    """The bug: entries were never pruned, so every large file ever hashed (old exports, deleted checkpoints)
    left one behind for good. Entries of files still unchanged stay, however many there are."""
    monkeypatch.setattr(atomic, "MEMO_MAX_ENTRIES", 3)
    kept, gone, changed = (tmp_path / name for name in ("kept.bin", "gone.bin", "changed.bin"))
    for path in (kept, gone, changed):
        path.write_bytes(path.name.encode())
    settle()
    for path in (kept, gone, changed):
        atomic.sha256_file(path)
    assert len(remembered(tmp_path)) == 3  # at the limit: nothing swept
    gone.unlink()
    changed.write_bytes(b"new content")
    fresh = tmp_path / "fresh.bin"
    fresh.write_bytes(b"fresh")
    settle()
    atomic.sha256_file(fresh)  # a fourth entry: over the limit, the two dead ones go
    assert sorted(json.loads(p.read_text())["path"] for p in remembered(tmp_path)) == sorted(
        str(p.resolve()) for p in (kept, fresh))
    hashings = len(memo.hashings)
    assert atomic.sha256_file(kept) == digest(b"kept.bin") and len(memo.hashings) == hashings  # still a hit
