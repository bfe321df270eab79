"""Budgets that cannot mean what they say are refused in one line before the model loads: ``--budget 2.0`` (a
fraction mistyped; it ran as 2 tokens per head) and a token count that holds every sample whole (it ran as the
full cache under the method's name and ranked as the method)."""
from __future__ import annotations

from unittest import mock

import pytest

from kvbench import models
from tests.kvbench.test_bad_inputs import NIAH, cli, one_line_error


@pytest.fixture(autouse=True)
def _no_progress_bars(monkeypatch):
    monkeypatch.setenv("CI", "1")


def _run(tiny_dir, haystack, out, budget, method="snapkv"):
    return cli("run", "--method", method, "--budget", budget, "--task", "niah", "--model", tiny_dir, "--data",
               haystack, "-t", "depths=[0.5]", *NIAH, "--out", out)


@pytest.mark.parametrize("budget, needle", [("2.0", "above 1 as a fraction"), ("3e2", "above 1 as a fraction"),
                                            ("100000", "holds every sample whole")])
def test_impossible_budgets_are_one_line_before_the_model_loads(tmp_path, tiny_dir, haystack, budget, needle):
    with mock.patch.object(models, "load", side_effect=AssertionError("the model was loaded")):
        one_line_error(_run(tiny_dir, haystack, tmp_path / "r", budget), needle)
    assert not (tmp_path / "r" / "runs").exists() or not any((tmp_path / "r" / "runs").iterdir())


def test_a_token_count_below_the_context_and_full_still_run(tmp_path, tiny_dir, haystack):
    assert _run(tiny_dir, haystack, tmp_path / "r", "64").exit_code == 0
    assert _run(tiny_dir, haystack, tmp_path / "r", "1", method="full").exit_code == 0
