"""Method artifacts: atomic save, checksum on load, refusal of another method's or model's artifact."""
import json

import pytest
import torch

from kvbench import artifact, models
from kvbench.models import LoadedModel


def tiny(seed: int) -> LoadedModel:
    model, _ = models.random_model("tiny-llama", torch.float32, "cpu", seed)
    return LoadedModel(model, None, "tiny-llama", 4096)


def test_round_trip_and_model_check(tmp_path):
    lm = tiny(0)
    scores = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    out = artifact.save(tmp_path / "a", "demo", artifact.model_identity(lm), {"grid": [1, 2]}, {"scores": scores})
    meta, tensors = artifact.load(out, "demo")
    assert meta["grid"] == [1, 2] and torch.equal(tensors["scores"], scores)
    artifact.check_model(meta, lm, out)
    with pytest.raises(artifact.ArtifactError, match="was made for tiny-llama"):
        artifact.check_model(meta, tiny(1), out)  # same shapes, other weights
    with pytest.raises(artifact.ArtifactError, match="holds a demo artifact"):
        artifact.read_meta(out, "other")


def test_corruption_is_refused(tmp_path):
    lm = tiny(0)
    out = artifact.save(tmp_path / "a", "demo", artifact.model_identity(lm), {}, {"w": torch.ones(64)})
    raw = bytearray((out / artifact.TENSOR_FILE).read_bytes())
    raw[-4:] = b"\0\0\0\0"
    (out / artifact.TENSOR_FILE).write_bytes(bytes(raw))
    with pytest.raises(artifact.ArtifactError, match="checksum"):
        artifact.load(out, "demo")
    (out / artifact.META_FILE).write_text("{not json")
    with pytest.raises(artifact.ArtifactError, match="not valid JSON"):
        artifact.read_meta(out, "demo")
    with pytest.raises(artifact.ArtifactError, match="no demo artifact"):
        artifact.read_meta(tmp_path / "missing", "demo")


def test_save_replaces_whole(tmp_path):
    lm = tiny(0)
    ident = artifact.model_identity(lm)
    artifact.save(tmp_path / "a", "demo", ident, {"v": 1}, {"w": torch.ones(2)})
    artifact.save(tmp_path / "a", "demo", ident, {"v": 2})
    meta = json.loads((tmp_path / "a" / artifact.META_FILE).read_text())
    assert meta["v"] == 2 and "tensors_sha256" not in meta
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no staging or old directories left
