"""Decoding K rows per query over one shared copy of the query's keys and values
(``detoxrl.models.prefix.SharedPrefix``): the same tokens as K repeated rows, log-probs within
float rounding, for each architecture it is enabled for."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    T5Config,
)

from detoxrl.config import SamplingConfig
from detoxrl.models import prefix
from detoxrl.models.decoding import decode

SHAPE = dict(vocab_size=96, num_hidden_layers=2, num_attention_heads=4)
CONFIGS = {
    "gpt2": lambda: GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64),
    # Two query heads per key head (grouped-query attention), rotary positions.
    "llama": lambda: LlamaConfig(hidden_size=32, intermediate_size=64, num_key_value_heads=2,
                                 **SHAPE),
    "qwen2": lambda: Qwen2Config(hidden_size=32, intermediate_size=64, num_key_value_heads=2,
                                 **SHAPE),
}


def tiny_lm(name: str):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[name]())
    return model.eval()


def queries() -> tuple[torch.Tensor, torch.Tensor]:
    """Three left-padded queries of 2, 6 and 4 real tokens."""
    ids = torch.randint(3, 96, (3, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[0, 0, 0, 0, 1, 1], [1] * 6, [0, 0, 1, 1, 1, 1]])
    return ids.masked_fill(mask == 0, 0), mask


def run(model, ids, mask, repeats: int):
    torch.manual_seed(7)
    sampling = SamplingConfig(top_p=0.9, top_k=0, temperature=1.0)
    return decode(model, ids, mask, sampling, 8, eos_blocked=2, eos_token_id=1,
                  pad_token_id=0, with_logprobs=True, repeats=repeats)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_rows_sharing_a_query_decode_as_repeated_rows(name, monkeypatch):
    model, (ids, mask), k = tiny_lm(name), queries(), 5
    assert prefix.can_share_prefix(model, ids.device)
    steps = []
    real_step = prefix.SharedPrefix.step

    def counted(self, m):
        steps.append(self)
        return real_step(self, m)

    monkeypatch.setattr(prefix.SharedPrefix, "step", counted)
    shared = run(model, ids, mask, k)
    assert len(steps) == 7 and all(s.reads == 2 for s in steps)  # every later step, 2 layers
    assert model.config._attn_implementation == "sdpa"             # switched back
    steps.clear()
    repeated = run(model, ids.repeat_interleave(k, 0), mask.repeat_interleave(k, 0), 1)
    assert not steps
    assert torch.equal(shared.tokens, repeated.tokens)
    assert len({tuple(row) for row in shared.tokens[:k].tolist()}) > 1  # K draws, not copies
    for a, b in ((shared.logprobs, repeated.logprobs),
                 (shared.unblocked_logprobs, repeated.unblocked_logprobs)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("rep", [1, 2])
def test_the_attention_equals_attention_over_the_concatenation(rep):
    """Hand-built prefix and suffix tensors, with padding in one query, against PyTorch's
    scaled-dot-product attention over each row's own copy of the whole sequence."""
    g, k, kv_heads, width, t, dim = 3, 4, 2, 5, 3, 8
    heads, rows = kv_heads * rep, g * k
    gen = torch.Generator().manual_seed(0)
    prefix_keys, prefix_values = (torch.randn(g, kv_heads, width, dim, generator=gen)
                                  for _ in range(2))
    keys, values = (torch.randn(rows, kv_heads, t, dim, generator=gen) for _ in range(2))
    query = torch.randn(rows, heads, 1, dim, generator=gen)
    query_mask = torch.ones(g, width, dtype=torch.long)
    query_mask[1, :3] = 0

    cache = type("Cache", (), {})()
    cache.layers = [type("Layer", (), {"keys": prefix_keys, "values": prefix_values})]
    shared = prefix.SharedPrefix(cache, query_mask)
    layer = type("Attention", (), {"layer_idx": 0})
    out, _ = prefix.shared_prefix_attention(layer, query, keys, values, None, scaling=0.3,
                                            shared_prefix=shared)
    full_keys = torch.cat([prefix_keys.repeat_interleave(k, 0), keys], 2)
    full_values = torch.cat([prefix_values.repeat_interleave(k, 0), values], 2)
    seen = torch.cat([query_mask.repeat_interleave(k, 0), torch.ones(rows, t, dtype=torch.long)],
                     1).bool()[:, None, None]
    expected = F.scaled_dot_product_attention(
        query, full_keys.repeat_interleave(rep, 1), full_values.repeat_interleave(rep, 1),
        attn_mask=seen, scale=0.3).transpose(1, 2)                          # (N, 1, H, D)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    assert shared.reads == 1


def test_a_step_in_which_a_layer_skips_the_prefix_is_an_error():
    """Every layer must read the shared prefix: one that attended to the response alone
    would give wrong log-probs without a word."""
    model, (ids, mask) = tiny_lm("gpt2"), queries()
    with torch.no_grad():
        cache = model(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values
    shared = prefix.SharedPrefix(cache, mask)
    with pytest.raises(RuntimeError, match="0 of 2 attention layers"), shared.step(model):
        pass  # no forward: no layer read it
    assert model.config._attn_implementation == "sdpa"


def test_only_verified_causal_models_on_the_cpu_share_a_prefix():
    cpu = torch.device("cpu")
    assert prefix.can_share_prefix(tiny_lm("gpt2"), cpu)
    assert not prefix.can_share_prefix(tiny_lm("gpt2"), torch.device("cuda"))
    eager = AutoModelForCausalLM.from_config(CONFIGS["gpt2"](), attn_implementation="eager")
    assert not prefix.can_share_prefix(eager, cpu)
    windowed = AutoModelForCausalLM.from_config(MistralConfig(
        hidden_size=32, intermediate_size=64, num_key_value_heads=2, sliding_window=4,
        **SHAPE))
    assert not prefix.can_share_prefix(windowed, cpu)
    t5 = AutoModelForSeq2SeqLM.from_config(T5Config(vocab_size=96, d_model=32, d_ff=64,
                                                    num_layers=1, num_heads=4, d_kv=8))
    assert not prefix.can_share_prefix(t5, cpu)
