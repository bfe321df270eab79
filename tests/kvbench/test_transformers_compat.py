"""kvbench drives transformers through the names the installed release wants, without deprecation warnings."""
import textwrap
import warnings

import pytest
import torch
from transformers import DynamicCache

from kvbench import models
from kvbench.models import cache_argument, output_cache
from tests.conftest import KVBENCH_DIRS


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_cache_argument_is_accepted_without_warning(family):
    model, _ = models.random_model(f"tiny-{family}", torch.float32, "cpu", 0)
    model.set_attn_implementation("sdpa")
    cache = DynamicCache()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        out = model(input_ids=torch.tensor([[1, 2, 3]]), **cache_argument(model, cache), use_cache=True)
    assert output_cache(out) is cache and cache.get_seq_length() == 3


def test_guard_catches_a_deprecated_call_from_kvbench_code():
    """The session-wide guard (conftest) turns a transformers deprecation reached from kvbench into an error.
    The call is compiled as if it were a line of kvbench's own code; it uses a name transformers deprecates
    (``past_key_values`` from 5.24 on) and is skipped where that name is still the current one."""
    model, _ = models.random_model("tiny-llama", torch.float32, "cpu", 0)
    model.set_attn_implementation("sdpa")
    if "past_key_values" in cache_argument(model, None):
        pytest.skip("this transformers release still names the cache argument past_key_values")
    assert getattr(warnings.warn, "kvbench_guard", False), "the conftest guard is not installed"
    code = textwrap.dedent("""
        def call(model, cache):
            return model(input_ids=torch.tensor([[1, 2]]), past_key_values=cache)
    """)
    scope = {"torch": torch}
    exec(compile(code, KVBENCH_DIRS[0] + "fake_caller.py", "exec"), scope)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        with pytest.raises(AssertionError, match="deprecation reached from kvbench.*past_key_values"):
            scope["call"](model, DynamicCache())
