"""Loading pretrained models and tokenizers with clear errors, and choosing dtypes.

Everything goes through ``from_pretrained`` with a Hub id or a local folder: a ``tiny:NAME``
is resolved by the caller, once per loaded object (``detoxrl.models.tiny.resolve``).
``trust_remote_code`` stays off unless asked for.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

from ..errors import ConfigError, ModelLoadError
from . import quiet

_FP16_UNSAFE = ("t5", "mt5", "umt5", "longt5", "switch_transformers")


def resolve_dtype(name: str, model_type: str, device: torch.device) -> torch.dtype:
    """``auto`` is fp32 on CPU and bf16 on GPUs that support it; fp16 is refused for T5."""
    if name == "float16" and model_type in _FP16_UNSAFE:
        raise ConfigError(f"float16 is not supported for {model_type} models: T5 activations "
                          "overflow in fp16 and produce NaN. Use model.dtype: bfloat16 on GPU "
                          "or float32.")
    if name == "auto":
        bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16_ok else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _hub_hint(name: str) -> str:
    from pathlib import Path

    from ..runs.preflight import looks_local

    if looks_local(name) or Path(name).expanduser().exists():
        # A path: a download hint would send the user to the Hub for a file of theirs.
        return (f"Could not load {name!r} from the local folder: check that it exists and "
                "holds config.json, the weights and the tokenizer files (as written by "
                "save_pretrained).")
    return (f"Could not load {name!r}. If it is a Hub id, the Hugging Face Hub may be "
            "unreachable from this machine: download it elsewhere (e.g. `hf download "
            f"{name} --local-dir DIR`) and pass the local folder instead. If it is a local "
            "path, write it as ./NAME and check that the folder exists and holds config.json "
            "and the weights.")


def load_config(name: str, revision: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name, revision=revision,
                                          trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(_hub_hint(name) + f" ({type(exc).__name__}: {exc})") from None


def load_tokenizer(name: str, revision: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name, revision=revision,
                                             trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(_hub_hint(name) + f" ({type(exc).__name__}: {exc})") from None


def load_pretrained(auto_cls, name: str, **kwargs):
    """``auto_cls.from_pretrained`` with the Hub/local-path hint on failure."""
    try:
        with quiet.model_loading():
            return auto_cls.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(_hub_hint(name) + f" ({type(exc).__name__}: {exc})") from None


def check_lora_targets(auto_cls, hf_config, targets, trust_remote_code: bool = False) -> None:
    """Refuse LoRA target modules the model does not have, before its weights load.

    The model is built on the meta device (no memory, no weights) just to list its module
    names; a target matches a module whose name is it or ends with ``.target``, as in peft.
    """
    if not targets or isinstance(targets, str):  # a peft regex is peft's to match
        return
    skeleton = _meta_skeleton(auto_cls, hf_config, trust_remote_code)
    names = [n for n, _ in skeleton.named_modules() if n]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in skeleton.named_modules()
                         if type(m).__name__ in ("Linear", "Conv1D")})
        raise ConfigError(f"lora.target_modules: {', '.join(map(repr, missing))} not found in "
                          f"this {hf_config.model_type} model. Its linear layers are: "
                          + ", ".join(linear) + ".")


def _meta_skeleton(auto_cls, hf_config, trust_remote_code: bool):
    """The model built on the meta device, never through DeepSpeed's ``zero.Init``.

    Under ZeRO-3 transformers wraps every ``from_config`` in ``zero.Init``, which cannot
    partition meta tensors; its own flag for "zero.Init is already active" skips that.
    """
    from contextlib import ExitStack

    from accelerate import init_empty_weights
    from transformers.integrations import is_deepspeed_zero3_enabled

    with ExitStack() as stack:
        if is_deepspeed_zero3_enabled():
            from transformers.modeling_utils import set_zero3_state

            stack.enter_context(set_zero3_state())
        stack.enter_context(init_empty_weights())
        return auto_cls.from_config(hf_config, trust_remote_code=trust_remote_code)


def freeze_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Put ``model`` in eval mode: dropout makes sampled and re-scored log-probs disagree.

    RL never switches back to train mode; gradients still flow in eval mode.
    """
    model.eval()
    return model


_ADAPTER_HINT = ("pass a folder written by save_pretrained (adapter_config.json + "
                 "adapter_model.safetensors) or a Hub id of the form owner/name.")


def resolve_adapter(path: str) -> str:
    """``path`` if it may be an adapter; a local-looking path that is missing is an error."""
    looks_local = path.startswith((".", "/", "~")) or path.count("/") != 1
    if Path(path).exists() or not looks_local:
        return path
    raise ConfigError(f"LoRA adapter {path!r} not found: {_ADAPTER_HINT}")


@contextmanager
def adapter_errors(path: str):
    try:
        yield
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"Could not load the LoRA adapter {path!r}: {_ADAPTER_HINT} If "
                             "it is a Hub id, the Hub may be unreachable; download it and pass "
                             f"the folder. ({type(exc).__name__}: {exc})") from None


def ensure_pad_token(tokenizer, model) -> None:
    """GPT-2-style tokenizers have no pad token; EOS serves, since padding is masked out."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.generation_config, "pad_token_id", None) is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
