"""The trainers of method artifacts (``kvbench train deltakv`` / ``kvbench train kvcar``) through the shared
optimisation loop (``kvbench.training``): a few steps on a tiny model make an artifact the method loads for that
model; the same seed gives the same weights; a time limit stops the loop and says so."""
import json

import pytest

from kvbench import models, registry
from kvbench.engine import Engine
from kvbench.results import file_sha256

TEXT = ("The grass is green. The sky is blue. It was the best of times, it was the worst of times. "
        "A library keeps old books on tall shelves. ") * 300


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text(TEXT)
    return path


def _deltakv(tiny_dir, corpus, out, **kw):
    from kvbench.methods.deltakv.train import train
    logs = []
    path = train(str(tiny_dir), str(corpus), str(out), batch=2, seq_len=64, full_layers=[0], log=logs.append,
                 **{"steps": 4, **kw})
    return path, logs


def test_deltakv_trains_a_checkpoint_its_method_loads(tiny_dir, corpus, tmp_path):
    path, logs = _deltakv(tiny_dir, corpus, tmp_path / "a")
    config = json.loads((path / "config.json").read_text())
    assert config["steps"] == 4 and config["compressed_layers"] == [1] and config["corpus"]["chars"] == len(TEXT)
    assert [line.split(":")[0] for line in logs if line.startswith("step ")] == ["step 1"]  # then every 25th
    assert any(line.startswith("trained 4 steps") for line in logs)
    again, _ = _deltakv(tiny_dir, corpus, tmp_path / "b")
    assert file_sha256(path / "compressors.safetensors") == file_sha256(again / "compressors.safetensors")
    Engine(models.load(str(tiny_dir)), registry.build_method("deltakv", 1.0, {"checkpoint": str(path)}))


def test_a_time_limit_stops_training_and_says_so(tiny_dir, corpus, tmp_path):
    path, logs = _deltakv(tiny_dir, corpus, tmp_path / "c", steps=10_000, max_minutes=1e-6)
    assert json.loads((path / "config.json").read_text())["steps"] < 10_000
    assert any("--max-minutes 1e-06 reached" in line for line in logs)


def test_kvcar_trains_an_artifact_its_method_loads(tiny_dir, corpus, tmp_path):
    from kvbench.methods.kvcar.train import train
    logs = []
    path = train(str(tiny_dir), str(corpus), str(tmp_path / "k"), recon_steps=3, lm_steps=2, batch=2, seq_len=64,
                 calib_samples=2, log=logs.append)
    assert any(line.startswith("stage 1 (reconstruction) step 1: loss ") for line in logs)
    assert any(line.startswith("stage 2 (LM loss) step 1: loss ") for line in logs)
    Engine(models.load(str(tiny_dir)), registry.build_method("kvcar", 1.0, {"artifact": str(path)}))


def test_the_kvcar_trainers_full_width_start_generates_what_full_generates(tiny_dir, corpus, tmp_path):
    """The trainer's artifact end to end (calibration, the PCA start, the artifact written, BatchNorm folded at
    load, decoding with rotation): latents as wide as the head start as the identity, so with no step taken the
    artifact must reproduce the full cache's greedy tokens. (A step, however small, moves BatchNorm's running
    statistics toward its batches and the codec away from the identity: 0.02 of the output after three.)"""
    from tests.conftest import prompt, sample

    from kvbench.methods.kvcar.train import train
    lm = models.load(str(tiny_dir))
    d = lm.model.config.head_dim
    path = train(str(tiny_dir), str(corpus), str(tmp_path / "k"), latent_dim=d, recon_steps=0, lm_steps=0,
                 batch=2, seq_len=64, calib_samples=2, log=lambda _: None)
    meta = json.loads((path / "artifact.json").read_text())
    assert meta["latent_dim"] == d and meta["hidden"] == 2 * d
    samples = [sample(prompt(60 + 17 * i, i), prompt(5, 40 + i), new=12, sid=str(i)) for i in range(2)]
    full = Engine(lm, registry.build_method("full", 1.0)).generate(samples)
    got = Engine(lm, registry.build_method("kvcar", 1.0, {"artifact": str(path)})).generate(samples)
    assert [r["prediction"] for r in got] == [r["prediction"] for r in full]


