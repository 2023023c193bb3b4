"""Stored notebooks keep only the outputs nbval compares, and each has a parameters cell."""

from pathlib import Path

import nbformat
import pytest

from gnlib.tools.nbtools import problems

NOTEBOOKS = sorted((Path(__file__).resolve().parents[2] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_stored_stripped(path):
    assert problems(nbformat.read(path, as_version=4)) == []
