"""The ``floor`` mode of ``ppo_step.py``: each phase's computation done bare, outside detoxrl.

Plain transformers and peft calls on the same prompts, with the same sampling, batch and
mini-batch sizes as the detoxrl mode, and nothing else:

* rollout: one batched ``model.generate`` on the plain model (no peft);
* score: the classifier's forward on the decoded texts, in chunks of the reward batch;
* forward: ONE no-grad forward of the plain model over prompt + response per mini-batch,
  the token log-probs gathered (what the reference log-probs need);
* optimize: one forward + backward through the LoRA model per mini-batch, a policy-gradient
  surrogate on the token log-probs, and an AdamW step.

Their sum is the floor of one step: a PPO step must at least sample, score, read the
reference log-probs and update. detoxrl's step is reported as a ratio to it, phase by phase.
"""

from __future__ import annotations

import torch

from ppo_phases import Phases, default_device, load_lm, param_counts, sampling_kwargs


class FloorRunner:
    def __init__(self, spec: dict):
        from peft import LoraConfig, TaskType, get_peft_model
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.spec, self.device = spec, default_device()
        self.is_seq2seq = spec["is_seq2seq"]
        self.tokenizer = AutoTokenizer.from_pretrained(spec["policy"])
        self.side = "right" if self.is_seq2seq else "left"
        self.model = load_lm(spec["policy"], self.is_seq2seq)
        self.rollout_only = spec["rollout_only"]
        if self.rollout_only:
            return
        targets = ["q", "v"] if self.is_seq2seq else ["c_attn"]
        task = TaskType.SEQ_2_SEQ_LM if self.is_seq2seq else TaskType.CAUSAL_LM
        lora = LoraConfig(r=spec["lora_r"], lora_alpha=spec["lora_r"], target_modules=targets,
                          lora_dropout=0.0, task_type=task)
        # A second load, so that the reference forward runs on a model without LoRA layers.
        self.lora_model = get_peft_model(load_lm(spec["policy"], self.is_seq2seq), lora).eval()
        self.optimizer = torch.optim.AdamW(
            [p for p in self.lora_model.parameters() if p.requires_grad], lr=1e-5)
        self.clf_tokenizer = AutoTokenizer.from_pretrained(spec["classifier"])
        self.classifier = AutoModelForSequenceClassification.from_pretrained(
            spec["classifier"], dtype=torch.float32).to(self.device).eval()

    def parameter_counts(self) -> dict:
        counts = {"policy": param_counts(self.model)}
        if not self.rollout_only:
            counts["reward"] = param_counts(self.classifier)["total"]
        return counts

    def step(self, prompts: dict, new_tokens: int, seed: int) -> dict:
        from detoxrl.models.generation import collate_queries

        ids, mask = collate_queries(prompts["input_ids"], self.tokenizer.pad_token_id,
                                    self.side)
        ids, mask = ids.to(self.device), mask.to(self.device)
        torch.manual_seed(seed)
        phases = Phases()
        with phases("rollout"), torch.no_grad():
            out = self.model.generate(input_ids=ids, attention_mask=mask,
                                      **sampling_kwargs(self.tokenizer, new_tokens))
            response = out[:, 1:] if self.is_seq2seq else out[:, ids.shape[1]:]     # (B, T)
            texts = self.tokenizer.batch_decode(response, skip_special_tokens=True)
        if not self.rollout_only:
            with phases("score"):
                self.score(prompts["query"], texts)
            mb = self.spec["mini_batch"]
            with phases("forward"), torch.no_grad():
                for rows in torch.arange(len(ids)).split(mb):
                    token_logprobs(self.model, ids[rows], mask[rows], response[rows],
                                   self.is_seq2seq)
            with phases("optimize"):
                for rows in torch.randperm(len(ids)).split(mb):
                    logp = token_logprobs(self.lora_model, ids[rows], mask[rows],
                                          response[rows], self.is_seq2seq)
                    (-logp.mean()).backward()
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
        return phases.result(response.numel())

    @torch.no_grad()
    def score(self, queries: list[str], texts: list[str]) -> torch.Tensor:
        if self.spec["score_on"] == "query+response":
            texts = [q + t for q, t in zip(queries, texts, strict=True)]
        scores, size = [], self.spec["batch"]
        for start in range(0, len(texts), size):
            enc = self.clf_tokenizer(texts[start:start + size], padding=True, truncation=True,
                                     max_length=512, return_tensors="pt").to(self.device)
            scores.append(self.classifier(**enc).logits[:, 0])
        return torch.cat(scores)


def token_logprobs(model, ids, mask, response, is_seq2seq: bool) -> torch.Tensor:
    """log p(response_t | prompt, response_<t), (B, T): one plain teacher-forced forward."""
    if is_seq2seq:
        start = torch.full_like(response[:, :1], model.config.decoder_start_token_id)
        logits = model(input_ids=ids, attention_mask=mask,
                       decoder_input_ids=torch.cat([start, response[:, :-1]], 1)).logits
    else:
        full_mask = torch.cat([mask, torch.ones_like(response)], 1)
        positions = (full_mask.cumsum(1) - 1).clamp(min=0)
        t = response.shape[1]  # only the positions that predict response tokens need logits
        logits = model(input_ids=torch.cat([ids, response], 1), attention_mask=full_mask,
                       position_ids=positions, logits_to_keep=t + 1).logits[:, :t]
    return logits.float().log_softmax(-1).gather(-1, response.unsqueeze(-1)).squeeze(-1)
