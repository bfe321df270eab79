"""A sweep config's per-method and per-task mappings name only its own methods and tasks: a misspelt key
(``method_params: {snapvk: ...}``, ``data: {nia: DIR}``) was silently ignored, so the sweep ran the defaults
(NIAH on the built-in filler instead of the essays) under names that looked right."""
from __future__ import annotations

import pytest

from kvbench.sweep import load_config
from kvbench.task import TaskError

HEAD = "out: {out}\nmethods: [snapkv, h2o]\ntasks: {{niah: {{lengths: [1024]}}}}\n"


def _cfg(tmp_path, text):
    path = tmp_path / "s.yaml"
    path.write_text(HEAD.format(out=tmp_path / "r") + text)
    return path


@pytest.mark.parametrize("text, message", [
    ("method_params: {snapvk: {window: 8}}\n", "method_params names 'snapvk'"),
    ("method_params: {snapkv+kvcr: {reuse: false}}\n", "method_params names 'snapkv\\+kvcr'"),
    ("data: {nia: /tmp}\n", "data names 'nia'"),
])
def test_a_key_naming_no_method_or_task_of_the_sweep_is_refused(tmp_path, text, message):
    with pytest.raises(TaskError, match=message):
        load_config(_cfg(tmp_path, text))


def test_keys_of_the_sweep_or_of_known_methods_and_tasks_are_accepted(tmp_path):
    path = _cfg(tmp_path, "method_params: {snapkv: {window: 8}, h2o: {recent_ratio: 0.3}, tova: {pin_newest: true}}\n"
                          "data: {niah: /tmp, ruler: /tmp}\n")  # tova, ruler: known, not run (a copied config)
    assert load_config(path)["methods"] == ["snapkv", "h2o"]
    assert load_config(path, methods=("snapkv",))["methods"] == ["snapkv"]  # h2o's parameters: not a mistake
