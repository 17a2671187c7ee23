"""LoRA settings: the default target modules per architecture and the peft config."""

from __future__ import annotations

from ..config import LoraSettings

DEFAULT_TARGETS = {
    "t5": ["q", "v"], "mt5": ["q", "v"], "umt5": ["q", "v"], "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"], "bloom": ["query_key_value"], "falcon": ["query_key_value"],
}


def default_lora(model_type: str, is_seq2seq: bool, lora: LoraSettings):
    """A peft ``LoraConfig`` with the tutorial's T5 defaults and per-architecture targets."""
    from peft import LoraConfig, TaskType

    targets = lora.target_modules or DEFAULT_TARGETS.get(model_type, ["q_proj", "v_proj"])
    r = lora.r or (32 if model_type in ("t5", "mt5", "umt5") else 16)
    return LoraConfig(r=r, lora_alpha=lora.alpha or r, lora_dropout=lora.dropout,
                      target_modules=targets, bias="none",
                      task_type=TaskType.SEQ_2_SEQ_LM if is_seq2seq else TaskType.CAUSAL_LM)


def lora_targets(hf_config, lora) -> list[str]:
    """The LoRA target modules of a run: a peft config's own, or the defaults above."""
    if hasattr(lora, "peft_type"):
        return lora.target_modules
    return default_lora(hf_config.model_type, hf_config.is_encoder_decoder,
                        lora or LoraSettings()).target_modules
