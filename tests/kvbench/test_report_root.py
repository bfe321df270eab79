"""``kvbench report --root TYPO`` wrote an HTML page saying "No runs yet" and exited 0 (``leaderboard`` and ``plot``
refuse the same root): a mistyped root now is one error line; a root whose runs folder exists still gets a page."""
from __future__ import annotations

from click.testing import CliRunner

from kvbench.cli import main


def test_report_on_a_root_without_runs_is_one_line(tmp_path):
    res = CliRunner().invoke(main, ["report", "--root", str(tmp_path / "typo"), "--out", str(tmp_path / "r.html")])
    assert res.exit_code == 2 and "no runs under" in res.stderr and "check --root" in res.stderr, res.output
    assert not (tmp_path / "r.html").exists()
    (tmp_path / "empty" / "runs").mkdir(parents=True)
    res = CliRunner().invoke(main, ["report", "--root", str(tmp_path / "empty"), "--out", str(tmp_path / "r.html")])
    assert res.exit_code == 0 and "No runs yet" in (tmp_path / "r.html").read_text()
