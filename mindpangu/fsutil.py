"""File-system helpers shared by every writer: the cache location and the atomic directory swap."""
from __future__ import annotations

import os
import shutil


def cache_root() -> str:
    """Where built kernels and preprocessed datasets are cached: $MINDPANGU_CACHE or ~/.cache/mindpangu."""
    return os.environ.get("MINDPANGU_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "mindpangu"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def staging_dir(final: str, reap: bool = False) -> str:
    """A fresh, empty directory beside ``final`` (``final.tmp<pid>``) to build it in before ``replace_dir``.
    ``reap``: also remove staging directories of ``final`` left by processes that no longer run on this host
    (killed mid-write). Only for writers that one process runs: on a file system shared by several hosts a
    pid says nothing about another host's processes."""
    base = os.path.abspath(final).rstrip(os.sep)
    parent, name = os.path.split(base)
    if reap and os.path.isdir(parent):
        for entry in os.listdir(parent):
            pid = entry[len(name) + 4:]
            if entry.startswith(name + ".tmp") and pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
    tmp = f"{base}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def replace_dir(tmp: str, final: str) -> None:
    """Move the finished directory ``tmp`` to ``final``; an existing ``final`` is set aside first and deleted only
    after the swap, so at every moment one complete version exists."""
    if os.path.isdir(final):
        old = f"{final.rstrip(os.sep)}.old{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)


def write_text_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: readers see the old or the new file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename, so a crash leaves the old or the new file, never an empty one
    os.replace(tmp, path)
