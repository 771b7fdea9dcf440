"""Guarding a run folder (``steerdiff benchmark`` / ``restore``): one process at a time, one config per folder, and
output paths checked before any work starts.

- :func:`claim_run_folder` takes an exclusive lock on ``<folder>/.lock`` (``fcntl.flock``, released when the
  process ends, also on a crash) and compares the config with the ``config.yaml`` already there.  A folder locked by
  another process, or holding results of a different config, is a :class:`RunFolderError` that names the holder or
  the differing keys; with ``overwrite=True`` the folder takes the new config (its cells are keyed by everything
  that determines them, so those the new config shares are reused and the rest computed; reports are rewritten).
- :func:`check_writable_folder` / :func:`check_output_file` fail early on a path that is a file where a folder is
  needed (or the reverse), an unwritable parent, an unsupported suffix or an existing file that may not be replaced.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from .atomic_io import atomic_write_text


class RunFolderError(ValueError):
    """The run folder cannot be used as asked; the message says why and what to do."""


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, Mapping):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def config_differences(old: Mapping, new: Mapping, ignore: Iterable[str] = ()) -> list[str]:
    """Dotted keys whose values differ between two configs (keys under ``ignore`` left out)."""
    skip = tuple(ignore)
    a, b = _flatten(old), _flatten(new)
    keys = sorted(set(a) | set(b))
    return [k for k in keys if not k.startswith(skip) and a.get(k, "<absent>") != b.get(k, "<absent>")]


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable_folder(path: str | Path, what: str = "output_dir") -> Path:
    """``path`` is (or can be created as) a folder this process may write to."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RunFolderError(f"{what} {str(path)!r} is a file, not a folder; choose another path")
    base = _nearest_existing(path)
    if not base.is_dir() or not os.access(base, os.W_OK | os.X_OK):
        raise RunFolderError(f"{what} {str(path)!r} cannot be written: {str(base)!r} is not a writable folder")
    return path


def check_output_file(path: str | Path, what: str = "output", suffixes: tuple[str, ...] = ()) -> Path:
    """``path`` can be written as a file: not a folder, a writable parent, one of ``suffixes`` (when given), and
    writable when it exists."""
    path = Path(path)
    if suffixes and path.suffix.lower() not in suffixes:
        raise RunFolderError(f"{what} {str(path)!r} must end in one of {', '.join(suffixes)} (the format written)")
    if path.is_dir():
        raise RunFolderError(f"{what} {str(path)!r} is a folder; give a file path")
    check_writable_folder(path.parent, f"the folder of {what}")
    if path.exists() and not os.access(path, os.W_OK):
        raise RunFolderError(f"{what} {str(path)!r} exists and is read-only")
    return path


def make_folder(path: Path, what: str = "output_dir") -> Path:
    """Create ``path`` (and its parents); a path the system refuses is an error naming the field, not a bare errno."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunFolderError(f"{what} {str(path)!r} cannot be created: {err.strerror or err}") from None
    return path


class RunFolderLock:
    """An exclusive lock on ``<root>/.lock`` held by this process until :meth:`release` (or the process ends);
    ``what`` is the config field that chose the folder, named when another process holds it."""

    def __init__(self, root: Path, what: str = "output_dir"):
        import fcntl

        self.path = root / ".lock"
        try:
            self._file = open(self.path, "a+")
        except OSError as err:
            raise RunFolderError(f"{what}: cannot write {str(self.path)!r} ({err.strerror or err})") from None
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "another process"
            self._file.close()
            raise RunFolderError(
                f"run folder {str(root)!r} is in use by {holder}; wait for it to finish (a killed run releases it) "
                f"or choose another {what}"
            ) from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"process {os.getpid()}\n")
        self._file.flush()

    def release(self) -> None:
        import fcntl

        if not self._file.closed:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()


def claim_run_folder(root: str | Path, config: Mapping, overwrite: bool = False, ignore: Iterable[str] = (),
                     normalize=None, compared=None) -> RunFolderLock:
    """Lock ``root`` for this process and make it hold ``config`` (see the module docstring).

    With ``overwrite`` a folder of another config takes this one.  ``ignore``: config keys that do not change
    results (progress bars, the overwrite flag itself).  ``normalize``: maps the stored config to the current
    config format (defaults filled, shorthands expanded) before comparing, so that a folder written by an earlier
    version of the same config is still recognised; a stored config it cannot read is compared as stored.
    ``compared``: maps both configs to the part that determines the folder's stored work (for the benchmark: all
    but the metrics, so that a metric change rescores the stored samples instead of being refused)."""
    root = make_folder(check_writable_folder(root))
    lock = RunFolderLock(root)
    try:
        path = root / "config.yaml"
        if path.is_file():
            try:
                old = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError:
                old = None
            if isinstance(old, Mapping) and normalize is not None:
                try:
                    old = normalize(old)
                except ValueError:
                    pass
            if not isinstance(old, Mapping):
                diff = ["<config.yaml unreadable>"]
            elif compared is not None:
                diff = config_differences(compared(old), compared(config), ignore)
            else:
                diff = config_differences(old, config, ignore)
            if diff and not overwrite:
                raise RunFolderError(
                    f"run folder {str(root)!r} holds results of another config (differs in {', '.join(diff[:8])}"
                    f"{' ...' if len(diff) > 8 else ''}); use another output_dir, restore those keys to resume it, or "
                    "set overwrite=true to run this config there (cells both configs share are reused)"
                )
        atomic_write_text(path, yaml.safe_dump(dict(config), sort_keys=False))
    except BaseException:
        lock.release()
        raise
    return lock


__all__ = ["RunFolderError", "RunFolderLock", "check_output_file", "check_writable_folder", "claim_run_folder",
           "config_differences", "make_folder"]
