"""Is a checkpoint whole? Cheap structural checks of safetensors files, and a manifest of every file's size and
SHA-256 that a commit writes last (so its presence means the save completed) and `verify` reads back.

A truncated, empty or garbled safetensors file is named with what is wrong (`CheckpointError`), instead of a parser
traceback that names neither the file nor the problem.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct

MANIFEST = "manifest.json"
_MAX_HEADER = 100 * 1024 * 1024   # safetensors' own bound on the JSON header


class CheckpointError(ValueError):
    """A checkpoint that is damaged or does not match its config; the message names the file and the problem."""


def check_safetensors(file: str) -> None:
    """Raise CheckpointError unless `file` has a well-formed safetensors header whose tensors fit the file exactly.

    Reads only the header: the 8-byte length, the JSON, and each tensor's byte range against the file size.
    """
    try:
        size = os.path.getsize(file)
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{file}: {'empty' if size == 0 else 'truncated'} safetensors file "
                                      f"({size} bytes; not even the 8-byte header length)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{file}: truncated or corrupt safetensors file (header of {n} bytes, "
                                      f"file of {size})")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{file}: cannot be read ({e.strerror or e})") from None
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("not an object")
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError):
        raise CheckpointError(f"{file}: corrupt safetensors header (not the JSON table of tensors)") from None
    data = size - 8 - n
    need = max(ends, default=0)
    if need != data:
        what = "truncated" if need > data else "has trailing bytes"
        raise CheckpointError(f"{file}: {what}: the header places {need} bytes of tensor data, the file has {data}")


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _files(root: str) -> list[str]:
    out = []
    for dirpath, _, names in os.walk(root):
        out += [os.path.relpath(os.path.join(dirpath, n), root) for n in names]
    return sorted(p for p in out if p != MANIFEST)


def write_manifest(root: str) -> None:
    """Write root/manifest.json: the size and SHA-256 of every file under `root` (call it after every other file)."""
    entries = {p: {"size": os.path.getsize(os.path.join(root, p)), "sha256": _sha256(os.path.join(root, p))}
               for p in _files(root)}
    with open(os.path.join(root, MANIFEST), "w") as f:
        json.dump({"files": entries}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def verify(root: str, hashes: bool = True) -> list[str]:
    """What is wrong with the checkpoint directory `root` (empty: nothing). With a manifest, every file is checked
    against it (sizes always, SHA-256 if `hashes`); without one, the safetensors files are checked structurally."""
    problems = []
    manifest = os.path.join(root, MANIFEST)
    if os.path.exists(manifest):
        try:
            with open(manifest) as f:
                entries = json.load(f)["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return [f"{manifest}: unreadable or corrupt manifest"]
        for rel, want in sorted(entries.items()):
            path = os.path.join(root, rel)
            if not os.path.exists(path):
                problems.append(f"{path}: missing")
            elif os.path.getsize(path) != want["size"]:
                problems.append(f"{path}: {os.path.getsize(path)} bytes, the manifest says {want['size']}")
            elif hashes and _sha256(path) != want["sha256"]:
                problems.append(f"{path}: SHA-256 differs from the manifest (the content changed)")
        return problems
    for rel in _files(root):
        if rel.endswith(".safetensors"):
            try:
                check_safetensors(os.path.join(root, rel))
            except CheckpointError as e:
                problems.append(str(e))
    return problems


__all__ = ["MANIFEST", "CheckpointError", "check_safetensors", "write_manifest", "verify"]
