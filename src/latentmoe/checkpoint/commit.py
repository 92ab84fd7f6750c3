"""A run's checkpoint directories, and the one way a save becomes one of them.

    RUN/checkpoints/step-000100/         a complete checkpoint (the newest `keep` are kept)
    RUN/checkpoints/.tmp-step-000200/    a save being written (or what a crashed one left)
    RUN/model -> checkpoints/step-000100/model    the latest; a symlink swapped atomically

A save writes everything into its staging directory; `commit` writes its manifest (sizes and
SHA-256 of every file, last), makes it durable (fsync of every file and directory), renames it
into place and only then moves the latest link, so a crash at any point leaves the previous
checkpoint whole and the link pointing at it. `recover`, at the start of a run, undoes what an
interrupted save left (a staged save, a re-save caught between its two renames, a dangling link).
What a checkpoint holds is up to its writer; one that has `trainer_state.pt` is one a run can
resume from, once `verify` finds it whole.
"""

from __future__ import annotations

import logging
import os
import shutil

from .integrity import verify, write_manifest

log = logging.getLogger("latentmoe.checkpoint")

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.pt"
_STAGING, _REPLACED = ".tmp-", ".old-"


def checkpoint_path(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, CHECKPOINTS, f"step-{step:06d}")


def staging_path(final: str) -> str:
    return os.path.join(os.path.dirname(final), _STAGING + os.path.basename(final))


def checkpoint_dirs(run_dir: str) -> list[str]:
    """Complete checkpoints, oldest first."""
    root = os.path.join(run_dir, CHECKPOINTS)
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root) if n.startswith("step-")
                   and os.path.exists(os.path.join(root, n, TRAINER_STATE)))
    return [os.path.join(root, n) for n in names]


def begin(final: str) -> str:
    """An empty staging directory for the checkpoint `final` (debris of a crashed save removed)."""
    tmp = staging_path(final)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def commit(run_dir: str, final: str, keep: int) -> str:
    """Make the staged save of `final` durable, rename it into place, point RUN/model at its
    model and prune all but the newest `keep` checkpoints (keep <= 0: prune none)."""
    tmp = staging_path(final)
    write_manifest(tmp)
    _fsync_tree(tmp)
    if os.path.exists(final):  # the same step saved again (the final save right after an interval save)
        old = os.path.join(os.path.dirname(final), _REPLACED + os.path.basename(final))
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)  # the commit
    _fsync_dir(os.path.dirname(final))
    point_latest(run_dir, os.path.join(final, "model"))
    prune(run_dir, keep)
    return final


def recover(run_dir: str) -> None:
    """Clean up after a save that was interrupted, before a run (re)starts in `run_dir`.

    A re-save caught between its renames left `.old-step-N` and no `step-N`: the old one is whole, so it goes
    back. Every other staged or replaced directory is debris. RUN/model is pointed again at the newest checkpoint
    if it dangles."""
    root = os.path.join(run_dir, CHECKPOINTS)
    if not os.path.isdir(root):
        return
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if name.startswith(_REPLACED):
            final = os.path.join(root, name[len(_REPLACED):])
            if not os.path.exists(final):
                os.rename(path, final)
                log.warning("restored %s (a save of the same step was interrupted)", final)
                continue
        if name.startswith((_STAGING, _REPLACED)):
            shutil.rmtree(path, ignore_errors=True)
    _fsync_dir(root)
    link = os.path.join(run_dir, "model")
    ckpts = checkpoint_dirs(run_dir)
    if os.path.islink(link) and not os.path.exists(link) and ckpts:
        point_latest(run_dir, os.path.join(ckpts[-1], "model"))


def newest_valid(run_dir: str, warn=None) -> str | None:
    """The newest checkpoint that `verify` finds whole; each newer damaged one is reported through `warn`."""
    for path in reversed(checkpoint_dirs(run_dir)):
        problems = verify(path)
        if not problems:
            return path
        (warn or log.warning)(f"skipping damaged checkpoint {path}: {problems[0]}"
                              + (f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""))
    return None


def point_latest(run_dir: str, model_dir: str) -> None:
    """RUN/model -> model_dir, as a relative symlink replaced atomically."""
    link, tmp = os.path.join(run_dir, "model"), os.path.join(run_dir, ".model.tmp")
    if os.path.lexists(tmp):
        os.remove(tmp)
    try:
        os.symlink(os.path.relpath(model_dir, run_dir), tmp)
    except OSError:  # no symlinks on this filesystem: a copy (not atomic; the checkpoint itself still is)
        shutil.rmtree(link, ignore_errors=True)
        shutil.copytree(model_dir, link)
        return
    if os.path.isdir(link) and not os.path.islink(link):
        shutil.rmtree(link)
    os.replace(tmp, link)
    _fsync_dir(run_dir)


def prune(run_dir: str, keep: int) -> None:
    """Remove all but the newest `keep` complete checkpoints, and what crashed saves left behind.
    Called only after a commit, when no other save is in progress."""
    root = os.path.join(run_dir, CHECKPOINTS)
    doomed = checkpoint_dirs(run_dir)[:-keep] if keep > 0 else []
    doomed += [os.path.join(root, n) for n in os.listdir(root) if n.startswith((_STAGING, _REPLACED))]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)


def _fsync_tree(path: str) -> None:
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(dirpath)


def _fsync_dir(path: str) -> None:
    """A rename or new entry is durable once its directory is synced (POSIX; a no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


__all__ = ["CHECKPOINTS", "TRAINER_STATE", "checkpoint_path", "staging_path", "checkpoint_dirs", "begin", "commit",
           "point_latest", "prune", "recover", "newest_valid"]