def test_the_corpus_is_packed_into_consecutive_windows_with_the_last_held_out(tokenizer):
    from kvbench.task import TaskError
    from kvbench.training import pack_corpus
    corpus = {"files": 1}
    train, held = pack_corpus(tokenizer, TEXT, corpus, seq_len=64, min_train=2)
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    n = len(ids) // 64
    assert len(held) == max(1, n // 50) and len(train) + len(held) == n
    assert train.flatten().tolist() + held.flatten().tolist() == ids[: n * 64]
    assert corpus == {"files": 1, "tokens": len(ids), "train_samples": len(train), "heldout_samples": len(held),
                      "seq_len": 64}
    with pytest.raises(TaskError, match="corpus too small"):
        pack_corpus(tokenizer, TEXT, {}, seq_len=64, min_train=n)


def test_the_chunked_next_token_loss_equals_the_loss_on_whole_logits(tiny_dir):
    """``next_token_loss`` never holds the batch's logits; its value and its gradients must be the plain
    cross-entropy's, whatever the chunk (one position, a chunk across two rows, more than all of them)."""
    import torch
    import torch.nn.functional as F

    from kvbench.training import next_token_loss
    class Causal:  # the attention the trainers' own stand-ins give: causal, over the new keys only
        def attention(self, layer, q, k, v, scale):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)

    model = models.load(str(tiny_dir), dtype=torch.float32).model
    ids = torch.randint(0, model.config.vocab_size, (3, 17), generator=torch.Generator().manual_seed(0))
    logits = model(input_ids=ids, kvbench_cache=Causal()).logits
    plain = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    plain.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert expected
    for chunk in (1, 20, 1000):
        model.zero_grad(set_to_none=True)
        loss = next_token_loss(model, ids, chunk_tokens=chunk, kvbench_cache=Causal())
        torch.testing.assert_close(loss, plain.detach(), rtol=1e-5, atol=1e-6)
        loss.backward()
        for name, grad in expected.items():
            torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-4, atol=1e-6)
    with torch.no_grad():  # evaluation: no recomputation, the same number
        torch.testing.assert_close(next_token_loss(model, ids, chunk_tokens=7, kvbench_cache=Causal()), plain.detach(), rtol=1e-5, atol=1e-6)


def test_a_timed_run_warms_up_within_its_time_however_many_steps_it_may_take():
    """`--steps 100000 --max-minutes 4`: the warm-up (5% of the steps: 5,000) must not outlast the time; half-way
    through the time the rate is the cosine's middle (0.55 of the peak), whatever the step count."""
    import time

    import torch

    from kvbench.training import warmup_cosine
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    now = time.perf_counter()
    assert warmup_cosine(opt, 1.0, 0, 100_000, now, 4.0, 5_000) == pytest.approx(1 / 5_000, rel=0.05)
    half = warmup_cosine(opt, 1.0, 189, 100_000, now - 120.0, 4.0, 5_000)
    assert half == pytest.approx(0.55, abs=0.01) and opt.param_groups[0]["lr"] == half
    early = warmup_cosine(opt, 1.0, 10, 100_000, now - 0.025 * 240, 4.0, 5_000)  # half of the 5% share of the time
    assert early == pytest.approx(0.5, abs=0.02)
    # a run by steps alone keeps its step warm-up and its cosine over the steps
    assert warmup_cosine(opt, 1.0, 24, 1_000, now, None, 50) == pytest.approx(0.5)
    assert warmup_cosine(opt, 1.0, 500, 1_000, now, None, 50) == pytest.approx(0.55)


