"""Atomic safetensors writes: whole or absent, and the same bytes for the same tensors and metadata."""

from __future__ import annotations

import hashlib
import os
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from diffrt import atomic


def test_a_safetensors_file_is_the_same_bytes_on_every_save_and_loads_back(tmp_path):
    """safetensors writes its metadata entries in the order of a Rust HashMap seeded afresh for every file: two saves
    of one file differed about half the time. The header is written with its keys sorted, the data as it was."""
    tensors = {"b.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3), "a.bias": torch.ones(3, dtype=torch.float16)}
    metadata = {"format": "pt", "ss_network_dim": "4", "ss_network_alpha": "2"}
    digests = set()
    for i in range(8):
        atomic.save_safetensors(tmp_path / f"{i}.safetensors", tensors, metadata)
        digests.add(hashlib.sha256((tmp_path / f"{i}.safetensors").read_bytes()).hexdigest())
    assert len(digests) == 1
    loaded = load_file(tmp_path / "0.safetensors")
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], v) for k, v in tensors.items())
    with safe_open(tmp_path / "0.safetensors", "pt") as f:
        assert f.metadata() == metadata
    data = (tmp_path / "0.safetensors").read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    assert size % 8 == 0 and data[8:8 + size].startswith(b'{"__metadata__":{"format":"pt","ss_network_alpha"')
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{i}.safetensors" for i in range(8)]  # no temporaries left


def test_a_checkpoint_without_metadata_is_the_same_bytes_on_every_save(tmp_path):
    """Written in place, not sorted and copied (a checkpoint's files are large): safetensors orders the tensors of
    such a header by dtype and name itself."""
    tensors = {f"block{i}.weight": torch.full((4,), float(i)) for i in range(40)}
    tensors.update({f"block{i}.scale": torch.ones(2, dtype=torch.float16) for i in range(10)})
    digests = set()
    for i in range(8):
        atomic.save_safetensors(tmp_path / "weights.safetensors", tensors)
        digests.add(hashlib.sha256((tmp_path / "weights.safetensors").read_bytes()).hexdigest())
    assert len(digests) == 1 and [p.name for p in tmp_path.iterdir()] == ["weights.safetensors"]


