"""Bad inputs and faults, driven through the CLI as a user or an operator would meet them.

Every bad input must end in exit code 2 and exactly one ``error:`` line on stderr, with no traceback,
before any slow work where the input allows. Every fault (a kill -9 mid-run, a torn or corrupt record,
two identical runs at once, an interrupted sweep, a corrupt checkpoint) must lose no finished record:
each test counts the records kept, redone and lost.

The model is a tiny random Llama saved as a local model directory (with the offline test tokenizer), so
the real loading path runs in milliseconds. The kill -9 scenarios use real subprocesses (``python -m
kvbench.cli``); everything else uses click's CliRunner in this process.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from kvbench import leaderboard as lb
from kvbench import models, results
from kvbench.cli import main
from tests.conftest import ROOT

NIAH = ["-t", "lengths=[160]", "-t", "max_new_tokens=4"]


# ---------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(autouse=True)
def _no_progress_bars(monkeypatch):
    monkeypatch.setenv("CI", "1")


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(res, needle: str) -> str:
    """Exit 2, one line on stderr that holds ``needle``, no traceback anywhere."""
    err = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.exit_code == 2, (res.exit_code, res.stdout, res.stderr, res.exception)
    assert isinstance(res.exception, SystemExit), res.exception
    assert len(err) == 1, res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    assert err[0].startswith("error: ") and needle in err[0], err[0]
    return err[0]


def each_one_line_error(cases) -> None:
    for args, needle in cases:
        try:
            one_line_error(cli(*args), needle)
        except AssertionError as e:
            raise AssertionError(f"{args}: {e}") from None


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True) if path.exists() else []


def run_args(tiny_dir, haystack, out, *extra, method="snapkv", depths="[0,0.25,0.5,0.75]"):
    return ["run", "--method", method, "--budget", "0.5", "--task", "niah", "--model", tiny_dir,
            "--data", haystack, "-t", f"depths={depths}", *NIAH, "--out", out, *extra]


def the_run(out: Path) -> Path:
    dirs = [p for p in (Path(out) / "runs").iterdir() if p.is_dir()]
    assert len(dirs) == 1, dirs
    return dirs[0]


# ---------------------------------------------------------------------------------------------- bad inputs

def _bad_model_dirs(root: Path, tiny_dir: Path) -> dict[str, Path]:
    """Broken copies of the tiny model directory: each a way a model on disk goes wrong."""
    out = {}

    def copy(name):
        d = root / name
        shutil.copytree(tiny_dir, d)
        return d

    d = copy("corrupt-config")
    (d / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
    out["corrupt-config"] = d
    d = copy("remote-code")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "auto_map": {"AutoModelForCausalLM": "modeling_x.X"}}))
    out["remote-code"] = d
    d = copy("half-written")
    weights = d / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    out["half-written"] = d
    d = copy("gpt2")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    out["gpt2"] = d
    fake = root / "fake.gguf"
    fake.write_text("this is not a gguf file\n")
    out["fake-gguf"] = fake
    empty = root / "empty-dir"
    empty.mkdir()
    out["empty-dir"] = empty
    return out


def _bad_data(root: Path) -> dict[str, Path]:
    out = {}
    d = root / "lb-malformed"
    d.mkdir()
    good = {"context": "The sky is blue.", "input": "What colour is the sky?", "answers": ["blue"], "length": 5,
            "all_classes": None, "language": "en", "_id": "a"}
    rows = [json.dumps({**good, "_id": str(i)}) for i in range(5)]
    rows[2] = '{"context": "cut off'
    (d / "qasper.jsonl").write_text("\n".join(rows) + "\n")
    out["lb-malformed"] = d
    d = root / "lb-schema"
    d.mkdir()
    (d / "qasper.jsonl").write_text(json.dumps({"text": "no context field", "question": "?"}) + "\n")
    out["lb-schema"] = d
    d = root / "lb-empty"
    d.mkdir()
    (d / "qasper.jsonl").write_text("")
    out["lb-empty"] = d
    d = root / "lb-parquet"
    d.mkdir()
    (d / "qasper.parquet").write_bytes(b"PAR1 not really parquet")
    out["lb-parquet"] = d
    d = root / "scbench-partial"
    d.mkdir()
    (d / "scbench_kv.jsonl").write_text(json.dumps({"id": 0, "context": "x", "multi_turns": []}) + "\n")
    out["scbench-partial"] = d
    return out


def _yaml(root: Path, name: str, text: str) -> Path:
    path = root / f"{name}.yaml"
    path.write_text(text)
    return path


def test_bad_inputs_are_one_clear_line(tmp_path, tiny_dir, haystack):
    bad_models = _bad_model_dirs(tmp_path, tiny_dir)
    bad_data = _bad_data(tmp_path)
    out = tmp_path / "results"
    base = ["run", "--task", "niah", "--model", tiny_dir, "--data", haystack, *NIAH, "--out", out]
    snap = ["--method", "snapkv"]
    lb_run = ["run", "--method", "snapkv", "--task", "longbench", "-t", "subsets=qasper", "--model", tiny_dir,
              "--out", out]
    sweep_head = f"out: {out}\nmodels: [{tiny_dir}]\nmethods: [snapkv]\ntasks: {{niah: {{lengths: [160]}}}}\n"
    cases = [
        # names
        (["run", "--method", "nope", "--task", "niah", "--out", out], "unknown method 'nope'"),
        (["run", "--method", "snapkv", "--task", "nope", "--out", out], "unknown task 'nope'"),
        (["run", "--task", "niah"], "Missing option '--method'"),
        # budgets
        (base + snap + ["--budget", "0"], "impossible"),
        (base + snap + ["--budget", "-1"], "impossible"),
        (base + snap + ["--budget", "1.5"], "neither a fraction"),
        (base + snap + ["--budget", "inf"], "not a finite number"),
        (base + snap + ["--budget", "nan"], "not a finite number"),
        (base + snap + ["--budget", "abc"], "not a number"),
        # method parameters: type and range of every dataclass field
        (base + snap + ["-m", "windw=3"], "no parameter 'windw'"),
        (base + snap + ["-m", "window=abc"], "snapkv parameter window='abc': expected a whole number"),
        (base + snap + ["-m", "window=-5"], "snapkv parameter window=-5: must be >= 1"),
        (base + snap + ["-m", "window=3.5"], "expected a whole number"),
        (base + snap + ["-m", "window=true"], "expected a whole number"),
        (base + snap + ["-m", "window"], "expected key=value"),
        (base + snap + ["-m", "budget=0.5"], "give the budget with --budget"),
        (base + ["--method", "h2o", "-m", "recent_ratio=NaN"], "must be a finite number"),
        (base + ["--method", "pyramidkv", "-m", "beta=big"], "expected a number"),
        (base + ["--method", "adakv", "-m", "scorer=nope"], "unknown method 'nope'"),
        # task parameters
        (base + snap + ["-t", "lengths=abc"], "niah parameter lengths='abc'"),
        (base + snap + ["-t", "lengths=[-3]"], "must be >= 1"),
        (base + snap + ["-t", "max_new_tokens=-1"], "must be >= 1"),
        (base + snap + ["-t", "nope=1"], "no parameter 'nope'"),
        # run options
        (base + snap + ["--limit", "0"], "--limit must be at least 1"),
        (base + snap + ["--limit", "-1"], "--limit must be at least 1"),
        (base + snap + ["--limit", "abc"], "'abc' is not a valid integer"),
        (base + snap + ["--batch-size", "0"], "--batch-size must be at least 1"),
        (base + snap + ["--prefill-chunk", "0"], "--prefill-chunk must be at least 1"),
        (base + snap + ["--max-context", "0"], "--max-context must be at least 1"),
        (base + snap + ["--temperature", "-1"], "--temperature must be a finite number"),
        (base + snap + ["--temperature", "inf"], "--temperature must be a finite number"),
        # models
        (["run", "--method", "full", "--task", "niah", "--model", tmp_path / "no" / "such" / "dir", "--out", out],
         "does not exist"),
        (["run", "--method", "full", "--task", "niah", "--model", "./no-such-model", "--out", out], "does not exist"),
        (["run", "--method", "full", "--task", "niah", "--model", tmp_path / "missing.gguf", "--out", out],
         "no such GGUF file"),
        (["run", "--method", "full", "--task", "niah", "--model", bad_models["fake-gguf"], "--out", out],
         "is not a GGUF file"),
        (["run", "--method", "full", "--task", "niah", "--model", bad_models["empty-dir"], "--out", out],
         "not a model directory"),
        (["run", "--method", "full", "--task", "niah", "--model", bad_models["corrupt-config"], "--out", out],
         "is not valid JSON"),
        (["run", "--method", "full", "--task", "niah", "--model", bad_models["remote-code"], "--out", out],
         "--trust-remote-code"),
        (["run", "--method", "full", "--task", "niah", "--model", bad_models["gpt2"], "--out", out],
         "model type 'gpt2'"),
        (["run", "--method", "full", "--task", "niah", "--model", bad_models["half-written"], "--data", haystack,
          *NIAH, "--out", out], "look corrupt or incomplete"),
        (["run", "--method", "full", "--task", "niah", "--model", "tiny-llama", "--random-weights", "--out", out],
         "tasks need a tokenizer"),
        # deltakv without trained compressors
        (base + ["--method", "deltakv"], "needs trained compressors"),
        (base + ["--method", "deltakv", "-m", "random_init=true", "-m", "window=0"],
         "deltakv parameter window=0: must be >= 1"),  # a range declared next to the field
        (base + ["--method", "deltakv", "--checkpoint", tmp_path / "none"], "no DeltaKV checkpoint"),
        # ranges declared next to the eviction methods' fields
        (base + ["--method", "snapkv", "-m", "window=0"], "snapkv parameter window=0: must be >= 1"),
        (base + ["--method", "h2o", "-m", "recent_ratio=2"], "recent_ratio=2.0: must be in [0, 1]"),
        (base + ["--method", "adakv", "-m", "alpha=1.5"], "alpha=1.5: must be in [0, 1]"),
        # methods with artifacts (kvbench calibrate / train): missing ones are one line too
        (base + ["--method", "compresskv"], "compresskv needs its calibration"),
        (base + ["--method", "kvcar", "--artifact", tmp_path / "none"], "no kvcar artifact at"),
        # data: file and line, schema, emptiness, partial suites, all before the model is loaded
        (lb_run + ["--data", bad_data["lb-malformed"]], "qasper.jsonl line 3 is not valid JSON"),
        (lb_run + ["--data", bad_data["lb-schema"]], "record 1 has no 'context'"),
        (lb_run + ["--data", bad_data["lb-empty"]], "has no records"),
        (lb_run + ["--data", tmp_path / "nothing-here"], "LongBench data not found"),
        (lb_run + ["--data", bad_data["lb-parquet"]], "is not a readable parquet file"),
        (["run", "--method", "snapkv", "--task", "scbench", "--model", tiny_dir, "--data", bad_data["scbench-partial"],
          "--out", out], "SCBench data for 11 of the 12 tasks"),
        (base[:-2] + snap + ["--data", tmp_path / "no-haystack", "--out", out], "no text found"),
        # the data is checked before the weights: a model whose weights are broken still reports the data
        (["run", "--method", "snapkv", "--task", "longbench", "-t", "subsets=qasper", "--model",
          bad_models["half-written"], "--data", bad_data["lb-empty"], "--out", out], "has no records"),
        # sweeps
        (["sweep", tmp_path / "missing.yaml"], "no sweep config"),
        (["sweep", _yaml(tmp_path, "not-yaml", "methods: [snapkv\n")], "is not valid YAML"),
        (["sweep", _yaml(tmp_path, "budget-word", sweep_head + "budgets: [abc]\n")], "not a number"),
        (["sweep", _yaml(tmp_path, "budget-inf", sweep_head + "budgets: [.inf]\n")], "not a finite number"),
        (["sweep", _yaml(tmp_path, "budget-list", sweep_head + "budgets: [[0.1]]\n")], "not a number"),
        (["sweep", _yaml(tmp_path, "limit", sweep_head + "limit: -1\n")], "limit must be a whole number >= 1"),
        (["sweep", _yaml(tmp_path, "param", sweep_head + "method_params: {snapkv: {window: abc}}\n")],
         "snapkv parameter window='abc'"),
        (["sweep", _yaml(tmp_path, "random", sweep_head + "random_weights: true\n")], "tasks need a tokenizer"),
        (["sweep", _yaml(tmp_path, "no-model", sweep_head.replace(str(tiny_dir), str(tmp_path / "gone" / "m")))],
         "does not exist"),
        # the other commands
        (["leaderboard", "--root", tmp_path / "empty-root"], "no runs under"),
        (["leaderboard", "--root", tmp_path, "--at", "abc"], "comma-separated list of floats"),
        (["plot", "--root", tmp_path, "--only", "nope"], "--only takes some of"),
        (["bench", "--preset", "tiny-llama", "--model", "x"], "either --preset"),
        (["train", "deltakv", "--model", "x", "--data", "y", "--out", tmp_path, "--steps", "0"], "at least 1"),
    ]
    started = time.perf_counter()
    each_one_line_error(cases)
    assert len(cases) >= 40
    assert not (out / "runs").exists() or not any((out / "runs").iterdir()), "a refused run left a directory"
    print(f"\n{len(cases)} bad inputs, {len(cases)} one-line errors, {time.perf_counter() - started:.1f}s")


def test_niah_distinct_depths_get_distinct_ids(tiny_dir, haystack):
    from kvbench import registry
    from kvbench.task import TaskContext
    from tests.conftest import make_tokenizer
    task = registry.build_task("niah", {"lengths": "[160]", "depths": "[0.5, 0.501, 0.25]"})
    ids = [s.id for s in task.samples(make_tokenizer(), TaskContext(3000, data=str(haystack)))]
    assert len(set(ids)) == 3 and ids[0] == "niah-160-0.50" and ids[2] == "niah-160-0.25", ids


# ---------------------------------------------------------------------------------------------- faults

def test_torn_last_line_is_redone_and_corrupt_middle_line_deletes_nothing(tmp_path, tiny_dir, haystack):
    """A kill mid-append tears the last line: the rerun trims it and redoes that one sample (kept 3,
    redone 1, lost 0). A corrupt line in the middle is no torn write: the rerun refuses, naming the file
    and the line, and changes no byte; the leaderboard lists the run as an error."""
    out = tmp_path / "a"
    assert cli(*run_args(tiny_dir, haystack, out)).exit_code == 0
    shutil.copytree(out, tmp_path / "b")
    # torn last line
    run_dir = the_run(out)
    good = lines(run_dir / "samples.jsonl")
    assert len(good) == 4
    (run_dir / "samples.jsonl").write_bytes(b"".join(good[:3]) + good[3][: len(good[3]) // 2])
    (run_dir / "metrics.json").unlink()
    res = cli(*run_args(tiny_dir, haystack, out))
    assert res.exit_code == 0, res.output
    after = lines(run_dir / "samples.jsonl")
    kept = sum(1 for a, b in zip(after, good[:3]) if a == b)
    ids = [json.loads(x)["id"] for x in after]
    assert (kept, len(after) - kept, 4 - len(set(ids))) == (3, 1, 0)  # kept, redone, lost
    assert json.loads((run_dir / "metrics.json").read_text())["complete"]
    # corrupt middle line
    run_dir = the_run(tmp_path / "b")
    good = lines(run_dir / "samples.jsonl")
    corrupt = good[0] + b'{"id": "niah-160-0.25", "pred\n' + b"".join(good[2:])
    (run_dir / "samples.jsonl").write_bytes(corrupt)
    (run_dir / "metrics.json").unlink()
    res = cli(*run_args(tiny_dir, haystack, tmp_path / "b"))
    one_line_error(res, "samples.jsonl line 2 is not a JSON record")
    assert (run_dir / "samples.jsonl").read_bytes() == corrupt  # nothing deleted
    res = cli("leaderboard", "--root", tmp_path / "b", "--out", tmp_path / "board")
    assert res.exit_code == 0 and "line 2" in res.stderr
    assert "unreadable" in (tmp_path / "board" / "leaderboard.md").read_text()


def _spawn(args: list, log: Path) -> subprocess.Popen:
    env = dict(os.environ, CI="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.Popen([sys.executable, "-m", "kvbench.cli", *map(str, args)], stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def _wait_for_records(path_of, n: int, proc: subprocess.Popen, log: Path, timeout: float = 240) -> Path:
    deadline = time.time() + timeout
    while time.time() < deadline:
        path = path_of()
        if path is not None and sum(1 for x in lines(path) if x.endswith(b"\n")) >= n:
            return path
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before it could be killed:\n{log.read_text()[-2000:]}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"no {n} records within {timeout}s:\n{log.read_text()[-2000:]}")


def _kill9(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def test_kill9_mid_run_then_concurrent_then_rerun(tmp_path, tiny_dir, haystack):
    """Run A (a real process) is frozen (SIGSTOP) after its first finished records, holding the run's lock:
    an identical run B is refused in one line naming A's pid. A is then killed with SIGKILL; its lock file is
    stale, and the rerun takes it over, keeps every finished record byte for byte, redoes only the rest and
    loses nothing."""
    out = tmp_path / "results"
    n = 6
    depths = "[" + ",".join(f"{d / n:.2f}" for d in range(n)) + "]"
    args = run_args(tiny_dir, haystack, out, "-t", "max_new_tokens=16", depths=depths)
    proc = _spawn(args, tmp_path / "a.log")
    try:
        samples = _wait_for_records(lambda: next((out / "runs").glob("*/samples.jsonl"), None) if
                                    (out / "runs").is_dir() else None, 1, proc, tmp_path / "a.log")
        os.kill(proc.pid, signal.SIGSTOP)  # A holds the lock, mid-run, for as long as B needs
        line = one_line_error(cli(*args), "is in use by pid")
        assert f"pid {proc.pid}" in line
        _kill9(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    before = lines(samples)
    finished = [x for x in before if x.endswith(b"\n")]
    assert 1 <= len(finished) < n, "A finished before it was stopped: make it longer"
    lock = samples.parent / results.LOCK_FILE
    assert f"pid {proc.pid}" in lock.read_text()  # stale: its owner is dead
    res = cli(*args)
    assert res.exit_code == 0, res.output
    after = lines(samples)
    kept = sum(1 for a, b in zip(after, finished) if a == b)
    ids = [json.loads(x)["id"] for x in after]
    lost = n - len(set(ids))
    assert (kept, len(after) - kept, lost, len(ids)) == (len(finished), n - len(finished), 0, n)
    assert json.loads((samples.parent / "metrics.json").read_text())["complete"]
    print(f"\nkill -9: kept {kept}, redone {len(after) - kept}, lost {lost}")


def test_interrupted_sweep_resumes_without_loss(tmp_path, tiny_dir, haystack):
    """A sweep killed (SIGKILL) inside its second point: the rerun skips the finished first point, resumes
    the second (its finished records kept byte for byte) and runs the third."""
    out = tmp_path / "results"
    cfg = _yaml(tmp_path, "tiny", f"""
