"""Session fixtures: the demo corpus and its conversion, built once from the real MRI nilearn ships.

The converter (SimpleITK) is imported inside the fixtures, so `pytest -m gpu` runs on a GPU machine that
carries only the loader's and trainer's dependencies.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

_PRISTINE = dict(os.environ)


@pytest.fixture(autouse=True)
def _pristine_environment() -> Iterator[None]:
    """Undo what a test's dask LocalCluster leaves in os.environ (its nannies set OMP_NUM_THREADS=1 and more in
    this process): otherwise every later subprocess, a trainer included, runs on one thread, twice as slow."""
    yield
    for key in set(os.environ) - set(_PRISTINE) - {"PYTEST_CURRENT_TEST"}:  # pytest's own: it removes it itself
        del os.environ[key]
    os.environ.update(_PRISTINE)


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from openmind_tools.demo import write_demo_corpus

    return write_demo_corpus(tmp_path_factory.mktemp("demo") / "corpus")


@pytest.fixture(scope="session")
def demo_out(demo_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo corpus converted into both stores (treat as read-only: tests share it)."""
    from openmind_tools.convert import convert

    out = tmp_path_factory.mktemp("demo_out") / "out"
    convert(demo_corpus, out, formats=("zarr", "wds"), progress=False)
    return out
