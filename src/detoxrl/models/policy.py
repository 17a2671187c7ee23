"""The policy: an LM with a LoRA adapter and (PPO) a value head, for T5/BART and GPT/Llama.

Every difference between encoder-decoder and decoder-only models lives in this module:
the query goes to the encoder (seq2seq) or is concatenated before the response (causal),
causal queries are left-padded with explicit position ids, and T5 decoders start from the
decoder start token. Code elsewhere sees only ``Rollout`` tensors and per-token outputs.

The reference model is this same network with the RL adapter switched off: the bare base
for a fresh adapter, or the *starting* adapter (loaded a second time, frozen) when training
continues an existing one. That costs one adapter of memory, not a second model, and avoids
the trap of comparing against the bare base (huggingface/trl#1340).
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..config import LoraSettings, ModelConfig, SamplingConfig
from ..errors import ConfigError
from . import generation, prefix, tiny
from .attention import no_cudnn_attention
from .decoding import decode
from .generation import beam_search, block_token, entropy_from_logprobs, response_mask
from .loading import (
    adapter_errors,
    ensure_pad_token,
    freeze_dropout,
    load_config,
    load_pretrained,
    load_tokenizer,
    resolve_adapter,
    resolve_dtype,
)
from .lora import default_lora, lora_targets
from .quiet import peft_wrapping
from .rollout import Rollout
from .value_head import VALUE_HEAD_FILE, ValueHead


class PolicyOutput(NamedTuple):
    """A tuple, so that DeepSpeed ZeRO-3 sees its tensors and hooks their backward."""

    logprobs: Tensor              # (B, T) log-prob of each response token at the temperature
    values: Tensor | None         # (B, T) value before each response token
    entropy: Tensor | None        # (B, T) entropy of each next-token distribution, no grad
    unblocked_logprobs: Tensor | None = None  # (B, T) log-probs with EOS not blocked


class Policy(nn.Module):
    """LoRA-adapted LM (+ value head for PPO). ``forward`` scores responses; ``generate``
    samples them. Critic-free algorithms build it with ``value_head=False``: no head is
    built, trained or saved."""

    def __init__(self, peft_model: nn.Module, tokenizer, has_reference_adapter: bool,
                 value_head: bool = True):
        super().__init__()
        self.model = peft_model
        self.tokenizer = tokenizer
        config = peft_model.get_base_model().config
        self.is_seq2seq = bool(config.is_encoder_decoder)
        hidden_size = config.get_text_config().hidden_size
        self.value_head = ValueHead(hidden_size) if value_head else None
        self.has_reference_adapter = has_reference_adapter
        forward_params = inspect.signature(peft_model.get_base_model().forward).parameters
        self._accepts_logits_to_keep = "logits_to_keep" in forward_params
        self._checkpointed_layers: list[nn.Module] = []
        self.share_queries = True  # models.prefix; off where every forward is a collective
        freeze_dropout(self)

    # ------------------------------------------------------------------ construction
    @classmethod
    @peft_wrapping()
    def from_model(cls, base: nn.Module, tokenizer, lora: LoraSettings | None = None,
                   adapter: str | None = None, trained_adapter: str | None = None,
                   trainable: bool = True, value_head: bool = True) -> Policy:
        """Wrap ``base`` with the RL adapter ("default") and, if needed, a reference adapter.

        - fresh: a new LoRA from ``lora``; reference = adapters off.
        - ``adapter``: continue it (trainable); reference = the same adapter, frozen.
        - ``trained_adapter``: load a trained RL adapter; reference = ``adapter`` or base.
        """
        from peft import PeftModel, get_peft_model

        config = base.config
        if tokenizer is not None:  # a bare network (parameter counts) needs none
            ensure_pad_token(tokenizer, base)
        start = trained_adapter or adapter
        if start is None:
            # ``lora``: our settings, or a ready ``peft.LoraConfig`` used as it is.
            peft_config = lora if hasattr(lora, "peft_type") else default_lora(
                config.model_type, config.is_encoder_decoder, lora or LoraSettings())
            model = get_peft_model(base, peft_config)
        else:
            with adapter_errors(start):
                model = PeftModel.from_pretrained(base, resolve_adapter(start),
                                                  is_trainable=trainable)
        if adapter is not None:
            with adapter_errors(adapter):
                model.load_adapter(resolve_adapter(adapter), adapter_name="reference",
                                   is_trainable=False)
            model.set_adapter("default")
        if not trainable:
            model.requires_grad_(False)
        policy = cls(model, tokenizer, has_reference_adapter=adapter is not None,
                     value_head=value_head)
        if policy.value_head is not None:
            policy.value_head.requires_grad_(trainable)
        return policy

    @classmethod
    def from_pretrained(cls, cfg: ModelConfig, lora: LoraSettings | None = None,
                        trained_adapter: str | None = None, trainable: bool = True,
                        device: torch.device | str = "cpu", value_head: bool = True) -> Policy:
        from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

        device = torch.device(device)
        for path in (cfg.adapter, trained_adapter):  # fail before loading the base weights
            if path is not None:
                resolve_adapter(path)
        source = tiny.resolve(cfg.name_or_path)  # the one resolution of the policy's name
        hf_config = load_config(source, cfg.revision, cfg.trust_remote_code)
        dtype = resolve_dtype(cfg.dtype, hf_config.model_type, device)
        auto_cls = AutoModelForSeq2SeqLM if hf_config.is_encoder_decoder else AutoModelForCausalLM
        if trained_adapter is None and cfg.adapter is None:  # a fresh LoRA: targets must exist
            from .loading import check_lora_targets

            check_lora_targets(auto_cls, hf_config, lora_targets(hf_config, lora),
                               cfg.trust_remote_code)
        base = load_pretrained(auto_cls, source, dtype=dtype, revision=cfg.revision,
                               trust_remote_code=cfg.trust_remote_code)
        tokenizer = load_tokenizer(source, cfg.revision, cfg.trust_remote_code)
        ensure_pad_token(tokenizer, base)
        policy = cls.from_model(base, tokenizer, lora, cfg.adapter, trained_adapter, trainable,
                                value_head)
        if cfg.gradient_checkpointing and trainable:
            policy.enable_gradient_checkpointing()
        return policy.to(device)

    def enable_gradient_checkpointing(self) -> None:
        """Keep only each layer's input for the backward pass; recompute the rest there.

        transformers checkpoints a layer only while that layer is in training mode, and RL
        keeps the network in eval mode (no dropout). So only the layer containers are marked
        as training, just before each forward; the dropout and attention modules inside them
        stay in eval mode and every number is unchanged.
        """
        from transformers.modeling_layers import GradientCheckpointingLayer

        base = self.model.get_base_model()
        layers = [m for m in base.modules() if isinstance(m, GradientCheckpointingLayer)]
        if not getattr(base, "supports_gradient_checkpointing", False) or not layers:
            raise ConfigError(f"{type(base).__name__} does not support gradient checkpointing "
                              "here; set model.gradient_checkpointing to false.")
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self._checkpointed_layers = layers

    # ------------------------------------------------------------------ reference
    @contextmanager
    def reference(self):
        """Within this block the network computes the reference policy (the starting one).

        The reference is frozen inside the block and every ``requires_grad`` flag is put back
        on exit: peft's adapter switches reset them (``set_adapter`` makes the adapter it
        activates trainable, and re-enabling adapters makes "default" trainable), which would
        otherwise unfreeze a policy built with ``trainable=False``.
        """
        flags = [(p, p.requires_grad) for p in self.model.parameters()]
        try:
            if self.has_reference_adapter:
                self.model.set_adapter("reference")
                try:
                    self.model.requires_grad_(False)
                    yield self
                finally:
                    self.model.set_adapter("default")
            else:
                with self.model.disable_adapter():
                    yield self
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)

    # ------------------------------------------------------------------ forward
    def forward(self, query_ids: Tensor, query_mask: Tensor, response_ids: Tensor,
                response_mask: Tensor, temperature: float = 1.0, with_values: bool = True,
                with_entropy: bool = False, encoder_hidden: Tensor | None = None,
                eos_blocked: int = 0, with_unblocked: bool = False) -> PolicyOutput:
        """Per-token log-probs (and values, entropy) of ``response_ids`` given the queries.

        Shapes: queries (B, Q), responses (B, T); every output is (B, T). Positions outside
        ``response_mask`` hold finite but meaningless numbers; callers mask them.
        ``encoder_hidden`` (B, Q, H), seq2seq only: the encoder's output for these queries
        under the current weights (``Rollout.encoder_hidden``), which skips the encoder.
        ``with_unblocked``: also the log-probs with EOS allowed everywhere, the bare LM's
        (:func:`~detoxrl.models.generation.unblock`).
        """
        with self._checkpointing(), no_cudnn_attention(query_ids.device):
            if self.is_seq2seq:
                logits, hidden = self._seq2seq_logits(query_ids, query_mask, response_ids,
                                                      response_mask, encoder_hidden)
            else:
                logits, hidden = self._causal_logits(query_ids, query_mask, response_ids,
                                                     response_mask)
        logits = logits.float()                                             # (B, T, V)
        if temperature != 1.0:
            logits = logits / temperature
        eos = self.tokenizer.eos_token_id
        seen = generation.blocked_columns(logits, response_ids, eos,
                                          eos_blocked if with_unblocked else 0)
        # The distribution generate sampled from: EOS blocked at the first positions.
        logits = block_token(logits, eos, eos_blocked, inplace=not logits.requires_grad)
        logprobs = torch.log_softmax(logits, dim=-1)
        token_logprobs = logprobs.gather(-1, response_ids.unsqueeze(-1)).squeeze(-1)
        if with_values and self.value_head is None:
            raise ValueError("This policy has no value head (built with value_head=False); "
                             "call it with with_values=False.")
        values = self.value_head(hidden) if with_values else None
        entropy = None
        if with_entropy:  # a diagnostic: kept out of the graph, whose (B, T, V) saves are large
            with torch.no_grad():
                entropy = entropy_from_logprobs(logprobs)
        free = generation.unblock_columns(token_logprobs, seen) if with_unblocked else None
        return PolicyOutput(token_logprobs, values, entropy, free)

    @contextmanager
    def _checkpointing(self):
        """Mark the checkpointed layers as training for one forward (see above).

        The backward pass replays the layers' inner forward, which reads no flag, so the
        flags can go back at once and nothing else (generation) ever sees them set.
        """
        for layer in self._checkpointed_layers:
            layer.training = True
        try:
            yield
        finally:
            for layer in self._checkpointed_layers:
                layer.training = False

    def _seq2seq_logits(self, query_ids, query_mask, response_ids, response_mask,
                        encoder_hidden=None):
        # Teacher forcing: the decoder sees [start] + response[:-1], so position t predicts
        # response token t, the first token included (TRL-classic never scored it).
        start = self.model.get_base_model().config.decoder_start_token_id
        start_col = torch.full_like(response_ids[:, :1], start)
        decoder_ids = torch.cat([start_col, response_ids[:, :-1]], dim=1)               # (B, T)
        decoder_mask = torch.cat([torch.ones_like(start_col), response_mask[:, :-1]], dim=1)
        encoder_outputs = None if encoder_hidden is None else (encoder_hidden,)
        out = self.model(input_ids=query_ids, attention_mask=query_mask,
                         encoder_outputs=encoder_outputs, decoder_input_ids=decoder_ids,
                         decoder_attention_mask=decoder_mask, output_hidden_states=True,
                         use_cache=False)
        return out.logits, out.decoder_hidden_states[-1]

    def _causal_logits(self, query_ids, query_mask, response_ids, response_mask):
        groups = (prefix.query_groups(query_ids, query_mask) if self.share_queries and not
                  (torch.is_grad_enabled() or self._checkpointed_layers) else None)
        if groups is not None:
            return prefix.shared_query_logits(self.model.get_base_model(), query_ids,
                                              query_mask, response_ids, response_mask, groups)
        input_ids = torch.cat([query_ids, response_ids], dim=1)                         # (B, Q+T)
        mask = torch.cat([query_mask, response_mask], dim=1)
        position_ids = generation.real_positions(mask)            # queries are left-padded
        q, t = query_ids.shape[1], response_ids.shape[1]
        # The lm_head is the costliest layer per position; only the last t + 1 are needed.
        keep = {"logits_to_keep": t + 1} if self._accepts_logits_to_keep else {}
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                         output_hidden_states=True, use_cache=False, **keep)
        logits = out.logits[:, -(t + 1):]                                             # (B, T+1, V)
        # The state at position i predicts token i + 1: response token j comes from q - 1 + j.
        return logits[:, :t], out.hidden_states[-1][:, q - 1:q - 1 + t]

    # ------------------------------------------------------------------ generation
    @property
    def padding_side(self) -> str:
        """How queries are padded: left for causal LMs (they generate at the right edge)."""
        return "right" if self.is_seq2seq else "left"

    @torch.no_grad()
    def generate(self, query_ids: Tensor, query_mask: Tensor, sampling: SamplingConfig,
                 limits: list[int] | None = None, queries: list[str] | None = None,
                 synced_gpus: bool = False, num_return_sequences: int = 1,
                 with_logprobs: bool = False, with_values: bool = False) -> Rollout:
        """One batch decoded to the largest per-sample limit, each response cut at its own.

        With ``num_return_sequences=K`` every prompt is answered K times in the same call:
        the rollout has B * K rows, prompt i's samples at rows i*K .. i*K + K-1, and
        ``limits`` (one per prompt) and ``queries`` are repeated to match. Each prompt is
        read once (by the encoder, or into a causal LM's cache, then copied).

        ``with_logprobs``: ``Rollout.logprobs`` holds each sampled token's log-prob at
        ``sampling.temperature``, read while sampling (``decoding.decode``), and
        ``with_values`` adds ``Rollout.values`` from the same pass: what ``forward`` would
        give, up to float rounding, without a second pass, and ``Rollout.unblocked_logprobs``
        with EOS allowed. The encoder output, kept otherwise for that pass, is then dropped.
        """
        if limits is None:
            limits = [sampling.max_new_tokens_draw] * query_ids.shape[0]
        k = num_return_sequences
        if k < 1:
            raise ConfigError(f"num_return_sequences must be at least 1, got {k}.")
        if with_values and (self.value_head is None or not with_logprobs):
            raise ValueError("with_values needs with_logprobs and a policy with a value head.")
        tok = self.tokenizer
        encoder_hidden = None
        if self.is_seq2seq:  # run the encoder here so that the old log-probs can reuse it
            encoder_hidden = self.model.get_encoder()(
                input_ids=query_ids, attention_mask=query_mask).last_hidden_state  # (B, Q, H)
            encoder_hidden = encoder_hidden.repeat_interleave(k, dim=0)          # (B*K, Q, H)
        eos_blocked = min(sampling.min_length, min(limits))  # generate's min_new_tokens
        response, logprobs, hidden, unblocked = self._decode(
            query_ids, query_mask, k, sampling, max(limits), eos_blocked, encoder_hidden,
            with_logprobs, with_values, synced_gpus)
        if k > 1:
            query_ids = query_ids.repeat_interleave(k, dim=0)                    # (B*K, Q)
            query_mask = query_mask.repeat_interleave(k, dim=0)
            limits = [n for n in limits for _ in range(k)]
            if queries is not None:
                queries = [q for q in queries for _ in range(k)]
        limit_t = torch.tensor(limits, device=response.device)
        mask, ended = response_mask(response, limit_t, tok.eos_token_id)
        response = torch.where(mask.bool(), response, tok.pad_token_id)
        if queries is None:
            queries = tok.batch_decode(query_ids, skip_special_tokens=True)
        read = {"encoder_hidden": encoder_hidden}
        if with_logprobs:
            if logprobs is None:  # beam search: scored by a forward pass
                out = self(query_ids, query_mask, response, mask, sampling.temperature,
                           with_values, encoder_hidden=encoder_hidden, eos_blocked=eos_blocked,
                           with_unblocked=True)
                logprobs, values, unblocked = out.logprobs, out.values, out.unblocked_logprobs
            else:
                values = None if hidden is None else self.value_head(hidden)
            read = {"logprobs": logprobs * mask, "unblocked_logprobs": unblocked * mask,
                    "values": None if values is None else values * mask}
        return Rollout(query_ids=query_ids, query_mask=query_mask, response_ids=response,
                       response_mask=mask, queries=list(queries),
                       responses=tok.batch_decode(response, skip_special_tokens=True),
                       ended_with_eos=ended, eos_blocked=eos_blocked, **read).trim()

    def _decode(self, query_ids, query_mask, k, sampling, max_new_tokens, eos_blocked,
                encoder_hidden, with_logprobs, with_values, synced_gpus):
        """(B*K, T) new tokens for the (B, Q) queries answered K times each, and with
        ``with_logprobs`` (B*K, T) log-probs, (values) the (B*K, T, H) hidden states and the
        (B*K, T) unblocked log-probs read while decoding; beam search reads none."""
        tok, base = self.tokenizer, self.model.get_base_model()
        if sampling.num_beams > 1:
            query_ids, query_mask = (x.repeat_interleave(k, dim=0) for x in (query_ids, query_mask))
            from transformers.modeling_outputs import BaseModelOutput

            extra = {} if encoder_hidden is None else {"encoder_outputs": BaseModelOutput(
                last_hidden_state=encoder_hidden)}
            sequences = beam_search(self.model, tok, query_ids, query_mask, sampling,
                                    max_new_tokens, eos_blocked, synced_gpus=synced_gpus,
                                    **extra)
            # Seq2seq output starts with the decoder start token; causal with the query.
            start = 1 if self.is_seq2seq else query_ids.shape[1]
            return sequences[:, start:], None, None, None
        with no_cudnn_attention(query_ids.device):
            out = decode(base, query_ids, query_mask, sampling, max_new_tokens, eos_blocked,
                         tok.eos_token_id, tok.pad_token_id, encoder_hidden, with_logprobs,
                         with_logprobs and with_values, synced_gpus,
                         graphs=sampling.cuda_graphs and query_ids.is_cuda and not synced_gpus,
                         repeats=k)
        return out.tokens, out.logprobs, out.hidden, out.unblocked_logprobs

    # ------------------------------------------------------------------ parameters, saving
    def parameter_report(self, include_value_head: bool = True) -> tuple[int, int, float]:
        """(trainable, total, percent), as the tutorial prints them."""
        params = list(self.parameters() if include_value_head else self.model.parameters())
        trainable = sum(p.numel() for p in params if p.requires_grad)
        total = sum(p.numel() for p in params)
        return trainable, total, 100.0 * trainable / total

    def save(self, out_dir: str | Path) -> None:
        """The RL adapter in peft format and the value head (if any) as safetensors."""
        out = Path(out_dir)
        self.model.save_pretrained(out, selected_adapters=["default"])
        if self.value_head is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in
                       self.value_head.state_dict().items()}, out / VALUE_HEAD_FILE)

    def load_trained(self, adapter_dir: str | Path) -> None:
        """Load adapter and value-head weights written by :meth:`save` (for resuming)."""
        from peft import set_peft_model_state_dict

        adapter_dir = Path(adapter_dir)
        weights = load_file(adapter_dir / "adapter_model.safetensors")
        set_peft_model_state_dict(self.model, weights, adapter_name="default")
        head = adapter_dir / VALUE_HEAD_FILE
        if head.exists() and self.value_head is not None:
            self.value_head.load_state_dict(load_file(head))

