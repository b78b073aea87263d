"""Where the shared data folder is: the one resolver of ``$STEERLAB_DATA``.

The public data sets (CAA's ``caa/``, ``truthfulqa/``, ``advbench/``, ...) are not shipped with
steerlab; they live in a shared folder found by :func:`shared_data_dir`. Tried in order, the
first existing folder wins:

1. ``$STEERLAB_DATA`` (:data:`DATA_ENV`), when set;
2. ``../shared/data`` relative to the current directory;
3. ``../shared/data`` relative to the repository (checkout) steerlab's source is in.
"""

from __future__ import annotations

import os
from pathlib import Path

from steerlab.data.files import PathLike
from steerlab.errors import DataError

__all__ = ["DATA_ENV", "find_shared_data_dir", "shared_data_candidates", "shared_data_dir"]

DATA_ENV = "STEERLAB_DATA"
"""The environment variable naming the shared data folder."""


def _repo_root() -> Path:
    """The checkout this file is in (``src/steerlab/data/locate.py`` is 4 levels in)."""
    return Path(__file__).resolve().parents[3]


def shared_data_candidates(repo: PathLike | None = None) -> list[Path]:
    """The folders :func:`shared_data_dir` tries, in order (existing or not, unresolved).

    ``repo`` is the checkout whose ``../shared/data`` is tried last; by default the one
    steerlab's source is in.
    """
    tried: list[Path] = []
    env = os.environ.get(DATA_ENV)
    if env:
        tried.append(Path(env).expanduser())
    tried.append(Path.cwd() / ".." / "shared" / "data")
    root = Path(repo) if repo is not None else _repo_root()
    tried.append(root / ".." / "shared" / "data")
    return tried


def find_shared_data_dir(repo: PathLike | None = None) -> Path | None:
    """The first existing folder of :func:`shared_data_candidates` (resolved), or None."""
    for folder in shared_data_candidates(repo):
        if folder.is_dir():
            return folder.resolve()
    return None


def shared_data_dir(repo: PathLike | None = None) -> Path:
    """The shared data folder (holding ``caa/``, ``truthfulqa/``, ``advbench/``, ...).

    ``$STEERLAB_DATA`` first, then ``../shared/data`` relative to the current directory, then
    relative to the repository (``repo``, by default the checkout steerlab's source is in); the
    first existing folder wins, resolved. Raises :class:`DataError` naming every path tried.
    """
    tried = shared_data_candidates(repo)
    for folder in tried:
        if folder.is_dir():
            return folder.resolve()
    raise DataError(
        "no data directory found; tried "
        + ", ".join(str(p) for p in tried)
        + f" (set ${DATA_ENV} to the folder holding caa/ and truthfulqa/, or pass path=)"
    )