out: {out}
models: [{tiny_dir}]
methods: [full, snapkv, streamingllm]
budgets: [0.5]
tasks: {{niah: {{lengths: [160], depths: [0.0, 0.3, 0.6, 0.9], max_new_tokens: 16}}}}
data: {haystack}
""")
    proc = _spawn(["sweep", cfg], tmp_path / "sweep.log")

    def second_point():  # polled every 20 ms: a point of 4 samples takes far longer
        found = sorted((out / "runs").glob("niah-snapkv-*/samples.jsonl")) if (out / "runs").is_dir() else []
        return found[0] if found else None
    try:
        samples = _wait_for_records(second_point, 1, proc, tmp_path / "sweep.log")
        _kill9(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    finished = [x for x in lines(samples) if x.endswith(b"\n")]
    first = next((out / "runs").glob("niah-full-*"))
    first_records = lines(first / "samples.jsonl")
    assert len(first_records) == 4 and json.loads((first / "metrics.json").read_text())["complete"]
    res = cli("sweep", cfg)
    assert res.exit_code == 0, res.output
    assert "already finished" in res.stdout and "1 skipped" in res.stdout and "2 done" in res.stdout
    after = lines(samples)
    kept = sum(1 for a, b in zip(after, finished) if a == b)
    ids = {json.loads(x)["id"] for x in after}
    assert (kept, len(after) - kept, 4 - len(ids)) == (len(finished), 4 - len(finished), 0)
    assert lines(first / "samples.jsonl") == first_records  # the finished point was not touched
    for run_dir in (out / "runs").iterdir():
        recs = [json.loads(x) for x in lines(run_dir / "samples.jsonl")]
        assert len(recs) == len({r["id"] for r in recs}) == 4, run_dir
    print(f"\ninterrupted sweep: point 2 kept {kept}, redone {len(after) - kept}, lost 0; points 1 and 3 whole")


def test_two_processes_on_one_sweep_share_its_points(tmp_path, tiny_dir, haystack):
    """Lanes on one GPU: the same sweep started twice at once runs every point once between the two (each skips
    what the other holds or has finished), and every run is whole."""
    out = tmp_path / "results"
    methods = ["full", "snapkv", "streamingllm", "knorm", "random", "tova"]
    cfg = _yaml(tmp_path, "lanes", f"""
