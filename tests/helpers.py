"""Helpers shared by test modules (pytest puts this folder on sys.path)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
import yaml

from detoxrl.cli import main


def cli(*argv: str) -> tuple[int, str]:
    """Run ``detoxrl ARGV...`` in this process: ``(exit code, what it printed)``."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(list(argv))
    return code, out.getvalue()


def load_bench(name: str) -> ModuleType:
    """``bench/NAME.py`` imported as a module (bench/ is not a package)."""
    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_BAD = ["awful", "vile", "disgusting", "filthy", "scum", "worthless"]
_GOOD = ["lovely", "kind", "great", "helpful", "friendly", "wonderful"]
_NOUNS = ["people", "neighbours", "teachers", "cats", "drivers", "students"]


def labelled_texts(n: int, seed: int = 0) -> tuple[list[str], list[int]]:
    """A trivially separable toxic/non-toxic task: one word decides the label."""
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(n):
        label = rng.randint(0, 1)
        word = rng.choice(_BAD if label else _GOOD)
        texts.append(f"those {rng.choice(_NOUNS)} are {word} and {rng.choice(_NOUNS)} know it")
        labels.append(label)
    return texts, labels


def reward_config(tmp_path: Path, **extra) -> Path:
    """A tiny train-reward config over the ``dyna_dir`` fixture; ``extra``: dotted keys."""
    cfg = {
        "model": {"architecture": "roberta", "vocab_size": 1000, "hidden_size": 32,
                  "num_layers": 1, "num_heads": 2, "intermediate_size": 64,
                  "max_positions": 32},
        "data": {"train": {"path": "dyna/Train.csv", "labels_path": "dyna/Train_label.csv",
                           "format": "tsv", "header": False, "text_column": "0"},
                 "eval": {"path": "dyna/Test.csv", "labels_path": "dyna/Test_label.csv",
                          "format": "tsv", "header": False, "text_column": "0"},
                 "max_length": 32},
        "training": {"learning_rate": 3e-3, "epochs": 12, "batch_size": 16,
                     "logging_steps": 5},
    }
    for key, value in extra.items():
        node = cfg
        *parents, leaf = key.split(".")
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    path = tmp_path / "reward.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now, for a launched process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Marks of a test that launches real processes: slow, and skipped where `accelerate launch`
# or a gloo process group cannot run.
LAUNCH_MARKS = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate CLI not found"),
    pytest.mark.skipif(not (torch.distributed.is_available()
                            and torch.distributed.is_gloo_available()),
                       reason="torch.distributed with gloo is required"),
]


# ------------------------------------------------------------------ launches of N processes

DRIVER = Path(__file__).resolve().parent / "sharded_driver.py"


def launch_env(root: Path) -> dict[str, str]:
    """The environment of a test's launches: no rank, launcher or FSDP variables inherited,
    the tiny models built under ``root``, offline, one thread, this checkout's ``src`` first."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
           and not k.startswith(("ACCELERATE_", "FSDP_"))}
    src = Path(__file__).resolve().parents[1] / "src"
    env.update({"DETOXRL_CACHE": str(root / "cache"), "HF_HUB_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
                "PYTHONPATH": os.pathsep.join([str(src), env.get("PYTHONPATH", "")])})
    return env


def serve_plan(plan: list[list], path: Path, env: dict[str, str], timeout: float
               ) -> tuple[subprocess.CompletedProcess, dict[str, dict]]:
    """Every launch of ``plan`` (``[name, accelerate launch argv, env]`` each) in turn, from
    one ``sharded_driver.py --serve`` helper: its process, and per launch the returncode and
    seconds (empty where the helper itself failed)."""
    path.write_text(json.dumps(plan))
    proc = subprocess.run([sys.executable, str(DRIVER), "--serve", str(path)],
                          cwd=DRIVER.parents[1], env=env, capture_output=True, text=True,
                          timeout=timeout)
    out = Path(f"{path}.out")
    status = json.loads(out.read_text()) if proc.returncode == 0 and out.exists() else {}
    return proc, status


def why(stderr: str) -> str:
    """The workers' own tracebacks, not just torchrun's summary that follows them."""
    start = stderr.find("Traceback")
    return stderr[start:start + 8000] if start >= 0 else stderr[-8000:]