def test_an_artifact_remade_at_the_same_path_is_another_run(tiny_dir, corpus, tmp_path):
    """A run's id holds its artifact's identity: retrained into the same directory, the codec starts a new run
    instead of resuming (or passing for) the old one's samples; methods without an artifact record none."""
    from kvbench.harness import RunConfig, run
    from kvbench.methods.kvcar.train import train
    lm = models.load(str(tiny_dir))
    art = tmp_path / "codec"
    niah = {"lengths": [200], "depths": [0.5], "max_new_tokens": 2}
    dirs = []
    for seed in (0, 1):
        train(str(tiny_dir), str(corpus), str(art), recon_steps=2, lm_steps=1, batch=2, seq_len=64, calib_samples=2,
              seed=seed, log=lambda line: None)
        cfg = RunConfig(method="kvcar", task="niah", method_params={"artifact": str(art)}, task_params=niah,
                        out=str(tmp_path / "results"))
        dirs.append(run(cfg, lm=lm, progress=False))
    assert dirs[0] != dirs[1]
    shas = [json.loads((d / "config.json").read_text())["artifact_sha256"] for d in dirs]
    assert shas[0] != shas[1] and all(json.loads((d / "metrics.json").read_text())["complete"] for d in dirs)
    plain = run(RunConfig(method="snapkv", task="niah", budget=0.5, task_params=niah, out=str(tmp_path / "results")),
                lm=lm, progress=False)
    assert "artifact_sha256" not in json.loads((plain / "config.json").read_text())


def test_the_distillation_loss_is_the_kl_to_the_teacher_chunk_by_chunk(tiny_dir):
    """``distillation_loss``: zero when the student attends as the teacher does; otherwise the mean over positions
    of KL(teacher || student) computed on whole logits, with the same gradients, whatever the chunk."""
    import torch
    import torch.nn.functional as F

    from kvbench.training import distillation_loss

    class Causal:
        def attention(self, layer, q, k, v, scale):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)

    class Noisy(Causal):  # a student whose values are scaled: a codec that loses something
        def __init__(self, weight):
            self.weight = weight

        def attention(self, layer, q, k, v, scale):
            return super().attention(layer, q, k, v * self.weight, scale)

    model = models.load(str(tiny_dir), dtype=torch.float32).model
    model.requires_grad_(False)
    ids = torch.randint(0, model.config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(0))
    assert distillation_loss(model, ids, {"kvbench_cache": Causal()}, kvbench_cache=Causal()).item() == pytest.approx(0, abs=1e-6)
    weight = torch.tensor(0.5, requires_grad=True)
    teacher = model(input_ids=ids, kvbench_cache=Causal()).logits[:, :-1].reshape(-1, model.config.vocab_size)
    student = model(input_ids=ids, kvbench_cache=Noisy(weight)).logits[:, :-1].reshape(-1, model.config.vocab_size)
    plain = F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True, reduction="batchmean")
    (expected,) = torch.autograd.grad(plain, weight)
    assert plain.item() > 1e-4
    for chunk in (1, 5, 1000):
        loss = distillation_loss(model, ids, {"kvbench_cache": Causal()}, chunk_tokens=chunk, kvbench_cache=Noisy(weight))
        torch.testing.assert_close(loss, plain.detach(), rtol=1e-5, atol=1e-7)
        (grad,) = torch.autograd.grad(loss, weight)
        torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-7)