out: {out}
models: [{tiny_dir}]
methods: [{", ".join(methods)}]
budgets: [0.5]
tasks: {{niah: {{lengths: [160], depths: [0.0, 0.5], max_new_tokens: 8}}}}
data: {haystack}
""")
    procs = [_spawn(["sweep", cfg], tmp_path / f"lane{i}.log") for i in range(2)]
    for proc in procs:
        proc.wait(timeout=600)
    logs = [(tmp_path / f"lane{i}.log").read_text() for i in range(2)]
    done = [line for log in logs for line in log.splitlines() if line.startswith("[") and ": done ->" in line]
    ran = {line.split("niah query-agnostic ")[1].split("@")[0] for line in done}
    # every point ran, by one lane or the other; a lane that reaches a point just as the other finishes it only
    # re-reads the finished records (the counts below: no sample is computed twice)
    assert ran == set(methods), logs
    assert sum(": busy" in log for log in logs) + sum("already finished" in log for log in logs) >= 1, logs
    assert not any(w in log for log in logs for w in (": crash", ": failed", ": error")), logs
    runs = sorted((out / "runs").iterdir())
    assert len(runs) == len(methods)
    for run_dir in runs:
        recs = [json.loads(x) for x in lines(run_dir / "samples.jsonl")]
        assert len(recs) == len({r["id"] for r in recs}) == 2, run_dir
        assert json.loads((run_dir / "metrics.json").read_text())["complete"]
    print(f"\ntwo lanes: {[sum(': done ->' in x for x in log.splitlines()) for log in logs]} points each")


def test_the_plan_says_how_far_a_cut_run_got(tmp_path, tiny_dir, haystack):
    """A GPU session is planned from `--plan`: a run cut by the end of a call shows the samples it resumes after
    (whole lines only: a torn last line is trimmed on resume, so it is not counted)."""
    out = tmp_path / "out"
    cfg = _yaml(tmp_path, "cut", f"""out: {out}
