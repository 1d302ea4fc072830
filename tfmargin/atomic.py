"""Files and folders that appear whole or not at all: write under a temporary name, rename.

A crash (even SIGKILL) between the write and the rename leaves only a hidden
temporary next to the previous version, never a truncated result.
"""

import contextlib
import os
import shutil
import tempfile


class UnwritablePath(OSError):
    """A folder given on the command line that cannot be written; says which flag."""


@contextlib.contextmanager
def atomic_file(final_path):
    """Yield a temporary sibling path; if it was written, rename it to ``final_path``."""
    parent, name = os.path.split(os.path.abspath(final_path))
    os.makedirs(parent, exist_ok=True)
    # Keep the whole name as the suffix: Keras picks the format from ".weights.h5"/".keras".
    handle, tmp = tempfile.mkstemp(prefix=".partial-", suffix=f"-{name}", dir=parent)
    os.close(handle)
    os.remove(tmp)  # writers such as h5py create the file themselves
    try:
        yield tmp
        if os.path.exists(tmp):
            os.replace(tmp, final_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_directory(final_path):
    """Yield a temporary sibling directory; rename it to ``final_path`` on success."""
    parent = os.path.dirname(os.path.abspath(final_path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(final_path)}.", dir=parent)
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would survive the rename
    try:
        yield tmp
        if os.path.isdir(final_path):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(final_path)}.old.", dir=parent)
            os.replace(final_path, os.path.join(old, "x"))
            os.replace(tmp, final_path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_writable(path, flag):
    """Raise ``UnwritablePath`` naming ``flag`` unless a folder can be created at ``path``.

    Tries a real write in the nearest existing ancestor (``os.access`` says yes
    to root on read-only folders) and leaves nothing behind.
    """
    ancestor = os.path.abspath(path)
    while not os.path.isdir(ancestor):
        parent = os.path.dirname(ancestor)
        if os.path.exists(ancestor) or parent == ancestor:
            raise UnwritablePath(f"{path!r} is not a folder; pass a folder to {flag}")
        ancestor = parent
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".write-check-", dir=ancestor))
    except OSError as error:
        raise UnwritablePath(f"cannot write under {ancestor!r} ({error.strerror}); pass a "
                              f"writable folder to {flag}") from None


def point_latest(folder, name, link="latest"):
    """Make ``folder/latest`` a relative symbolic link to ``folder/name``, replacing the
    old link in one rename (so it never dangles half-written)."""
    path = os.path.join(folder, link)
    if os.path.exists(path) and not os.path.islink(path):
        return None  # a real folder called "latest" is left alone
    tmp = os.path.join(folder, f".{link}.{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        os.remove(tmp)
    os.symlink(name, tmp)
    os.replace(tmp, path)
    return path
