"""What the benchmarked modes share: phase timers, memory peaks, devices, model loading.

``ppo_modes``, ``ppo_tutorial`` and ``ppo_floor`` import these; none of them imports the
others back.
"""

from __future__ import annotations

import functools
import resource
import sys
import time
from contextlib import contextmanager

import torch

TEMPERATURE = 1.0


# --------------------------------------------------------------------------- memory

def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes vs KiB


PEAK = {"enabled": False, "max": 0.0}


def mark_peak() -> float | None:
    """Peak RSS since the last mark (folded into ``PEAK["max"]``), then reset the mark."""
    if not PEAK["enabled"]:
        return None
    peak = hwm_mib() or 0.0
    PEAK["max"] = max(PEAK["max"], peak)
    reset_peak_rss()
    return peak


def reset_peak_rss() -> bool:
    """Reset Linux's VmHWM (peak RSS) mark; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return hwm_mib() is not None
    except OSError:
        return False


def hwm_mib() -> float | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def param_counts(*modules) -> dict:
    params = [p for m in modules for p in m.parameters()]
    return {"total": sum(p.numel() for p in params),
            "trainable": sum(p.numel() for p in params if p.requires_grad)}


class Phases:
    """Per phase: wall time (``times``), process CPU time of all threads (``cpu``) and
    peak RSS (``rss``, Linux only)."""

    def __init__(self):
        self.times: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.rss: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        sync()
        mark_peak()
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            sync()
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0
            self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - c0
            peak = mark_peak()
            if peak is not None:
                self.rss[name] = max(self.rss.get(name, 0.0), peak)

    def result(self, tokens: int) -> dict:
        return {**self.times, "cpu": dict(self.cpu), "rss_peak_mib": dict(self.rss),
                "tokens": tokens}

    def take(self) -> tuple[dict, dict, dict]:
        """Wall times, CPU times and RSS peaks so far; then start afresh."""
        out = (self.times, self.cpu, self.rss)
        self.times, self.cpu, self.rss = {}, {}, {}
        return out

    def wrap(self, obj, method: str, name: str) -> None:
        """Time ``obj.method`` as phase ``name`` on every call (patched on the instance)."""
        fn = getattr(obj, method)

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            with self(name):
                return fn(*args, **kwargs)

        setattr(obj, method, timed)


# --------------------------------------------------------------------------- loading

def load_lm(path: str, is_seq2seq: bool):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from detoxrl.models.loading import load_config, resolve_dtype

    device = default_device()
    dtype = resolve_dtype("auto", load_config(path).model_type, device)
    auto = AutoModelForSeq2SeqLM if is_seq2seq else AutoModelForCausalLM
    return auto.from_pretrained(path, dtype=dtype).to(device).eval()


def sampling_kwargs(tokenizer, new_tokens: int) -> dict:
    """The tutorial's sampling (top_k 0, top_p 1) at a fixed length: EOS cannot stop it."""
    return {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": True,
            "top_k": 0, "top_p": 1.0, "temperature": TEMPERATURE,
            "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