models: [{tiny_dir}]
methods: [snapkv]
budgets: [0.5]
tasks: {{niah: {{lengths: [160], depths: [0.0, 0.5, 1.0], max_new_tokens: 4}}}}
data: {haystack}
""")
    assert cli("sweep", cfg).exit_code == 0
    (run_dir,) = (out / "runs").iterdir()
    (run_dir / "metrics.json").unlink()  # as a call cut before the run's end leaves it
    kept = (run_dir / "samples.jsonl").read_text().splitlines(keepends=True)[:2]
    (run_dir / "samples.jsonl").write_text("".join(kept) + '{"id": "torn')
    res = cli("sweep", cfg, "--plan")
    assert res.exit_code == 0, res.output
    assert "snapkv@0.5: to run (resumes after 2 samples)" in res.stdout, res.stdout
    assert "1 to run, 0 recorded, 0 finished" in res.stdout, res.stdout


def test_a_sweep_extends_a_committed_table_whose_run_folders_are_gone(tmp_path, tiny_dir, haystack):
    """The committed leaderboard.json is the record (run folders are not kept): `sweep --recorded` runs only what
    it lacks, nothing twice, and `leaderboard --with` joins its rows to the new runs."""
    body = f"""models: [{tiny_dir}]
methods: [snapkv]
budgets: [0.5, 0.25]
tasks: {{niah: {{lengths: [160], depths: [0.0], max_new_tokens: 4}}}}
data: {haystack}
"""
    here, there = tmp_path / "here", tmp_path / "there"
    first = _yaml(tmp_path, "first", f"out: {here}\n" + body.replace("[0.5, 0.25]", "[0.5]"))
    assert cli("sweep", first).exit_code == 0
    assert cli("leaderboard", "--root", here, "--drop", "length=999").exit_code == 0
    table = here / "leaderboard.json"
    shutil.rmtree(here / "runs")
    second = _yaml(tmp_path, "second", f"out: {there}\n" + body)
    res = cli("sweep", second, "--recorded", table, "--plan")  # what a call would run, nothing run
    assert res.exit_code == 0, res.output
    assert "snapkv@0.5: recorded" in res.stdout and "snapkv@0.25: to run" in res.stdout, res.stdout
    assert "1 to run, 1 recorded, 0 finished" in res.stdout and not (there / "runs").exists()
    res = cli("sweep", second, "--recorded", table, "--plan", "--device", "cuda")  # planned for another machine
    assert "2 to run, 0 recorded" in res.stdout and "note:" not in res.stdout, res.stdout
    res = cli("sweep", second, "--recorded", table, "--plan", "--methods", "full")  # not one of its methods
    assert res.exit_code == 2 and "--methods full is not one of its methods (snapkv)" in res.output, res.output
    codec = _yaml(tmp_path, "codec", f"out: {there}\n" + body.replace("[snapkv]", "[snapkv, snapkv+kvcar]")
                  + f"method_params: {{snapkv+kvcar: {{artifact: {tmp_path / 'trained-on-the-gpu'}}}}}\n")
    res = cli("sweep", codec, "--recorded", table, "--plan")  # the codec is trained where the sweep will run
    assert res.exit_code == 0, res.output
    assert "snapkv+kvcar@0.25: to run, once its artifact is made (no kvcar artifact at" in res.stdout, res.stdout
    assert "3 to run, 1 recorded, 0 finished" in res.stdout, res.stdout
    res = cli("sweep", codec, "--recorded", table)  # running it still refuses, before any run
    assert res.exit_code == 2 and "no kvcar artifact at" in res.output and not (there / "runs").exists()
    res = cli("sweep", second, "--recorded", table)
    assert res.exit_code == 0, res.output
    assert f"snapkv@0.5: recorded in {table}" in res.stdout and "snapkv@0.25: done" in res.stdout, res.stdout
    assert len(list((there / "runs").iterdir())) == 1  # the recorded point was not run again
    res = cli("leaderboard", "--root", there, "--with", table, "--drop", "length=999")
    assert res.exit_code == 0, res.output
    rows = json.loads((there / "leaderboard.json").read_text())["runs"]
    assert sorted(r["budget"] for r in rows) == [0.25, 0.5] and all(r["status"] == "complete" for r in rows)
    # the same run in its folder and in a table is one row, the folder's (its samples are there)
    again = lb.newest(lb.collect(there, [("length", "999")], (there / "leaderboard.json", table)))
    assert len(again) == 2 and again.set_index("budget").loc[0.25, "run_dir"] is not None
    # the samples stored beside the table stand in for the folder that is gone: breakdowns and NIAH grids
    recorded_row = again.set_index("budget").loc[0.5]
    (stored,) = lb.row_samples(recorded_row.to_dict() | {"run_id": recorded_row["run_id"]})
    assert stored["meta"]["length"] == 160 and "found" in stored["scores"]
    out = subprocess.run([sys.executable, "scripts/breakdown.py", str(there), "--task", "niah", "--table", str(table)],
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr
    assert "| length | snapkv 0.25 | snapkv 0.5 |" in out.stdout, out.stdout  # the recorded run and the new one
    (here / lb.SAMPLES_FILE).write_bytes(__import__("gzip").compress(b'{"run_id": 1}\n'))
    lb._stored_samples.cache_clear()
    res = cli("leaderboard", "--root", there, "--with", table, "--drop", "length=999", "--out", tmp_path / "lb2")
    assert res.exit_code == 2 and f"{here / lb.SAMPLES_FILE}, line 1: not a record" in res.output, res.output
    # the table left out other samples than this call would: refused in one line, as is a file that is no table
    res = cli("leaderboard", "--root", there, "--with", table)
    assert res.exit_code == 2 and "left out length=999, this call nothing: pass the same --drop" in res.output
    (tmp_path / "bad.json").write_text('{"runs": [{"score": 1}]}')
    res = cli("report", "--root", there, "--with", tmp_path / "bad.json", "--out", tmp_path / "r.html")
    assert res.exit_code == 2 and "not a kvbench leaderboard.json" in res.output
    # a table copied away without its samples file: its scores still join, with a warning that its samples won't
    alone = tmp_path / "alone" / "leaderboard.json"
    alone.parent.mkdir()
    shutil.copy(table, alone)
    res = cli("leaderboard", "--root", there, "--with", alone, "--drop", "length=999", "--out", tmp_path / "lb3")
    assert res.exit_code == 0 and f"no {lb.SAMPLES_FILE} beside {alone}" in res.output, res.output


def _checkpoint(tiny_dir: Path, where: Path) -> Path:
    from kvbench.methods.deltakv.codec import build_compressors, model_signature, save_checkpoint
    lm = models.load(str(tiny_dir))
    signature = model_signature(lm.model.config)
    dim = 2 * signature["num_key_value_heads"] * signature["head_dim"]
    config = {"model": str(tiny_dir), "model_signature": signature,
              "model_fingerprint": models.weights_fingerprint(lm.model), "full_layers": [0],
              "compressed_layers": [1], "dim": dim, "latent_dim": 16, "intermediate": 24, "compressor": "swiglu",
              "stride": 3, "neighbors": 2, "sinks": 4}
    return save_checkpoint(where, build_compressors([1], dim, 16, 24, "swiglu", seed=1), config)


def test_corrupt_checkpoints_are_refused(tmp_path, tiny_dir, haystack, monkeypatch):
    """A zeroed, truncated or mismatched checkpoint is refused in one line; a save cut short leaves the
    previous checkpoint whole and loadable."""
    from kvbench.methods.deltakv import codec as deltakv
    good = _checkpoint(tiny_dir, tmp_path / "good")
    args = ["run", "--method", "deltakv", "--task", "niah", "--model", tiny_dir, "--data", haystack, *NIAH,
            "-t", "depths=[0.5]", "-m", "window=8", "-m", "sinks=4", "--out", tmp_path / "results"]
    assert cli(*args, "--checkpoint", good).exit_code == 0

    def broken(name, change):
        d = tmp_path / name
        shutil.copytree(good, d)
        change(d)
        return d

    weights = deltakv.WEIGHTS_FILE
    zeroed = broken("zeroed", lambda d: (d / weights).write_bytes(bytes((d / weights).stat().st_size)))
    truncated = broken("truncated", lambda d: (d / weights).write_bytes((d / weights).read_bytes()[:1000]))

    def edit(key, value):
        def change(d):
            cfg = json.loads((d / "config.json").read_text())
            cfg[key] = value
            (d / "config.json").write_text(json.dumps(cfg))
        return change
    wrong_dim = broken("wrong-dim", edit("dim", 96))
    wrong_latent = broken("wrong-latent", edit("latent_dim", 32))
    no_sum = broken("no-checksum", edit("weights_sha256", None))
    not_json = broken("not-json", lambda d: (d / "config.json").write_text("{"))
    cases = [(zeroed, "does not match the checksum"), (truncated, "does not match the checksum"),
             (wrong_dim, "dim 96 does not match its model"), (wrong_latent, "does not fit the dimensions"),
             (no_sum, "'weights_sha256' is missing"), (not_json, "is not valid JSON")]
    for path, needle in cases:
        one_line_error(cli(*args, "--checkpoint", path), needle)
    one_line_error(cli(*args, "--checkpoint", good, "-m", "random_init=true"), "not both")

    # A save cut short (the process dies while writing the weights): the old checkpoint stays whole.
    before = {p.name: p.read_bytes() for p in good.iterdir()}

    def dies_midway(tensors, filename, *a, **k):
        Path(filename).write_bytes(b"partial")
        raise KeyboardInterrupt
    monkeypatch.setattr("safetensors.torch.save_file", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        _checkpoint(tiny_dir, good)
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    deltakv.read_checkpoint_config(good)  # the checksum still holds


# ---------------------------------------------------------------------------------------------- leaderboard

def _fake_run(root: Path, name: str, *, method="snapkv", budget=0.5, task_params=None, provenance="dir digest:1",
              score=50.0, ratio=0.5) -> Path:
    run_dir = root / "runs" / name
    config = {"task": "niah", "method": method, "budget": budget, "protocol": "query-agnostic", "model": "m",
              "model_name": "/models/tiny", "model_provenance": provenance, "limit": None, "batch_size": 1,
              "device": "cpu", "dtype": "float32", "method_params": {"budget": budget},
              "task_params": task_params or {"max_new_tokens": 48}}
    results.write_json(run_dir / "config.json", config)
    results.append_jsonl(run_dir / "samples.jsonl", {"id": "x", "scores": {"score": score}, "kv_ratio_prefill": ratio})
    results.write_json(run_dir / "metrics.json", {"complete": True, "n_samples": 1, "summary": {"score": score},
                                                  "kv_ratio_prefill": ratio, "kv_ratio_end": ratio})
    return run_dir


def test_leaderboard_compares_only_like_with_like_and_lists_corrupt_runs(tmp_path):
    root = tmp_path / "results"
    _fake_run(root, "a-full", method="full", budget=1.0, score=90.0, ratio=1.0)
    _fake_run(root, "a-snap")
    _fake_run(root, "b-snap-8tokens", task_params={"max_new_tokens": 8}, score=70.0)
    _fake_run(root, "c-snap-gguf", provenance="gguf sha256:abc", score=10.0)
    bad_config = _fake_run(root, "d-bad-config")
    (bad_config / "config.json").write_text("{ not json")
    bad_metrics = _fake_run(root, "e-bad-metrics")
    (bad_metrics / "metrics.json").write_text("")
    df = lb.collect(root)
    assert set(df[df["status"] == "unreadable"]["run_id"]) == {"d-bad-config", "e-bad-metrics"}
    assert df[df["status"] == "complete"]["setting"].nunique() == 3  # 48 tokens, 8 tokens, GGUF weights
    md = lb.render_markdown(df)
    assert md.count("Shared settings:") == 3
    assert "max_new_tokens" in md and "gguf sha256:abc" in md
    assert "d-bad-config: config.json is corrupt" in md and "e-bad-metrics: metrics.json is corrupt" in md
    rank = lb.ranking(df)
    assert len(rank[rank["method"] == "snapkv"]) == 3  # one rank per setting, never one merged row
    res = cli("leaderboard", "--root", root, "--out", tmp_path / "board")
    assert res.exit_code == 0 and len(res.stderr.strip().splitlines()) == 2  # a warning per unreadable run
    assert not list((tmp_path / "board").glob(".*tmp*"))  # written atomically: no temporary left


def test_report_elsewhere_does_not_draw_into_root(tmp_path):
    root = tmp_path / "results"
    _fake_run(root, "a-full", method="full", budget=1.0, score=90.0, ratio=1.0)
    _fake_run(root, "a-snap")
    res = cli("report", "--root", root, "--out", tmp_path / "elsewhere" / "r.html")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "elsewhere" / "r.html").is_file() and not (root / "plots").exists()
    assert not (root / "report.html").exists()


def test_deltakv_random_init_is_labelled():
    assert lb.method_label("deltakv", {"random_init": True}) == "deltakv(random_init=True)"


def test_out_of_memory_mid_run_is_one_line_and_keeps_the_finished(tmp_path, tiny_dir, haystack, monkeypatch):
    from kvbench.engine import Engine
    real, calls = Engine.generate, []

    def runs_out(self, samples, *a, **k):
        calls.append(len(samples))
        if len(calls) == 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, samples, *a, **k)
    monkeypatch.setattr(Engine, "generate", runs_out)
    with warnings.catch_warnings():  # transformers' deprecation of past_key_values is not kvbench's output
        warnings.simplefilter("ignore", FutureWarning)
        res = cli(*run_args(tiny_dir, haystack, tmp_path))
    one_line_error(res, "out of memory")
    run_dir = the_run(tmp_path)
    kept = lines(run_dir / "samples.jsonl")
    assert len(kept) == 2 and json.loads((run_dir / "error.json").read_text())["status"] == "oom"
    monkeypatch.setattr(Engine, "generate", real)
    assert cli(*run_args(tiny_dir, haystack, tmp_path)).exit_code == 0
    after = lines(run_dir / "samples.jsonl")
    assert after[:2] == kept and len(after) == 4 and not (run_dir / "error.json").exists()


def test_an_out_of_the_wrong_kind_or_a_bad_device_is_one_line(tmp_path, tiny_dir, haystack):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    cases = [
        (run_args(tiny_dir, haystack, a_file), "is a file"),
        (["report", "--root", tmp_path, "--out", tmp_path, "--plots", tmp_path], "is a directory"),
        (["bench", "--preset", "tiny-llama", "--device", "cpu", "--contexts", "64", "--batches", "1", "--peers", "",
          "--out", a_file], "is a file"),
        (["bench", "--preset", "tiny-llama", "--device", "nope", "--peers", ""], "unknown --device 'nope'"),
    ]
    each_one_line_error(cases)
