import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    if not SHARED.is_dir():
        pytest.skip("../shared/data is absent (real benchmark data for tests)")
    return SHARED.resolve()


@pytest.fixture(autouse=True, scope="session")
def _quiet():
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
