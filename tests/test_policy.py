"""The policy: batch-invariant scoring, the reference model, parameters, dtypes, saving.

Every test that touches a model runs on both the tiny T5 and the tiny GPT-2. The parameter
counts of FLAN-T5-base are checked on a model built on the meta device (no weights).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    GPT2Config,
    GPT2LMHeadModel,
    T5Config,
    T5ForConditionalGeneration,
)

from detoxrl.config import LoraSettings, ModelConfig, SamplingConfig
from detoxrl.errors import ConfigError, ModelLoadError
from detoxrl.models.generation import collate_queries
from detoxrl.models.loading import resolve_dtype
from detoxrl.models.lora import default_lora
from detoxrl.models.policy import VALUE_HEAD_FILE, Policy
from detoxrl.models.tiny import untie_lm_head
from detoxrl.rl import math as rl_math

PROMPTS = [
    "#Person1#: Hi, how are you?",
    "#Person1#: I think the meeting is going to be late again.\n#Person2#: Really? I didn't "
    "know that. We should talk about the meeting tomorrow.",
    "Good morning.",
]
LIMITS = [5, 9, 3]
VALUE_HEAD = {"value_head.summary.weight", "value_head.summary.bias"}


# --------------------------------------------------------------------------- helpers

def pad_rows(rows: list[list[int]], pad_id: int, side: str, extra: int = 0
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``collate_queries`` plus ``extra`` padding columns on the padding side."""
    ids, mask = collate_queries(rows, pad_id, side)
    pad = (extra, 0) if side == "left" else (0, extra)
    return (torch.nn.functional.pad(ids, pad, value=pad_id),
            torch.nn.functional.pad(mask, pad, value=0))


def load(path, **kwargs) -> Policy:
    adapter = kwargs.pop("adapter", None)
    return Policy.from_pretrained(ModelConfig(name_or_path=str(path), adapter=adapter), **kwargs)


def sample(policy: Policy, seed: int = 0):
    rows = [policy.tokenizer(p).input_ids for p in PROMPTS]
    q, qm = pad_rows(rows, policy.tokenizer.pad_token_id, policy.padding_side)
    torch.manual_seed(seed)
    return policy.generate(q, qm, SamplingConfig(min_length=0), LIMITS)


def score(policy: Policy, batch, **kwargs):
    return policy(batch.query_ids, batch.query_mask, batch.response_ids, batch.response_mask,
                  **kwargs)


def kl(policy_out, ref_out, mask) -> torch.Tensor:
    """Summed k3 estimate of KL(policy || ref) over response tokens: >= 0, 0 iff equal."""
    return rl_math.masked_sum(rl_math.kl_penalty(policy_out.logprobs, ref_out.logprobs, "k3"),
                              mask)


def grad_flags(policy: Policy) -> dict[str, bool]:
    return {name: p.requires_grad for name, p in policy.named_parameters()}


def trainable_names(policy: Policy) -> set[str]:
    return {name for name, flag in grad_flags(policy).items() if flag}


def adapter_weights(policy: Policy, adapter: str) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in policy.named_parameters()
            if "lora_" in n and f".{adapter}." in n}


def optimizer_step(policy: Policy, batch) -> None:
    """One Adam step that raises the sampled tokens' log-probs (and fits values to 1)."""
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    out = score(policy, batch)
    mask = batch.response_mask
    loss = -rl_math.masked_mean(out.logprobs, mask) + rl_math.masked_mean(
        (out.values - 1).square(), mask)
    loss.backward()
    assert all(p.grad is not None for p in params)
    optimizer.step()
    optimizer.zero_grad()


def make_adapter(base_path, out_dir, seed: int = 0):
    """Save a LoRA adapter (the policy's default targets) whose ``lora_B`` is not zero."""
    config = AutoConfig.from_pretrained(base_path)
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    from peft import get_peft_model

    model = get_peft_model(auto.from_pretrained(base_path), default_lora(
        config.model_type, config.is_encoder_decoder, LoraSettings()))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    model.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(params=["t5", "gpt2"])
def base_path(request):
    return request.getfixturevalue(f"tiny_{request.param}_path")


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """``adapters(base_path)``: a perturbed LoRA adapter for that base, built once."""
    built = {}

    def get(path):
        if path not in built:
            built[path] = make_adapter(path, tmp_path_factory.mktemp("adapter"))
        return built[path]

    return get


