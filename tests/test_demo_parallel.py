"""``detoxrl demo --jobs N``: stages side by side in forked processes.

The stages here are small functions, not models: what is tested is the scheduling (a stage
starts only after its upstream stages, independent ones overlap), where each stage's output
goes, and what a failing or killed stage does to the run. The real stages in parallel are
run by ``tests/test_demo.py::test_quick_demo`` on a machine with two cores or more.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from detoxrl.demo.cache import RECORD, Stage
from detoxrl.demo.parallel import default_jobs, needs, run_stages
from detoxrl.demo.settings import DemoConfig
from detoxrl.errors import ConfigError, DetoxError

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="parallel stages are forked processes (Linux)")


def _meet(root: Path, me: str, other: str, timeout: float = 20.0) -> bool:
    """Mark ``me`` as started and wait for ``other`` to start: True if both ran at once."""
    (root / f"{me}.started").write_text("")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (root / f"{other}.started").exists():
            return True
        time.sleep(0.01)
    return False


def _stages(root: Path, fail: str | None = None, wait: float = 20.0) -> list[Stage]:
    """a and b need nothing and wait (up to ``wait`` s) for each other to start; c needs
    both and reads their files."""

    def side(me: str, other: str):
        def build(folder: Path) -> dict:
            print(f"{me} says hello")           # the stage's own output: its log file
            if me == fail:
                raise ConfigError(f"stage {me} cannot run: fix its option.")
            met = _meet(root, me, other, wait)
            (folder / "out.txt").write_text(me)
            return {"met": met, "pid": os.getpid()}
        return build

    def joined(folder: Path) -> dict:
        text = (root / "a" / "out.txt").read_text() + (root / "b" / "out.txt").read_text()
        (folder / "out.txt").write_text(text)
        return {"text": text, "pid": os.getpid()}

    return [Stage("a", root / "a", {"n": 1}, side("a", "b")),
            Stage("b", root / "b", {"n": 2}, side("b", "a")),
            Stage("c", root / "c", {"upstream": {"a": "ka", "b": "kb"}}, joined)]


def test_independent_stages_run_at_once_and_their_dependants_after(tmp_path, capsys):
    stages = _stages(tmp_path)
    assert [needs(s) for s in stages] == [set(), set(), {"a", "b"}]
    results = run_stages(stages, False, 2, tmp_path, label=lambda s: f"<{s.name}>")
    assert [r.name for r in results] == ["a", "b", "c"]
    assert results[0].result["met"] and results[1].result["met"]     # a and b overlapped
    assert results[2].result["text"] == "ab"                         # c saw both outputs
    pids = {r.result["pid"] for r in results}
    assert len(pids) == 3 and os.getpid() not in pids               # one process a stage
    printed = capsys.readouterr().out
    for name in "abc":
        assert f"<{name}>: building (not built yet)" in printed
        assert f"<{name}>: done in" in printed
        assert json.loads((tmp_path / name / RECORD).read_text())["stage"] == name
    assert "says hello" not in printed
    assert "a says hello" in (tmp_path / "logs" / "a.log").read_text()
    # A second run finds every stage built and starts no build.
    again = run_stages(_stages(tmp_path), False, 2, tmp_path, label=lambda s: s.name)
    assert all(r.cached for r in again)


def test_one_job_runs_the_stages_here_one_after_another(tmp_path, capsys):
    results = run_stages(_stages(tmp_path, wait=0.5), False, 1, tmp_path,
                         label=lambda s: s.name)
    assert {r.result["pid"] for r in results} == {os.getpid()}
    assert not results[0].result["met"] and results[1].result["met"]  # a waited alone
    assert "a says hello" in capsys.readouterr().out
    assert not (tmp_path / "logs").exists()


def test_a_failing_stage_stops_the_run_with_its_own_error(tmp_path):
    with pytest.raises(ConfigError, match="stage b cannot run: fix its option"):
        run_stages(_stages(tmp_path, fail="b"), False, 2, tmp_path, label=lambda s: s.name)
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
    # Stage a was waiting for b; it was stopped with the run, its folder removed, and a
    # rerun builds what is missing.
    assert not (tmp_path / "a").exists()
    results = run_stages(_stages(tmp_path), False, 2, tmp_path, label=lambda s: s.name)
    assert results[2].result["text"] == "ab"


def test_a_stage_that_dies_or_breaks_is_named_with_its_log(tmp_path):
    def dies(folder: Path) -> dict:
        print("about to stop")
        sys.stdout.flush()
        os._exit(3)

    def breaks(folder: Path) -> dict:
        raise ValueError("a bug")

    with pytest.raises(DetoxError, match=r"dies stage stopped \(exit code 3\).*dies\.log"):
        run_stages([Stage("dies", tmp_path / "dies", {}, dies)], False, 2, tmp_path,
                   label=lambda s: s.name)
    assert "about to stop" in (tmp_path / "logs" / "dies.log").read_text()
    with pytest.raises(RuntimeError, match="breaks stage failed: ValueError: a bug"):
        run_stages([Stage("breaks", tmp_path / "breaks", {}, breaks)], False, 2, tmp_path,
                   label=lambda s: s.name)
    assert "Traceback" in (tmp_path / "logs" / "breaks.log").read_text()


def test_a_stage_whose_upstream_is_missing_is_refused(tmp_path):
    stage = Stage("c", tmp_path / "c", {"upstream": {"gone": "k"}}, lambda folder: {})
    with pytest.raises(ValueError, match="'c' needs \\['gone'\\]"):
        run_stages([stage], False, 2, tmp_path, label=lambda s: s.name)


def test_jobs_option():
    assert default_jobs() >= 1
    with pytest.raises(ConfigError, match="--jobs must be at least 1"):
        DemoConfig(jobs=0).finalize()
    assert DemoConfig(jobs=2).finalize().jobs == 2


def test_the_heaviest_ready_stages_start_first(tmp_path):
    def build(me: str):
        def run(folder: Path) -> dict:
            seen = sorted(p.stem for p in tmp_path.glob("*.started"))
            (tmp_path / f"{me}.started").write_text("")
            time.sleep(0.3)
            return {"seen": seen}
        return run

    stages = [Stage(n, tmp_path / n, {"n": n}, build(n), weight=w)
              for n, w in (("x", 1), ("y", 1), ("z", 5))]
    results = {r.name: r.result["seen"] for r in run_stages(
        stages, False, 2, tmp_path, label=lambda s: s.name)}
    assert "y" not in results["z"] and "y" not in results["x"]   # z and x went first
    assert {"x", "z"} & set(results["y"])                        # y waited for one of them


def test_stages_die_with_the_demo(tmp_path):
    """``kill -9`` of the demo's process takes its stage processes with it, so that none
    keeps writing a folder that the next run rebuilds."""
    import signal
    import subprocess
    import textwrap

    script = textwrap.dedent(f"""
        import os, time
        from pathlib import Path
        from detoxrl.demo.cache import Stage
        from detoxrl.demo.parallel import run_stages
        root = Path({str(tmp_path)!r})
        def build(folder):
            (root / "stage.pid").write_text(str(os.getpid()))
            time.sleep(120)
        run_stages([Stage("slow", root / "slow", {{}}, build)], False, 2, root,
                   label=lambda s: s.name)
    """)
    demo = subprocess.Popen([sys.executable, "-c", script])
    pid_file = tmp_path / "stage.pid"
    deadline = time.monotonic() + 60
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    stage_pid = int(pid_file.read_text())
    demo.send_signal(signal.SIGKILL)
    demo.wait()
    deadline = time.monotonic() + 10
    while _alive(stage_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(stage_pid)


def _alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped is not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
