"""The tutorial's PPO step (TRL's classic ``PPOTrainer`` as the FLAN-T5 lab ran it), no TRL.

Structure kept from the tutorial:

* rollout: ``generate`` once per prompt (batch size 1, no padding), each response cut to its
  last ``max_new_tokens`` tokens and decoded one by one;
* score: one ``text-classification`` pipeline call on all texts (``top_k=None``,
  ``function_to_apply="none"``, ``batch_size`` = the batch), the ``nothate`` score kept;
* reference: a full frozen ``copy.deepcopy`` of the base model made before LoRA is added
  (TRL's ``create_reference_model``), held for the whole run;
* forward: TRL's ``batched_forward_pass`` in chunks of ``mini_batch_size`` (4): policy
  log-probs and values, then reference log-probs from the copy;
* optimize: one epoch of PPO updates on shuffled mini-batches of 4, one optimizer step each.

The loss math is ``detoxrl.rl_math`` and the network is the one ``detoxrl.policy.Policy``
builds (LoRA r=32 on q/v and a value head, as ``AutoModelForSeq2SeqLMWithValueHead``), so the
arithmetic per token is the same as in the detoxrl mode; only the structure differs. The
forward passes (:func:`trl_forward`) and mini-batch slicing are this module's own, so that
later optimisations of detoxrl's ``Policy.forward`` or ``Rollout.select`` do not speed up
the tutorial. TRL's defaults:
cliprange 0.2, cliprange_value 0.2, vf_coef 0.1, gamma 1, lam 0.95, no gradient clipping,
adaptive KL (0.2, target 6, horizon 10000), learning rate 1.41e-5.
"""

from __future__ import annotations

import copy
from dataclasses import fields, replace

import torch

from ppo_phases import TEMPERATURE, Phases, default_device, load_lm, param_counts, sampling_kwargs


class TutorialRunner:
    def __init__(self, spec: dict):
        from transformers import AutoTokenizer, pipeline

        from detoxrl.config import LoraSettings
        from detoxrl.models.policy import Policy
        from detoxrl.rl.kl import AdaptiveKLController

        self.spec, self.device = spec, default_device()
        self.tokenizer = AutoTokenizer.from_pretrained(spec["policy"])
        base = load_lm(spec["policy"], spec["is_seq2seq"])
        # create_reference_model(): a second full copy of the network, frozen.
        self.ref = copy.deepcopy(base).requires_grad_(False).eval()
        torch.manual_seed(spec["seed"])
        lora = LoraSettings(r=spec["lora_r"], alpha=spec["lora_r"])
        self.policy = Policy.from_model(base, self.tokenizer, lora).to(self.device)
        self.optimizer = torch.optim.AdamW(
            [p for p in self.policy.parameters() if p.requires_grad], lr=1.41e-5)
        self.pipe = pipeline("text-classification", model=spec["classifier"],
                             device=self.device, dtype=torch.float32)
        self.kl_ctl = AdaptiveKLController(0.2, 6.0, 10000)

    def parameter_counts(self) -> dict:
        return {"policy": param_counts(self.policy), "reference": param_counts(self.ref),
                "reward": param_counts(self.pipe.model)["total"]}

    def step(self, prompts: dict, new_tokens: int, seed: int) -> dict:
        torch.manual_seed(seed)
        phases = Phases()
        with phases("rollout"):
            responses = self._generate(prompts["input_ids"], new_tokens)
            texts = [self.tokenizer.decode(r, skip_special_tokens=True) for r in responses]
        if self.spec["rollout_only"]:
            return phases.result(sum(len(r) for r in responses))
        with phases("score"):
            scores = self._score(prompts["query"], texts)
        with phases("forward"):
            batch = self._forward(self._rollout(prompts, responses, texts, scores))
        batch = self._advantages(batch)
        with phases("optimize"):
            skipped = self._optimize(batch, seed)
        return {**phases.result(int(batch.response_mask.sum())), "skipped_updates": skipped}

    # ------------------------------------------------------------------ phases
    @torch.no_grad()
    def _generate(self, input_ids: list[list[int]], new_tokens: int) -> list[torch.Tensor]:
        kwargs = sampling_kwargs(self.tokenizer, new_tokens)
        responses = []
        for ids in input_ids:  # for prompt_tensor in prompt_tensors: ppo_trainer.generate(...)
            query = torch.tensor([ids], device=self.device)
            out = self.policy.model.generate(input_ids=query, attention_mask=torch.ones_like(query),
                                             **kwargs)
            responses.append(out.squeeze(0)[-new_tokens:])
        return responses

    @torch.no_grad()
    def _score(self, queries: list[str], texts: list[str]) -> torch.Tensor:
        if self.spec["score_on"] == "query+response":
            texts = [q + r for q, r in zip(queries, texts, strict=True)]
        outputs = self.pipe(texts, top_k=None, function_to_apply="none",
                            batch_size=len(texts), truncation=True)
        return torch.tensor([next(d["score"] for d in out if d["label"] == "nothate")
                             for out in outputs])

    def _rollout(self, prompts: dict, responses: list[torch.Tensor], texts: list[str],
                 scores: torch.Tensor):
        from detoxrl.models.generation import collate_queries
        from detoxrl.models.rollout import Rollout

        side = "right" if self.spec["is_seq2seq"] else "left"
        ids, mask = collate_queries(prompts["input_ids"], self.tokenizer.pad_token_id, side)
        response_ids = torch.stack(responses)  # fixed length: no response padding
        return Rollout(query_ids=ids.to(self.device), query_mask=mask.to(self.device),
                       response_ids=response_ids, response_mask=torch.ones_like(response_ids),
                       queries=list(prompts["query"]), responses=texts,
                       ended_with_eos=torch.zeros(len(texts), dtype=torch.bool),
                       scores=scores.to(self.device))

    @torch.no_grad()
    def _forward(self, batch):
        logprobs, values, ref_logprobs = [], [], []
        for idx in torch.arange(len(batch)).split(self.spec["mini_batch"]):
            mb = _rows(batch, idx)
            lp, v, _ = trl_forward(self.policy.model, mb, self.policy.value_head)
            logprobs.append(lp)
            values.append(v)
            ref_logprobs.append(trl_forward(self.ref, mb)[0])
        return replace(batch, logprobs=torch.cat(logprobs), values=torch.cat(values),
                       ref_logprobs=torch.cat(ref_logprobs))

    def _advantages(self, batch):
        from detoxrl.rl import math as rl_math

        mask = batch.response_mask
        rewards, kl = rl_math.kl_shaped_rewards(batch.scores, batch.logprobs, batch.ref_logprobs,
                                                mask, self.kl_ctl.value)
        advantages, returns = rl_math.gae_advantages(rewards, batch.values, mask, 1.0, 0.95)
        self.kl_ctl.update(float(kl.sum(1).mean()), len(batch))
        return replace(batch, rewards=rewards, returns=returns,
                       advantages=rl_math.masked_whiten(advantages, mask))

    def _optimize(self, batch, seed: int) -> int:
        from detoxrl.rl import math as rl_math

        order = torch.randperm(len(batch), generator=torch.Generator().manual_seed(seed + 1))
        skipped = 0
        for idx in order.split(self.spec["mini_batch"]):
            mb = _rows(batch, idx)
            mask = mb.response_mask
            logprobs, values, _ = trl_forward(self.policy.model, mb, self.policy.value_head,
                                              with_entropy=True)
            pg_loss, _ = rl_math.policy_loss(logprobs, mb.logprobs, mb.advantages, mask, 0.2)
            vf_loss, _ = rl_math.value_loss(values, mb.values, mb.returns, mask, 0.2)
            (pg_loss + 0.1 * vf_loss).backward()
            # On an H200 in bf16 (gpt2 shape) the sampling after this mode's first update
            # met NaN probabilities, twice, ending the benchmark; detoxrl's mode (autocast,
            # clipped gradients) did not. Not clipped, as TRL's default, but a non-finite
            # update is skipped and counted: the timing is what this mode is for. Not yet
            # confirmed on a GPU that this was the cause (see bench/results/gpu-h200.md).
            params = [p for p in self.policy.parameters() if p.requires_grad]
            if torch.isfinite(torch.nn.utils.clip_grad_norm_(params, float("inf"))):
                self.optimizer.step()
            else:
                skipped += 1
            self.optimizer.zero_grad(set_to_none=True)
        return skipped


