"""The built-in corpus: the running interpreter's standard library sources.

Every machine that runs pretrain has them, so the default configuration trains without
downloading anything. Documents are whole `.py` files in sorted path order, which is the same on
every machine with the same Python version (`describe_builtin` names that version, so caches of
different versions never mix). The test suites, site-packages and bytecode caches are skipped:
tests hold deliberately malformed and non-UTF-8 files, site-packages is not the standard library.
"""

from __future__ import annotations

import os
import platform
import sysconfig
from collections.abc import Iterator

_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests",
                        "idle_test"})
_EXTENSIONS = (".py",)
_MAX_FILE_BYTES = 1 << 20  # larger files are generated tables, not prose or code


def stdlib_dir() -> str:
    """Directory of the running interpreter's pure-Python standard library."""
    return sysconfig.get_paths()["stdlib"]


def describe_builtin() -> str:
    """A stable description of the built-in corpus, distinct per Python version."""
    return f"builtin:python-{platform.python_version()}:{stdlib_dir()}"


def builtin_files(root: str | None = None) -> Iterator[str]:
    """Paths of the corpus files under `root` (default: the stdlib), in sorted order."""
    root = root or stdlib_dir()
    for dirpath, dirnames, filenames in os.walk(root):
        # Sorting in place fixes os.walk's descent order, which is otherwise filesystem order.
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in sorted(filenames):
            if name.endswith(_EXTENSIONS):
                yield os.path.join(dirpath, name)


def _read_text(path: str) -> str | None:
    """The file's text, or None when it is too large, binary or not UTF-8."""
    try:
        if os.path.getsize(path) > _MAX_FILE_BYTES:
            return None
        with open(path, "rb") as f:
            raw = f.read()
        if b"\0" in raw:
            return None
        return raw.decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def iter_builtin_documents(root: str | None = None) -> Iterator[str]:
    """One document per standard-library source file, in a deterministic order.

    The byte cap (`max_bytes`) is applied by `pretrain.data.sources.iter_documents`.
    """
    for path in builtin_files(root):
        text = _read_text(path)
        if text:
            yield text
