"""The `python-packages` corpus: the Python source and documentation of the installed packages.

Tens to hundreds of MB on a machine with torch installed, so that comparison runs read their data
once instead of memorising a few MB many times over. One document per file; exact duplicates
(vendored copies, identical `__init__.py`s, licence texts) are kept once, compared after
whitespace normalisation. Files come in the order of a hash of their path, so any prefix (a
`max_chars` cap) mixes every package, and the held-out split, every n-th document, is by file.
The cache key carries the installed distributions, so a different environment re-tokenizes.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import os
import site
import sysconfig
from collections.abc import Iterator

SUFFIXES = (".py", ".pyi", ".md", ".rst", ".txt")
DEFAULT_MAX_CHARS = 64_000_000   # the cap when data.max_chars is 0: tens of MB of text
MIN_CHARS, MAX_FILE_BYTES = 200, 400_000  # skip stubs and generated tables
_SKIP_DIRS = {"__pycache__", ".git", "node_modules"}
# Packaging files and legal texts: repeated across packages, not prose or code.
_SKIP_PREFIXES = ("license", "licence", "copying", "notice", "authors", "record", "entry_points",
                  "top_level", "requirements", "dependency_links", "sources", "installed-files")


def package_roots() -> list[str]:
    """The site-packages directories (purelib and platlib of this interpreter, and the user's)."""
    roots = set(site.getsitepackages()) if hasattr(site, "getsitepackages") else set()
    roots |= {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    return sorted(r for r in roots if os.path.isdir(r))


def _wanted(name: str) -> bool:
    low = name.lower()
    return low.endswith(SUFFIXES) and not low.startswith(_SKIP_PREFIXES)


def package_files() -> list[tuple[str, str]]:
    """(path relative to its root, absolute path) of every candidate file, in path-hash order."""
    out = []
    for root in package_roots():
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
            for name in filenames:
                if _wanted(name):
                    full = os.path.join(dirpath, name)
                    out.append((os.path.relpath(full, root), full))
    return sorted(out, key=lambda rf: (hashlib.sha1(rf[0].encode()).hexdigest(), rf[0]))


def python_packages(max_chars: int = 0) -> Iterator[str]:
    """Distinct source and documentation files of the installed packages, up to max_chars in all
    (0: DEFAULT_MAX_CHARS). Each document starts with its path, a header the model can condition on."""
    limit = max_chars or DEFAULT_MAX_CHARS
    seen: set[bytes] = set()
    total = 0
    for rel, full in package_files():
        try:
            if os.path.getsize(full) > MAX_FILE_BYTES:
                continue
            with open(full, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError):
            continue
        if len(text) < MIN_CHARS or "\x00" in text:
            continue
        digest = hashlib.sha1(" ".join(text.split()).encode()).digest()
        if digest in seen:
            continue
        seen.add(digest)
        doc = f"# {rel}\n{text}"
        yield doc
        total += len(doc)
        if total >= limit:
            return


def fingerprint() -> str:
    """The installed distributions (name==version), hashed: what the corpus is made of."""
    names = sorted(f"{d.metadata['Name']}=={d.version}" for d in md.distributions() if d.metadata["Name"])
    return hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]


__all__ = ["python_packages", "package_files", "package_roots", "fingerprint", "DEFAULT_MAX_CHARS"]
