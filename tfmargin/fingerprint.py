"""The fingerprint of a data set: SHA-256 over its files' relative paths and bytes.

What a run records as its data's provenance (with the dataset as typed), so two runs on
different copies of the same images can be told to have read the same bytes.
"""

import hashlib
import json
import os

FINGERPRINT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "tfmargin",
                                 "fingerprints.json")


def _read_cache():
    try:
        with open(FINGERPRINT_CACHE) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def fingerprint_files(root, relative_paths):
    """SHA-256 over the sorted relative paths and the bytes of those files under ``root``.

    Cached per ``root`` with a signature of the files' count, total size and
    newest modification time, so the bytes are read once per copy of the data.
    """
    paths = sorted(relative_paths)
    stats = [os.stat(os.path.join(root, p)) for p in paths]
    signature = [len(paths), sum(s.st_size for s in stats),
                 max((s.st_mtime_ns for s in stats), default=0)]
    key = os.path.abspath(root)
    cache = _read_cache()
    if cache.get(key, {}).get("signature") == signature:
        return cache[key]["sha256"]
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.replace(os.sep, "/").encode() + b"\0")
        with open(os.path.join(root, path), "rb") as f:
            digest.update(hashlib.sha256(f.read()).digest())
    value = digest.hexdigest()
    cache[key] = {"signature": signature, "sha256": value}
    try:
        os.makedirs(os.path.dirname(FINGERPRINT_CACHE), exist_ok=True)
        tmp = f"{FINGERPRINT_CACHE}.{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(cache, f, indent=1)
        os.replace(tmp, FINGERPRINT_CACHE)
    except OSError:
        pass  # an unwritable home: the fingerprint is computed again next time
    return value


def fingerprint_folder(root, extensions=None):
    """:func:`fingerprint_files` of every file under ``root`` (with one of ``extensions``,
    lower case, if given), hidden files left out."""
    relative = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if name.startswith(".") or (extensions and not name.lower().endswith(extensions)):
                continue
            relative.append(os.path.relpath(os.path.join(folder, name), root))
    return fingerprint_files(root, relative)
