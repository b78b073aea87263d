"""Shared test set-up: a private steerlab cache, and the opt-in ``slow`` marker."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--runslow", action="store_true", default=False, help="also run tests marked slow"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def steerlab_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Point ``$STEERLAB_CACHE`` at a temporary folder so tests never write to ~/.cache."""
    folder = tmp_path_factory.mktemp("steerlab-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STEERLAB_CACHE", str(folder))
        yield folder


@pytest.fixture(scope="module")
def torch_single_thread() -> Iterator[None]:
    """One intra-op thread while a module's tiny-model tests run, restored afterwards.

    Tiny models gain nothing from threads, and on a busy machine each tiny op can wait ~20 ms
    for a descheduled OpenMP worker. Use with ``pytestmark = pytest.mark.usefixtures(...)``.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