def test_an_exclusive_lock_on_a_file_removed_meanwhile_is_taken_on_the_one_there_now(tmp_path):
    """A run that opened the lock file while its holder was removing it (training removes the folder of a run
    refused after its checks) must not lock the removed file, which no later run can find: two runs would each
    hold "the" lock. It locks the file at the path once it has one."""
    import fcntl
    import threading

    path = tmp_path / "run" / ".lock"
    path.parent.mkdir()
    holder = open(path, "a+")
    fcntl.flock(holder.fileno(), fcntl.LOCK_EX)
    locked, release = threading.Event(), threading.Event()

    def waiter():
        with atomic.file_lock(path, waiting="waiting"):  # opens the holder's file, then waits for its lock
            locked.set()
            release.wait(30)

    t = threading.Thread(target=waiter)
    t.start()
    try:
        assert not locked.wait(0.5)  # blocked on the holder's file
        path.unlink()
        path.parent.rmdir()
        fcntl.flock(holder.fileno(), fcntl.LOCK_UN)
        holder.close()
        assert locked.wait(30)
        with open(path, "a+") as now:  # the folder and file made anew, and the waiter's lock is on them
            with pytest.raises(BlockingIOError):
                fcntl.flock(now.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        release.set()
        t.join(30)


def test_a_lock_file_that_cannot_be_made_is_an_error_not_a_spin(tmp_path):
    """From a review: a lock file that cannot be made in a folder that is there (a link to a missing folder, /proc)
    was taken for a folder removed meanwhile and tried again for ever at 100% CPU: `diffrt export` hung without a
    word. Run apart, so that the old behaviour fails the test instead of hanging the suite."""
    import subprocess
    import sys

    (tmp_path / "lk").mkdir()
    (tmp_path / "lk" / ".lock").symlink_to(tmp_path / "missing" / "target")
    code = ("import sys; from diffrt import atomic\n"
            "try:\n    with atomic.file_lock(sys.argv[1]): pass\n"
            "except FileNotFoundError as exc: print('REFUSED', exc)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "lk" / ".lock")], capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.startswith("REFUSED [Errno 2] cannot make a lock file there"), out.stdout + out.stderr
    assert not (tmp_path / "missing").exists()


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_a_folder_the_system_refuses_files_in_is_refused_before_the_work(tmp_path, monkeypatch):
    """From a review: `diffrt generate --out /proc/x.png` (as root, whom os.access lets write anywhere; a read-only
    mount answers the same) sampled every step, then failed naming the write's temporary file, /proc/.x.png.<hex>.tmp.
    A file is made and removed where the output goes, before the work."""
    from diffrt.errors import DiffrtError

    monkeypatch.setattr(os, "access", lambda path, mode: True)  # as root sees it (a user is refused by permissions first)
    with pytest.raises(DiffrtError, match=r"^--out /proc/x.png: nothing can be written in /proc \(.*\); pass another path$"):
        atomic.check_writable("/proc/x.png")
    atomic.check_writable(tmp_path / "new" / "x.png")
    atomic.check_writable(tmp_path, folder=True)
    assert list(tmp_path.iterdir()) == []  # nothing made, nothing left


def test_an_unwritable_export_cache_is_named_as_such(tmp_path, monkeypatch):
    """From a review: `diffrt generate` on a diffusers folder with a read-only cache said "--out .../artifacts/sd-...:
    ... is not writable by this user", though no --out was given (and root on a read-only mount is no permission
    matter)."""
    from diffrt.errors import DiffrtError

    monkeypatch.setenv("DIFFRT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(DiffrtError, match=r"^the export cache \(DIFFRT_CACHE_DIR moves it; or `diffrt export --out DIR` "
                                          r"first\) .*artifacts/sd-1: .* is not writable here \(its permissions, or a read-only mount\)"):
        atomic.check_writable(tmp_path / "cache" / "artifacts" / "sd-1", folder=True)
    with pytest.raises(DiffrtError, match=r"^--out .*mine: .* is not writable here"):
        atomic.check_writable(tmp_path / "mine", folder=True)


def test_a_dangling_link_on_the_way_is_named_before_the_work(tmp_path):
    """From a review: `diffrt export --out LINK` with LINK pointing nowhere passed the check (exists() is False through
    it), loaded the model, then failed with "[Errno 17] File exists: 'LINK'" after making the link's parent folders."""
    from diffrt.errors import DiffrtError

    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere" / "deep")
    for path, folder in ((tmp_path / "dangling", True), (tmp_path / "dangling" / "x.png", False)):
        with pytest.raises(DiffrtError, match=r"dangling is a link to .*nowhere/deep, which does not exist; make its target"):
            atomic.check_writable(path, folder=folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling"]  # nothing made


@pytest.mark.parametrize("stem", ["a" * 240, "é" * 120], ids=["ascii", "two-byte"])
def test_a_long_name_the_file_system_takes_is_written_and_a_longer_one_refused_first(tmp_path, stem):
    """From a review: a 244-byte name passed check_writable, and the write after the sampling failed with "File name
    too long" on a temporary the user never named (its name adds 14 bytes to the file's)."""
    from diffrt.errors import DiffrtError

    path = tmp_path / f"{stem}.png"  # 244 bytes: taken (255 at most)
    atomic.check_writable(path)
    atomic.write_bytes(path, b"png")
    assert path.read_bytes() == b"png" and [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left
    longer = tmp_path / f"{stem}{'x' * 12}.png"
    with pytest.raises(DiffrtError, match=r"^--out .*: its name is 256 bytes, more than the 255 a file name may have; pass a "
                                          r"shorter name$"):
        atomic.check_writable(longer)