# --------------------------------------------------------------------------- batch invariance

def test_scores_do_not_depend_on_the_rest_of_the_batch(base_path, adapters):
    # A continued adapter, so that the LoRA path contributes to every number compared.
    policy = load(base_path, adapter=str(adapters(base_path)))
    batch = sample(policy)
    mask, pad = batch.response_mask, policy.tokenizer.pad_token_id
    lengths = mask.sum(1).tolist()
    assert len(set(lengths)) > 1 and len(set(batch.query_mask.sum(1).tolist())) > 1
    queries = [row[m.bool()].tolist() for row, m in zip(batch.query_ids, batch.query_mask,
                                                         strict=True)]
    responses = [row[:n].tolist() for row, n in zip(batch.response_ids, lengths, strict=True)]
    with torch.no_grad():
        together = score(policy, batch)
        # The same rows reversed, with three more query and two more response pad columns.
        q2, qm2 = pad_rows(queries[::-1], pad, policy.padding_side, extra=3)
        r2, rm2 = pad_rows(responses[::-1], pad, "right", extra=2)
        shuffled = policy(q2, qm2, r2, rm2)
        for i, n in enumerate(lengths):
            q1, qm1 = pad_rows([queries[i]], pad, policy.padding_side)
            r1, rm1 = pad_rows([responses[i]], pad, "right")
            alone = policy(q1, qm1, r1, rm1)
            j = len(lengths) - 1 - i
            for other in (together, shuffled):
                k = i if other is together else j
                torch.testing.assert_close(other.logprobs[k, :n], alone.logprobs[0],
                                           atol=1e-5, rtol=0)
                torch.testing.assert_close(other.values[k, :n], alone.values[0],
                                           atol=1e-5, rtol=0)


