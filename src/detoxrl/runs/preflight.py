"""Checks that run before any model loads: Hub resources, trackers, CPU threads, and the
``detoxrl`` command's memory allocator.

Offline (``HF_HUB_OFFLINE=1``, or huggingface.co unreachable), every model, adapter,
classifier and dataset named by a Hub id must already be in the local Hugging Face cache;
all that are not are reported in one error, in well under a second, instead of one per
attempt after 30-60 s of download retries each. When the Hub turns out to be unreachable,
the process switches to offline mode so that the cached ones load at once.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from ..errors import ConfigError, ModelLoadError

TRACKING_EXTRA = "pip install 'detoxrl[tracking]'"


def looks_local(name: str) -> bool:
    """A path rather than a Hub id: Hub ids are 'name' or 'owner/name'."""
    return (name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1
            or Path(name).suffix.lower() in (".jsonl", ".json", ".csv", ".parquet"))


def check_hub_resources(resources: list[tuple[str, str, str, str | None]]) -> None:
    """Refuse, all at once, the resources that cannot be found.

    ``resources``: ``(option, name, kind, revision)`` with kind ``model`` (a folder or repo
    with config.json), ``adapter`` (adapter_config.json) or ``dataset``. Local paths must
    exist; Hub ids must be cached when offline. ``tiny:`` names are always available.
    """
    missing_local, hub = [], []
    for option, name, kind, revision in resources:
        if not name or name.startswith("tiny:"):
            continue
        if Path(name).expanduser().exists():
            continue
        (missing_local if looks_local(name) else hub).append((option, name, kind, revision))
    missing_hub = [r for r in hub if not _cached(*r[1:])] if hub and hub_offline() else []
    if not missing_local and not missing_hub:
        return
    lines = [f"--{option} {name!r}: no such local folder or file" for option, name, *_ in
             missing_local]
    lines += [f"--{option} {name!r}: not in the Hugging Face cache and the Hub is offline "
              f"(get it elsewhere with `hf download {name}"
              f"{' --repo-type dataset' if kind == 'dataset' else ''} --local-dir DIR` and "
              f"pass DIR)" for option, name, kind, _ in missing_hub]
    raise ModelLoadError(f"{len(lines)} resource(s) cannot be loaded: " + "; ".join(lines)
                         + ". Pass local folders or files instead (e.g. --model.name_or_path "
                         "./flan-t5-base); 'tiny:' names build small offline stand-ins.")


def hub_offline(timeout: float = 2.0) -> bool:
    """True under HF_HUB_OFFLINE=1, or when the Hub's host does not answer within
    ``timeout`` seconds; in the latter case offline mode is switched on for this process."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return True
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return False
    except OSError:
        _go_offline()
        return True


def _go_offline() -> None:
    import datasets.config
    from huggingface_hub import constants

    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True
    datasets.config.HF_HUB_OFFLINE = True


def _cached(name: str, kind: str, revision: str | None) -> bool:
    from huggingface_hub import constants, try_to_load_from_cache

    if kind == "dataset":
        hub = Path(constants.HF_HUB_CACHE) / f"datasets--{name.replace('/', '--')}"
        import datasets.config

        arrow = Path(datasets.config.HF_DATASETS_CACHE) / name.replace("/", "___")
        return hub.is_dir() or arrow.is_dir()
    filename = "adapter_config.json" if kind == "adapter" else "config.json"
    found = try_to_load_from_cache(name, filename, revision=revision)
    return isinstance(found, str)


def check_trackers(names: list[str]) -> None:
    """Every ``log_with`` tracker must be known to Accelerate and installed."""
    if not names:
        return
    import accelerate.utils as au
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    for name in names:
        if name == "all":
            continue
        if name not in LOGGER_TYPE_TO_CLASS:
            raise ConfigError(f"log_with: unknown tracker {name!r}; Accelerate knows "
                              + ", ".join(sorted(LOGGER_TYPE_TO_CLASS)) + ".")
        if not getattr(au, f"is_{name}_available", lambda: True)():
            hint = (f"{TRACKING_EXTRA} (installs tensorboard)" if name == "tensorboard"
                    else f"pip install {name.replace('_', '-')}")
            raise ConfigError(f"log_with: the tracker {name!r} is not installed. Install it "
                              f"({hint}) or drop it from --log_with.")


def default_cpu_threads() -> int:
    """One intra-op torch thread on CPU unless OMP_NUM_THREADS says otherwise; returns it.

    torch's default (one thread per core) spins on every core: on a machine where other
    work holds a core, the tiny preset measured 7-10 s a step with 2 threads against 0.95 s
    with 1 (docs/install.md, "Threads"). One thread also keeps CPU results independent of the
    core count. GPU runs are unaffected; set OMP_NUM_THREADS=N for N threads on an idle machine.
    """
    import torch

    if "OMP_NUM_THREADS" in os.environ or torch.cuda.is_available():
        return torch.get_num_threads()
    torch.set_num_threads(1)
    return 1


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
HEAP_STEP = 256 * 2**20  # the heap grows by this much more than asked: fewer, larger steps


def reuse_freed_memory() -> bool:
    """Keep freed memory in the process for the next allocation (glibc only); True if set.

    glibc serves every block over 32 MiB with its own mmap and unmaps it on free, so each new
    vocabulary-sized tensor (a (B, T, V) logits or softmax) is paid for again in page faults:
    `detoxrl demo` spent 23% of its CPU time in the kernel (241 of 1,055 s). Served from
    the heap instead (``M_MMAP_MAX`` 0), never trimmed and grown in large steps, freed
    blocks are reused, with byte-identical results (docs/install.md, "Memory allocator").
    Left alone when the allocator is another one (``LD_PRELOAD``) or tuned through
    ``MALLOC_*`` variables.
    """
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if os.environ.get("LD_PRELOAD") or any(k.startswith("MALLOC_") for k in os.environ):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    # The trim threshold is a C int: 2 GiB - 1 is the largest it takes.
    settings = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1), (M_TOP_PAD, HEAP_STEP))
    return all(libc.mallopt(param, value) for param, value in settings)
