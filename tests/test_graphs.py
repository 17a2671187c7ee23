"""Decoding over a static KV cache, the steps a GPU records as CUDA graphs.

On the CPU the static steps run eagerly, so their cache, positions and 4D masks are checked
here against the dynamic cache's loop on the tiny T5 and GPT-2 (and a tiny BART built
here): the same tokens (greedy
and sampled, with rows that end early and left-padded prompts) and the same log-probs and
hidden states within 1e-5. Where a CUDA device is present, the recorded and replayed path
of ``Policy.generate`` is checked the same way, and that it did replay a graph.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from detoxrl.config import SamplingConfig
from detoxrl.models.decoding import decode
from test_generation import EOS, PROMPTS, encode, eos_policy  # noqa: F401  (a fixture)

NEW_TOKENS = 12


def decoded(policy, q, qm, sampling, graphs: bool, seed: int = 0):
    base = policy.model.get_base_model()
    encoder_hidden = None
    if policy.is_seq2seq:
        encoder_hidden = base.get_encoder()(input_ids=q, attention_mask=qm).last_hidden_state
    torch.manual_seed(seed)
    return decode(base, q, qm, sampling, NEW_TOKENS, 2, EOS, policy.tokenizer.pad_token_id,
                  encoder_hidden, with_logprobs=True, with_hidden=True, graphs=graphs)


@pytest.mark.parametrize("do_sample", [False, True])
def test_static_steps_decode_as_the_dynamic_cache(eos_policy, do_sample):  # noqa: F811
    q, qm = encode(eos_policy, PROMPTS * 2)
    sampling = SamplingConfig(do_sample=do_sample, top_p=0.9, top_k=20, temperature=0.8)
    dynamic = decoded(eos_policy, q, qm, sampling, graphs=False)
    static = decoded(eos_policy, q, qm, sampling, graphs=True)
    assert torch.equal(static.tokens, dynamic.tokens)
    if do_sample:  # rows that ended and rows that did not, so padding after EOS is covered
        ended = (dynamic.tokens == EOS).any(1)
        assert ended.any() and not ended.all()
    torch.testing.assert_close(static.logprobs, dynamic.logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(static.hidden, dynamic.hidden, atol=1e-5, rtol=0)


def test_static_steps_decode_bart_as_the_dynamic_cache():
    """BART's decoder counts its learned positions from the cache's length, not from ids."""
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    config = BartConfig(vocab_size=100, d_model=32, encoder_layers=2, decoder_layers=2,
                        encoder_attention_heads=4, decoder_attention_heads=4,
                        encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                        pad_token_id=0, bos_token_id=2, eos_token_id=EOS,
                        decoder_start_token_id=2, forced_eos_token_id=None)
    model = BartForConditionalGeneration(config).eval()
    q = torch.randint(3, 100, (4, 9))
    qm = torch.ones_like(q)
    qm[1, 6:], qm[3, 4:] = 0, 0                                   # right-padded prompts
    encoder_hidden = model.get_encoder()(input_ids=q, attention_mask=qm).last_hidden_state
    sampling = SamplingConfig(top_p=0.9)
    runs = []
    for graphs in (False, True):
        torch.manual_seed(0)
        runs.append(decode(model, q, qm, sampling, NEW_TOKENS, 2, EOS, 0, encoder_hidden,
                           with_logprobs=True, with_hidden=True, graphs=graphs))
    dynamic, static = runs
    assert torch.equal(static.tokens, dynamic.tokens)
    torch.testing.assert_close(static.logprobs, dynamic.logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(static.hidden, dynamic.hidden, atol=1e-5, rtol=0)


def test_static_steps_refuse_synced_gpus(eos_policy):  # noqa: F811
    q, qm = encode(eos_policy, PROMPTS[:1])
    base = eos_policy.model.get_base_model()
    with pytest.raises(ValueError, match="synced_gpus"):
        decode(base, q, qm, SamplingConfig(), 4, 0, EOS, 0, synced_gpus=True, graphs=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_rollout_matches_the_eager_loop(eos_policy):  # noqa: F811
    from torch.profiler import ProfilerActivity, profile

    policy = eos_policy
    policy.model.to("cuda")
    if policy.value_head is not None:
        policy.value_head.to("cuda")
    try:
        q, qm = (t.cuda() for t in encode(policy, PROMPTS * 2))
        sampling = SamplingConfig(min_length=2, top_p=0.9, temperature=0.8)
        eager = dataclasses.replace(sampling, cuda_graphs=False)
        limits = [NEW_TOKENS] * len(q)
        torch.manual_seed(0)
        plain = policy.generate(q, qm, eager, limits, with_logprobs=True)
        torch.manual_seed(0)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            graphed = policy.generate(q, qm, sampling, limits, with_logprobs=True)
        assert torch.equal(graphed.response_ids, plain.response_ids)
        torch.testing.assert_close(graphed.logprobs, plain.logprobs, atol=1e-4, rtol=0)
        launches = {e.key: e.count for e in prof.key_averages()}
        assert launches.get("cudaGraphLaunch", 0) >= NEW_TOKENS - 3
    finally:
        policy.model.to("cpu")
        if policy.value_head is not None:
            policy.value_head.to("cpu")
