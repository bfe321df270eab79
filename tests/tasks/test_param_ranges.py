"""Task parameters that cannot make a sample are refused in one line before the model loads.

Before: ``-t lengths=[10]`` gave NIAH a negative room for its haystack, and ``hay[:room]`` then took nearly the
whole haystack (150k tokens of the essays: the run churned for hours on a prompt 15000x the length asked);
``-t depths=[2.0]`` ran, the needle past the end; fidelity ``-t context_len=0`` scored a KL of 0 (score 100)
with a measured KV ratio of 17, and ``-t n_samples=0`` said the 150k-token text was too short."""
from __future__ import annotations

import pytest

from kvbench import registry
from kvbench.registry import ParameterError
from kvbench.task import TaskContext, TaskError


@pytest.mark.parametrize("task, params, message", [
    ("niah", {"depths": "[2.0]"}, "depths=\\[2.0\\]: must be in \\[0, 1\\]"),
    ("niah", {"lengths": "[0]"}, "lengths=\\[0\\]: must be >= 1"),
    ("fidelity", {"context_len": "0"}, "context_len=0: must be >= 1"),
    ("fidelity", {"continuation_len": "0"}, "continuation_len=0: must be >= 1"),
    ("fidelity", {"n_samples": "0"}, "n_samples=0: must be >= 1"),
    ("niah", {"max_new_tokens": "0"}, "max_new_tokens=0: must be >= 1"),  # was: empty answers, scored 0
    ("aime24", {"max_new_tokens": "0"}, "max_new_tokens=0: must be >= 1"),
    ("ruler", {"n_per_task": "0"}, "n_per_task=0: must be >= 1"),  # was: "no samples ...: check the data"
])
def test_parameters_that_make_no_sample_are_refused(task, params, message):
    with pytest.raises(ParameterError, match=message):
        registry.build_task(task, params)


def test_a_niah_length_with_no_room_for_a_haystack_is_refused(tokenizer):
    task = registry.build_task("niah", {"lengths": "[10]", "depths": "[0.5]"})
    with pytest.raises(TaskError, match="NIAH length 10 leaves no room for a haystack"):
        task.samples(tokenizer, TaskContext(max_context_tokens=4096))
    ok = registry.build_task("niah", {"lengths": "[200]", "depths": "[0.5]"}).samples(
        tokenizer, TaskContext(max_context_tokens=4096))
    assert len(ok) == 1 and len(ok[0].context_ids) + len(ok[0].question_ids) <= 200