def test_rollout_keeps_the_encoder_output_and_forward_can_reuse_it(base_path):
    policy = load(base_path)
    batch = sample(policy)
    if not policy.is_seq2seq:
        assert batch.encoder_hidden is None
        return
    hidden = policy.model.get_base_model().config.d_model
    assert batch.encoder_hidden.shape == (*batch.query_ids.shape, hidden)
    with torch.no_grad():
        full = score(policy, batch)
        reused = score(policy, batch, encoder_hidden=batch.encoder_hidden)
    torch.testing.assert_close(reused.logprobs, full.logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(reused.values, full.values, atol=1e-5, rtol=0)


def test_unblocked_logprobs_read_while_sampling_and_scored_agree(base_path):
    """Under min_length, the rollout's and forward's unblocked log-probs are the log-probs
    of a pass with nothing blocked; the blocked ones stay those of the blocked pass."""
    policy = load(base_path, value_head=False)
    rows = [policy.tokenizer(p).input_ids for p in PROMPTS]
    q, qm = pad_rows(rows, policy.tokenizer.pad_token_id, policy.padding_side)
    torch.manual_seed(0)
    batch = policy.generate(q, qm, SamplingConfig(min_length=3), LIMITS, with_logprobs=True)
    assert batch.eos_blocked == 3
    mask = batch.response_mask.bool()
    with torch.no_grad():
        blocked = score(policy, batch, with_values=False, eos_blocked=3, with_unblocked=True)
        free = score(policy, batch, with_values=False, eos_blocked=0)
    for got in (blocked.unblocked_logprobs, batch.unblocked_logprobs):
        torch.testing.assert_close(got[mask], free.logprobs[mask], atol=1e-5, rtol=0)
    torch.testing.assert_close(batch.logprobs[mask], blocked.logprobs[mask], atol=1e-5, rtol=0)
    assert (blocked.logprobs[:, :3] > free.logprobs[:, :3])[mask[:, :3]].all()
    assert score(policy, batch, with_values=False).unblocked_logprobs is None


def test_rows_sharing_a_query_read_it_once_with_the_same_scores(tiny_gpt2_path):
    """K samples per prompt: without gradients the causal pass reads each distinct query
    once (models.prefix) and gives the row-by-row pass's log-probs, values and unblocked
    log-probs; with gradients it is the row-by-row pass."""
    from detoxrl.models.prefix import query_groups

    policy = load(tiny_gpt2_path)
    rows = [policy.tokenizer(p).input_ids for p in PROMPTS]
    q, qm = pad_rows(rows, policy.tokenizer.pad_token_id, policy.padding_side)
    torch.manual_seed(0)
    batch = policy.generate(q, qm, SamplingConfig(min_length=2), LIMITS,
                            num_return_sequences=3)
    assert query_groups(q, qm) is None
    first, inverse = query_groups(batch.query_ids, batch.query_mask)
    assert first.tolist() == [0, 3, 6] and inverse.tolist() == [i // 3 for i in range(9)]
    few = [0, 1, 3, 6]                       # one repeat among 3 queries: not worth a pass
    assert query_groups(batch.query_ids[few], batch.query_mask[few]) is None
    embed = policy.model.get_base_model().get_input_embeddings()
    read = []
    hook = embed.register_forward_hook(lambda m, args, out: read.append(tuple(args[0].shape)))
    kwargs = {"eos_blocked": 2, "with_unblocked": True}
    with torch.no_grad():
        shared = score(policy, batch, **kwargs)
    hook.remove()
    row_by_row = score(policy, batch, **kwargs)                 # gradients on: the plain pass
    assert read[0] == (3, batch.query_ids.shape[1] - 1)           # the last token comes after
    policy.share_queries = False           # as under ZeRO-3/FSDP, where ranks must step together
    read.clear()
    hook = embed.register_forward_hook(lambda m, args, out: read.append(tuple(args[0].shape)))
    with torch.no_grad():
        score(policy, batch, **kwargs)
    hook.remove()
    assert read == [(9, batch.query_ids.shape[1] + batch.response_ids.shape[1])]
    mask = batch.response_mask.bool()
    for name in ("logprobs", "values", "unblocked_logprobs"):
        torch.testing.assert_close(getattr(shared, name)[mask],
                                   getattr(row_by_row, name).detach()[mask], atol=1e-5, rtol=0)


def test_causal_forward_computes_only_the_response_logits(tiny_gpt2_path):
    policy = load(tiny_gpt2_path)
    assert policy._accepts_logits_to_keep          # GPT-2 takes logits_to_keep: it is used
    batch = sample(policy)
    with torch.no_grad():
        kept = score(policy, batch, with_entropy=True)
        policy._accepts_logits_to_keep = False     # the fallback for models that do not
        full = score(policy, batch, with_entropy=True)
    for name in ("logprobs", "values", "entropy"):
        torch.testing.assert_close(getattr(kept, name), getattr(full, name), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- reference / KL

def test_fresh_adapter_starts_at_zero_kl_to_the_base(base_path):
    policy = load(base_path)
    assert not policy.has_reference_adapter
    batch = sample(policy)
    flags = grad_flags(policy)
    with torch.no_grad():
        out = score(policy, batch)
        with policy.reference():
            assert not any(".default." in n for n in trainable_names(policy))
            ref = score(policy, batch, with_values=False)
    assert grad_flags(policy) == flags                         # restored on exit
    assert float(kl(out, ref, batch.response_mask)) == 0.0
    assert torch.equal(out.logprobs, ref.logprobs)

    optimizer_step(policy, batch)
    with torch.no_grad():
        after = score(policy, batch)
        with policy.reference():
            ref_after = score(policy, batch, with_values=False)
    assert torch.equal(ref_after.logprobs, ref.logprobs)       # the base did not move
    assert float(kl(after, ref_after, batch.response_mask)) > 0


def test_continued_adapter_is_its_own_reference(base_path, adapters, tmp_path):
    adapter_dir = adapters(base_path)
    saved = load_file(adapter_dir / "adapter_model.safetensors")
    policy = load(base_path, adapter=str(adapter_dir))
    bare = load(base_path)
    assert policy.has_reference_adapter
    assert not any(m.training for m in policy.modules())

    # Both adapters hold the saved weights.
    default, reference = adapter_weights(policy, "default"), adapter_weights(policy, "reference")
    assert len(default) == len(reference) == len(saved) > 0
    for name, weight in saved.items():
        stem = name.removesuffix(".weight")
        assert torch.equal(default[next(n for n in default if stem + ".default." in n)], weight)
        assert torch.equal(reference[next(n for n in reference if stem + ".reference." in n)],
                           weight)

    # Only the "default" adapter and the value head train.
    names = trainable_names(policy)
    assert names == set(default) | VALUE_HEAD
    flags = grad_flags(policy)

    batch = sample(policy)
    mask = batch.response_mask.bool()
    with torch.no_grad():
        out = score(policy, batch)
        with policy.reference():
            assert trainable_names(policy) == VALUE_HEAD       # the reference is frozen
            ref = score(policy, batch, with_values=False)
        with policy.model.disable_adapter():
            base_here = score(policy, batch, with_values=False)
        with bare.reference():
            base = score(bare, batch, with_values=False)
    assert grad_flags(policy) == flags                          # restored on exit
    torch.testing.assert_close(base_here.logprobs[mask], base.logprobs[mask], atol=1e-5, rtol=0)
    # The adapter is loaded (outputs differ from the bare base) and is the reference.
    assert (out.logprobs - base.logprobs)[mask].abs().max() > 1e-3
    assert (ref.logprobs - base_here.logprobs)[mask].abs().max() > 1e-3
    assert float(kl(out, ref, batch.response_mask)) == 0.0
    assert torch.equal(out.logprobs, ref.logprobs)

    optimizer_step(policy, batch)
    assert grad_flags(policy) == flags
    with torch.no_grad():
        after = score(policy, batch)
        with policy.reference():
            ref_after = score(policy, batch, with_values=False)
    assert float(kl(after, ref_after, batch.response_mask)) > 0
    assert torch.equal(ref_after.logprobs, ref.logprobs)       # the reference did not move
    for name, weight in adapter_weights(policy, "reference").items():
        assert torch.equal(weight, reference[name])

    # Saving writes the trained "default" adapter only, at the top of the folder.
    policy.save(tmp_path)
    assert not any(p.is_dir() for p in tmp_path.iterdir())
    written = load_file(tmp_path / "adapter_model.safetensors")
    assert written.keys() == saved.keys()
    assert any(not torch.equal(written[k], saved[k]) for k in saved)


@pytest.mark.parametrize("continued", [False, True])
def test_reference_keeps_a_frozen_policy_frozen(base_path, adapters, continued):
    adapter = str(adapters(base_path)) if continued else None
    policy = load(base_path, adapter=adapter, trainable=False)
    assert not trainable_names(policy)
    batch = sample(policy)
    with torch.no_grad(), policy.reference():
        score(policy, batch, with_values=False)
    assert not trainable_names(policy)


# --------------------------------------------------------------------------- parameters

def test_flan_t5_base_parameter_counts():
    config = T5Config(vocab_size=32128, d_model=768, d_ff=2048, d_kv=64, num_heads=12,
                      num_layers=12, num_decoder_layers=12, feed_forward_proj="gated-gelu",
                      tie_word_embeddings=False)
    with torch.device("meta"):
        model = T5ForConditionalGeneration(config)
    untie_lm_head(model)
    policy = Policy.from_model(model, None, LoraSettings())
    trainable, total, percent = policy.parameter_report(include_value_head=False)
    assert (trainable, total) == (3_538_944, 251_116_800)
    assert f"{percent:.2f}%" == "1.41%"
    assert policy.parameter_report(include_value_head=True)[:2] == (3_539_713, 251_117_569)
    # r=32 on q and v of 12 encoder self-attention and 12 x 2 decoder attention blocks.
    names = trainable_names(policy) - VALUE_HEAD
    assert len(names) == 72 * 2
    assert all(n.split(".")[-4] in ("q", "v") for n in names)


def test_gpt2_default_targets_are_c_attn():
    with torch.device("meta"):
        model = GPT2LMHeadModel(GPT2Config())
    policy = Policy.from_model(model, None, LoraSettings())
    names = trainable_names(policy) - VALUE_HEAD
    assert len(names) == 12 * 2
    assert all(".attn.c_attn.lora_" in n for n in names)
    trainable, total, _ = policy.parameter_report(include_value_head=False)
    # r=16 on c_attn (768 -> 2304) in 12 blocks: 12 * 16 * (768 + 2304).
    assert trainable == 12 * 16 * (768 + 2304) == 589_824
    assert total == 124_439_808 + trainable
    assert policy.parameter_report(include_value_head=True)[0] == trainable + 769


# --------------------------------------------------------------------------- dtype

def test_resolve_dtype():
    cpu = torch.device("cpu")
    for model_type in ("t5", "mt5"):
        with pytest.raises(ConfigError, match="bfloat16"):
            resolve_dtype("float16", model_type, cpu)
    assert resolve_dtype("auto", "t5", cpu) == torch.float32
    assert resolve_dtype("auto", "gpt2", cpu) == torch.float32
    assert resolve_dtype("bfloat16", "t5", cpu) == torch.bfloat16
    assert resolve_dtype("float16", "gpt2", cpu) == torch.float16


# --------------------------------------------------------------------------- dropout

def test_dropout_is_off(base_path):
    policy = load(base_path)
    dropouts = [m for m in policy.model.modules() if isinstance(m, torch.nn.Dropout)]
    assert any(m.p > 0 for m in dropouts)                      # there is dropout to switch off
    assert not any(m.training for m in policy.modules())
    batch = sample(policy)
    first, second = score(policy, batch), score(policy, batch)   # with autograd on, as in PPO
    assert torch.equal(first.logprobs, second.logprobs)
    assert torch.equal(first.values, second.values)
    with torch.no_grad(), policy.reference():
        score(policy, batch)
    assert not any(m.training for m in policy.modules())


# --------------------------------------------------------------------------- checkpointing

def _saved_activation_bytes(policy: Policy, batch) -> tuple[int, object]:
    """Bytes autograd keeps for the backward pass (parameters excluded), and the output."""
    params = {p.untyped_storage().data_ptr() for p in policy.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = score(policy, batch, with_entropy=True)
    return sum(seen.values()), out


def test_gradient_checkpointing_keeps_the_numbers_and_drops_activations(base_path):
    policies = {}
    for flag in (False, True):
        torch.manual_seed(0)
        policies[flag] = Policy.from_pretrained(
            ModelConfig(name_or_path=str(base_path), gradient_checkpointing=flag))
    batch = sample(policies[False])
    saved, grads, outs = {}, {}, {}
    for flag, policy in policies.items():
        with torch.no_grad():  # a non-zero adapter, so that the LoRA path carries gradients
            for name, param in policy.named_parameters():
                if "lora_B" in name:
                    param.fill_(0.01)
        saved[flag], outs[flag] = _saved_activation_bytes(policy, batch)
        (outs[flag].logprobs.sum() + outs[flag].values.sum()).backward()
        grads[flag] = {n: p.grad for n, p in policy.named_parameters() if p.requires_grad}
    assert saved[True] < saved[False] / 2
    assert not any(m.training for m in policies[True].modules())   # eval mode outside forward
    for name in ("logprobs", "values", "entropy"):
        torch.testing.assert_close(getattr(outs[True], name), getattr(outs[False], name),
                                   atol=1e-6, rtol=0)
    assert grads[True].keys() == grads[False].keys()
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- save / load

def test_save_and_load_trained_round_trip(base_path, tmp_path):
    policy = load(base_path)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if ".default." in name or name.startswith("value_head."):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    policy.save(tmp_path)
    files = {p.name for p in tmp_path.rglob("*") if p.is_file()}
    assert {"adapter_model.safetensors", "adapter_config.json", VALUE_HEAD_FILE} <= files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle"))]

    fresh = load(base_path)
    trained = {**adapter_weights(policy, "default"), **dict(policy.value_head.named_parameters())}
    before = {**adapter_weights(fresh, "default"), **dict(fresh.value_head.named_parameters())}
    assert before.keys() == trained.keys()
    assert not any(torch.equal(before[k], trained[k]) for k in trained)
    fresh.load_trained(tmp_path)
    after = {**adapter_weights(fresh, "default"), **dict(fresh.value_head.named_parameters())}
    for name, weight in trained.items():
        assert torch.equal(after[name], weight), name

    batch = sample(policy)
    with torch.no_grad():
        a, b = score(policy, batch), score(fresh, batch)
    assert torch.equal(a.logprobs, b.logprobs) and torch.equal(a.values, b.values)


# --------------------------------------------------------------------------- errors

def test_missing_model_path_names_it(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError) as info:
        Policy.from_pretrained(ModelConfig(name_or_path=str(missing)))
    message = str(info.value)
    assert str(missing) in message
    assert "local folder" in message


def test_cudnn_attention_is_off_only_inside_a_cuda_pass():
    from detoxrl.models.attention import no_cudnn_attention

    flags = torch.backends.cuda
    assert flags.cudnn_sdp_enabled()
    with no_cudnn_attention(torch.device("cuda")):   # a device object needs no GPU
        assert not flags.cudnn_sdp_enabled()
        assert flags.flash_sdp_enabled() and flags.mem_efficient_sdp_enabled()
        assert flags.math_sdp_enabled()
    assert flags.cudnn_sdp_enabled()
    with no_cudnn_attention(torch.device("cpu")):
        assert flags.cudnn_sdp_enabled()