def test_the_heldout_losses_are_the_two_cross_entropies_and_the_kl_from_one_forward_each(tiny_dir):
    """``heldout_losses`` gives what ``next_token_loss`` (reference and model) and ``distillation_loss`` give,
    whatever the chunk, with two forwards where they take four."""
    import torch
    import torch.nn.functional as F

    from kvbench.training import distillation_loss, heldout_losses, next_token_loss

    class Causal:
        forwards = 0

        def attention(self, layer, q, k, v, scale):
            Causal.forwards += layer == 0
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)

    class Noisy(Causal):
        def attention(self, layer, q, k, v, scale):
            return super().attention(layer, q, k, v * 0.5, scale)

    model = models.load(str(tiny_dir), dtype=torch.float32).model
    ids = torch.randint(0, model.config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = {"ce_reference": next_token_loss(model, ids, kvbench_cache=Causal()).item(),
                    "ce": next_token_loss(model, ids, kvbench_cache=Noisy()).item(),
                    "kl": distillation_loss(model, ids, {"kvbench_cache": Causal()}, kvbench_cache=Noisy()).item()}
    assert expected["kl"] > 1e-4 and expected["ce"] != pytest.approx(expected["ce_reference"])
    for chunk in (1, 5, 1000):
        Causal.forwards = 0
        got = heldout_losses(model, ids, {"kvbench_cache": Causal()}, chunk_tokens=chunk, kvbench_cache=Noisy())
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-7) and Causal.forwards == 2


def test_kvcar_trains_toward_the_full_model_with_lm_loss_kl(tiny_dir, corpus, tmp_path):
    from kvbench.methods.kvcar.train import train
    from kvbench.task import TaskError
    logs = []
    path = train(str(tiny_dir), str(corpus), str(tmp_path / "kl"), recon_steps=2, lm_steps=2, batch=2, seq_len=64,
                 calib_samples=2, lm_loss="kl", log=logs.append)
    meta = json.loads((path / "artifact.json").read_text())
    assert any(line.startswith("stage 2 (KL to full) step 1: loss ") for line in logs)
    assert meta["training"]["lm_loss"] == "kl" and meta["final_losses"]["lm_kl"] >= 0
    assert meta["final_losses"]["heldout_kl"] > 0  # a two-step codec is not the full cache
    with pytest.raises(TaskError, match="--lm-loss must be ce or kl"):
        train(str(tiny_dir), str(corpus), str(tmp_path / "x"), lm_loss="mse")


def test_the_heldout_script_measures_two_codecs_as_their_trainings_did(tiny_dir, corpus, tmp_path):
    """``scripts/kvcar_heldout.py`` evaluates codecs on the same held-out windows; given a codec's training
    window and batch it must give back the numbers its training recorded (the same windows, the same code path),
    and a second codec trained otherwise gets its own numbers on those windows."""
    import subprocess
    import sys
    from pathlib import Path

    from kvbench.methods.kvcar.train import train
    paths = [train(str(tiny_dir), str(corpus), str(tmp_path / name), recon_steps=2, lm_steps=steps, batch=2,
                   seq_len=64, calib_samples=2, lm_loss=loss, log=lambda line: None)
             for name, steps, loss in (("a", 1, "ce"), ("b", 3, "kl"))]
    held = json.loads((Path(paths[0]) / "artifact.json").read_text())["corpus"]["heldout_samples"]
    script = Path(__file__).resolve().parents[2] / "scripts" / "kvcar_heldout.py"
    out = subprocess.run([sys.executable, str(script), "--model", str(tiny_dir), "--data", str(corpus),
                          "--artifact", str(paths[0]), "--artifact", str(paths[1]), "--seq-len", "64",
                          "--samples", str(held), "--batch", "2"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["stage2"] for r in rows] == ["ce", "kl"]
    for row, path in zip(rows, paths):
        recorded = json.loads((Path(path) / "artifact.json").read_text())["final_losses"]
        for key in ("heldout_ce_full", "heldout_ce_kvcar", "heldout_kl"):
            assert row[key] == pytest.approx(recorded[key], abs=2e-5), key
    assert rows[0]["heldout_ce_full"] == rows[1]["heldout_ce_full"]
    assert rows[0]["heldout_ce_kvcar"] != rows[1]["heldout_ce_kvcar"]

