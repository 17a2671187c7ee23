"""Every block of the README runs as written, offline, in a fresh folder, and again there.

How each kind of block is exercised:

- shell blocks of ``detoxrl`` commands run in order, through the CLI's ``main()`` in this
  process, in a fresh folder with the data at ``../shared/data`` as in a checkout; then the
  whole sequence runs a second time in the same folder. The full ``detoxrl demo`` (about 11
  minutes) runs in its quick form: ``--quick`` is appended, which runs every stage's real
  code at tiny sizes. Commands that read the data (the demo, and the run built from its
  output) are skipped when ``../shared/data`` is absent.
- blocks marked ``# needs the Hugging Face Hub`` run in a subprocess with an empty Hugging
  Face cache and the Hub offline: each command must stop at once with exit status 2 and a
  message naming what is missing, never a traceback.
- the install block (``# needs the network``) cannot run offline: what it names is checked
  instead (the torch pin is the installed torch and CI's; the extras exist).
- ``python -m pytest -q`` is this suite; it is checked to be CI's test command.
- each Python block runs alone in its own fresh folder, twice, with a fresh namespace.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import SHARED_DATA
from detoxrl.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
HUB = "# needs the Hugging Face Hub"
NETWORK = "# needs the network"


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def commands(block: str) -> list[list[str]]:
    """The block's commands as argument lists: comments dropped, continuations joined."""
    joined = re.sub(r"\\\n", " ", block)
    return [argv for line in joined.splitlines() if (argv := shlex.split(line, comments=True))]


def kind(block: str) -> str:
    if HUB in block:
        return "hub"
    if NETWORK in block:
        return "install"
    if commands(block)[0][:3] == ["python", "-m", "pytest"]:
        return "tests"
    return "run"


def needs_data(argv: list[str]) -> bool:
    return argv[1] == "demo" or any("demo-quick" in a or "shared/data" in a for a in argv)


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def test_readme_is_short_and_every_block_is_exercised():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250
    shell = blocks("bash")
    assert len(shell) + len(blocks("python")) == text.count("```") // 2  # no other languages
    kinds = [kind(b) for b in shell]
    assert kinds.count("hub") >= 2 and kinds.count("install") == 1 and "tests" in kinds
    for block in shell:
        if kind(block) == "run":
            assert all(argv[0] == "detoxrl" for argv in commands(block)), block


@pytest.mark.slow
def test_readme_shell_blocks_run_twice_in_a_fresh_folder(tmp_path, monkeypatch):
    (tmp_path / "shared").mkdir()
    if SHARED_DATA.is_dir():
        (tmp_path / "shared" / "data").symlink_to(SHARED_DATA)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    runnable = [argv for b in blocks("bash") if kind(b) == "run" for argv in commands(b)]
    assert any(argv[1:3] == ["demo", "--quick"] for argv in runnable)
    for attempt in (1, 2):
        for argv in runnable:
            if needs_data(argv) and not SHARED_DATA.is_dir():
                continue  # the real data is absent: the demo's blocks cannot run
            if argv[1:] == ["demo"]:
                argv = [*argv, "--quick"]  # the quick form of the 11-minute demo
            code, _, err = run_cli(argv[1:])
            assert code == 0, f"attempt {attempt}: {shlex.join(argv)}\n{err}"
    assert (work / "runs" / "tiny" / "eval" / "compare.html").is_file()
    assert (work / "runs" / "tiny" / "report.html").is_file()
    generated = run_cli(["generate", "runs/tiny", "a prompt", "--with", "both", "--greedy",
                         "--max-new-tokens", "4"])[1]
    assert "trained:" in generated and "reference:" in generated
    if SHARED_DATA.is_dir():
        assert (work / "runs" / "demo-quick" / "5-report" / "report.html").is_file()
        assert (work / "runs" / "my-causal" / "adapter_model.safetensors").is_file()


def test_readme_hub_blocks_fail_fast_and_clearly_offline(tmp_path):
    hub = [argv for b in blocks("bash") if kind(b) == "hub" for argv in commands(b)]
    assert hub
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "PYTHONPATH": str(ROOT / "src")}
    for attempt in (1, 2):
        for argv in hub:
            start = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "detoxrl", *argv[1:]], cwd=tmp_path,
                                  env=env, capture_output=True, text=True, timeout=300)
            took = time.perf_counter() - start
            assert proc.returncode == 2, (attempt, argv, proc.stderr)
            assert "Traceback" not in proc.stderr
            assert "not in the Hugging Face cache" in proc.stderr, proc.stderr
            named = argv[argv.index("--model.name_or_path") + 1] if (
                "--model.name_or_path" in argv) else "google/flan-t5-base"
            assert named in proc.stderr
            assert took < 120, f"{shlex.join(argv)} took {took:.0f} s to fail"
            assert not (tmp_path / "runs").exists()  # nothing half-written


def test_readme_install_block_names_what_is_installed():
    (block,) = [b for b in blocks("bash") if kind(b) == "install"]
    pin = re.search(r"pip install torch==(\S+) --index-url https://download\.pytorch\.org/whl/cpu",
                    block)
    assert pin, block
    assert torch.__version__.split("+")[0] == pin.group(1)
    assert f"torch=={pin.group(1)}" in (ROOT / ".ci" / "run").read_text()
    extras = re.search(r'pip install -e "\.\[([\w,]+)\]"', block).group(1).split(",")
    pyproject = (ROOT / "pyproject.toml").read_text()
    section = pyproject.split("[project.optional-dependencies]")[1].split("\n[")[0]
    assert set(extras) <= set(re.findall(r"^([\w-]+) = \[", section, flags=re.M))


def test_readme_test_command_is_what_ci_runs():
    (block,) = [b for b in blocks("bash") if kind(b) == "tests"]
    assert "python3 " + block.strip().removeprefix("python ") in (
        ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_readme_python_block_runs_alone_twice(index, tmp_path, monkeypatch, capsys):
    block = blocks("python")[index]
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        exec(compile(block, f"README.md python block {index + 1}", "exec"),
             {"__name__": "__readme__"})
        assert capsys.readouterr().out.strip()  # each block prints what it shows


def test_readme_and_docs_links_resolve():
    for page in [README, *(ROOT / "docs").glob("*.md")]:
        for link in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            if not link.startswith(("http://", "https://")):
                assert (page.parent / link).exists(), f"{page.name}: {link}"
