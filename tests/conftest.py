import os
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT / ".." / "shared" / "data"
# kvbench's own code: the package and the folders installed as its subpackages.
KVBENCH_DIRS = tuple(str(ROOT / d) + os.sep for d in ("kvbench", "methods", "kernels", "tasks"))


@pytest.fixture
def shared_data() -> Path:
    if not SHARED.is_dir():
        pytest.skip("../shared/data is absent (real benchmark data for tests)")
    return SHARED.resolve()


@pytest.fixture(autouse=True, scope="session")
def _quiet():
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class KvbenchDeprecationError(AssertionError):
    """transformers deprecated something that kvbench's own code called."""


def kvbench_caller(frame) -> str | None:
    """The innermost kvbench frame on the stack below ``frame`` ("file:line"), if any."""
    while frame is not None:
        if frame.f_code.co_filename.startswith(KVBENCH_DIRS):
            return f"{frame.f_code.co_filename}:{frame.f_lineno}"
        frame = frame.f_back
    return None


def _guarded_warn(real_warn):
    def warn(message, category=None, stacklevel=1, source=None, **kwargs):
        category = category or (message.__class__ if isinstance(message, Warning) else UserWarning)
        caller = sys._getframe(1)
        if issubclass(category, (FutureWarning, DeprecationWarning)) and \
                caller.f_globals.get("__name__", "").startswith("transformers"):
            where = kvbench_caller(caller)
            if where is not None:
                raise KvbenchDeprecationError(f"transformers deprecation reached from kvbench ({where}): {message}")
        return real_warn(message, category, stacklevel + 1, source, **kwargs)
    warn.kvbench_guard = True
    return warn


@pytest.fixture(autouse=True, scope="session")
def no_transformers_deprecations_from_kvbench():
    """Warnings as errors for kvbench's own frames: a FutureWarning/DeprecationWarning that transformers
    raises while kvbench code is on the stack fails the test (transformers attributes these warnings to
    torch's module call, so a ``filterwarnings`` module pattern cannot catch them)."""
    real = warnings.warn
    warnings.warn = _guarded_warn(real)
    yield
    warnings.warn = real
