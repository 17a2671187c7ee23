"""The demo's stages side by side: each stage starts once the stages it reads are built.

A stage needs the stages named in its inputs' ``upstream`` (:mod:`detoxrl.demo.pipeline`):
the reward and policy stages need nothing but the data folder, RL needs them, and the three
evaluations need RL. With ``jobs`` > 1, up to that many stages whose upstream stages are
done run at once (the heaviest first), each in a forked process with the parent's single
torch thread, so a 2-core CPU trains the reward classifier beside the LM and evaluates two
sets at a time. A stage seeds itself and reads only its upstream folders, so each gives the
bytes it gives when the stages run one after another.

A running stage's own output (training logs, evaluation tables) goes to
``<demo>/logs/<stage>.log``; its event lines (building, done) come back to this process and
are printed here. A stage that fails stops the others, and the folders they had begun are
removed; a stopped demo resumes as before, from the stages it had finished. Linux kills a
stage's process when the demo's dies.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from pathlib import Path

from ..errors import DetoxError
from .cache import Stage, StageResult, read_record, run_stage

LOG_DIR = "logs"
_PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h): a signal for when the parent dies

Label = Callable[[Stage], str]


def needs(stage: Stage) -> set[str]:
    """The names of the stages whose outputs ``stage`` reads."""
    return set(stage.inputs.get("upstream") or {})


def default_jobs() -> int:
    """One stage per CPU core this process may use, over the torch threads each stage
    takes, on Linux; 1 with a GPU, whose context a forked process cannot share, and on
    other systems, where forking a process that loaded torch is not safe."""
    import torch

    if torch.cuda.is_available() or not sys.platform.startswith("linux"):
        return 1
    return max(1, len(os.sched_getaffinity(0)) // max(1, torch.get_num_threads()))


def run_stages(stages: list[Stage], fresh: bool, jobs: int, root: Path,
               label: Label) -> list[StageResult]:
    """Every stage run (or skipped when up to date) once its upstream stages are done; the
    results in the order of ``stages``. ``label(stage)`` prefixes its printed lines."""
    if jobs <= 1:
        return [run_stage(stage, fresh, log=lambda text, s=stage: print(
            f"{label(s)}: {text}", flush=True)) for stage in stages]
    (root / LOG_DIR).mkdir(exist_ok=True)
    context = multiprocessing.get_context("fork")
    done: dict[str, StageResult] = {}
    waiting = list(stages)
    running: dict[Connection, tuple[Stage, multiprocessing.Process]] = {}
    try:
        while waiting or running:
            ready = sorted((s for s in waiting if needs(s) <= done.keys()),
                           key=lambda s: -s.weight)
            for stage in ready[:jobs - len(running)]:
                waiting.remove(stage)
                receive, send = context.Pipe(duplex=False)
                process = context.Process(target=_stage_process, name=f"detoxrl-{stage.name}",
                                          args=(stage, fresh, send, root / LOG_DIR))
                process.start()
                send.close()
                running[receive] = (stage, process)
            if not running:  # a stage needs one that is not in the list
                raise ValueError(f"stage {waiting[0].name!r} needs {sorted(needs(waiting[0]))}, "
                                 f"of which only {sorted(done)} are among the stages")
            for receive in wait(list(running)):
                stage, process = running[receive]
                result = _receive(receive, stage, process, label, root / LOG_DIR)
                if result is not None:
                    del running[receive]
                    process.join()
                    done[stage.name] = result
    finally:
        for stage, process in running.values():
            process.kill()
            process.join()
            _drop_unfinished(stage)
    return [done[stage.name] for stage in stages]


def _drop_unfinished(stage: Stage) -> None:
    """Remove the folder of a stage stopped halfway (no record of its build), so that a
    failed run leaves no half-written stage behind; a rerun builds it afresh either way."""
    import shutil

    record = read_record(stage.folder)
    if stage.folder.is_dir() and (record is None or record.get("key") != stage.key):
        shutil.rmtree(stage.folder, ignore_errors=True)


def _receive(receive: Connection, stage: Stage, process, label: Label, logs: Path
             ) -> StageResult | None:
    """Print a stage's event line, or return its result; raise what stopped it."""
    try:
        kind, value = receive.recv()
    except EOFError:  # the process ended without a word: killed, or out of memory
        process.join()
        raise DetoxError(f"The demo's {stage.name} stage stopped (exit code "
                         f"{process.exitcode}) before it finished; its output is in "
                         f"{str(logs / (stage.name + '.log'))!r}. Run the demo again to "
                         "resume from the stages already built.") from None
    if kind == "log":
        print(f"{label(stage)}: {value}", flush=True)
        return None
    if kind == "error":
        raise value
    return value


def _stage_process(stage: Stage, fresh: bool, send: Connection, logs: Path) -> None:
    """A forked process's whole life: build ``stage``, send back its events and result."""
    _die_with_parent()
    with open(logs / f"{stage.name}.log", "w", encoding="utf-8", buffering=1) as log:
        # Python's writers and the libraries' C-level ones alike go to the log.
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        sys.stdout = sys.stderr = log
        try:
            result = run_stage(stage, fresh, log=lambda text: send.send(("log", text)))
        except Exception as exc:  # sent to the parent, which raises it
            sys.stdout.flush()
            send.send(("error", exc if isinstance(exc, DetoxError) else _unexpected(
                stage, exc, logs)))
            raise SystemExit(1) from None
        sys.stdout.flush()
        sys.stderr.flush()
        send.send(("result", result))


def _unexpected(stage: Stage, exc: Exception, logs: Path) -> Exception:
    """A bug's exception as one that pickles, its traceback kept in the stage's log."""
    import traceback

    traceback.print_exception(exc)
    sys.stderr.flush()
    return RuntimeError(f"the demo's {stage.name} stage failed: {type(exc).__name__}: {exc} "
                        f"(traceback in {str(logs / (stage.name + '.log'))!r})")


def _die_with_parent() -> None:
    """Have Linux kill this process when the demo's process dies (``kill -9`` included),
    so that no orphan keeps writing a stage folder that a rerun rebuilds."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the request took hold
        os._exit(1)