def _rows(batch, idx: torch.Tensor):
    """The rollouts at ``idx``, padded as the whole batch is (as TRL's forward batching)."""
    return replace(batch, **{f.name: getattr(batch, f.name)[idx] for f in fields(batch)
                             if isinstance(getattr(batch, f.name), torch.Tensor)})


def trl_forward(model, mb, value_head=None, with_entropy: bool = False):
    """Response log-probs (and values, entropy) as TRL's ``batched_forward_pass`` got them:
    full logits of every position, log-softmax, gather. Kept apart from ``Policy.forward``
    so that optimisations of detoxrl's forward do not leak into the tutorial's figures."""
    from detoxrl.models.generation import entropy_from_logits

    q, qm, r, rm = mb.query_ids, mb.query_mask, mb.response_ids, mb.response_mask
    if model.config.is_encoder_decoder:
        start = torch.full_like(r[:, :1], model.config.decoder_start_token_id)
        out = model(input_ids=q, attention_mask=qm,
                    decoder_input_ids=torch.cat([start, r[:, :-1]], dim=1),
                    decoder_attention_mask=torch.cat([torch.ones_like(start), rm[:, :-1]], 1),
                    output_hidden_states=value_head is not None, use_cache=False)
        logits = out.logits
        hidden = out.decoder_hidden_states[-1] if value_head is not None else None
    else:
        mask = torch.cat([qm, rm], dim=1)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        out = model(input_ids=torch.cat([q, r], dim=1), attention_mask=mask,
                    position_ids=positions, output_hidden_states=value_head is not None,
                    use_cache=False)
        cut = slice(q.shape[1] - 1, q.shape[1] - 1 + r.shape[1])
        logits = out.logits[:, cut]
        hidden = out.hidden_states[-1][:, cut] if value_head is not None else None
    logits = logits.float() / TEMPERATURE
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, r.unsqueeze(-1)).squeeze(-1)
    values = value_head(hidden) if value_head is not None else None
    entropy = entropy_from_logits(logits) if with_entropy else None
    return logprobs, values, entropy
