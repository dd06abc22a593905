from pathlib import Path

import pytest

from e2e.data import GEOMETRY, HELPERS


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    (tmp_path / "geometry.py").write_text(GEOMETRY, encoding="utf-8")
    (tmp_path / "helpers.py").write_text(HELPERS, encoding="utf-8")
    return tmp_path
