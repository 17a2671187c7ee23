"""The rollout batch: mini-batches drop the padding all their rows share, on either side."""

from __future__ import annotations

import torch

from detoxrl.models.rollout import Rollout


def _rollout(query_mask: list[list[int]], response_mask: list[list[int]],
             hidden: int = 0) -> Rollout:
    qm, rm = torch.tensor(query_mask), torch.tensor(response_mask)
    b, q = qm.shape
    # Distinct ids per position, so that a test sees which columns were kept.
    query_ids = torch.arange(b * q).reshape(b, q) * qm
    encoder_hidden = (torch.arange(b * q * hidden, dtype=torch.float).reshape(b, q, hidden)
                      if hidden else None)
    return Rollout(query_ids=query_ids, query_mask=qm, response_ids=torch.arange(rm.numel())
                   .reshape(rm.shape) * rm, response_mask=rm,
                   queries=[f"q{i}" for i in range(b)], responses=[f"r{i}" for i in range(b)],
                   ended_with_eos=torch.ones(b, dtype=torch.bool),
                   values=torch.randn(rm.shape), encoder_hidden=encoder_hidden)


def test_select_trims_right_padded_queries_with_their_encoder_output():
    batch = _rollout([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]],
                     [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0]], hidden=2)
    mini = batch.select([2, 1])
    assert mini.queries == ["q2", "q1"]
    assert torch.equal(mini.query_ids, batch.query_ids[[2, 1], :3])
    assert torch.equal(mini.query_mask, torch.tensor([[1, 1, 1], [1, 1, 0]]))
    assert torch.equal(mini.encoder_hidden, batch.encoder_hidden[[2, 1], :3])
    assert torch.equal(mini.response_ids, batch.response_ids[[2, 1], :2])
    assert torch.equal(mini.values, batch.values[[2, 1], :2])


def test_select_trims_left_padded_queries():
    batch = _rollout([[1, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1]], [[1, 1], [1, 1], [1, 0]])
    mini = batch.select([1, 2])
    assert torch.equal(mini.query_ids, batch.query_ids[[1, 2], 2:])
    assert torch.equal(mini.query_mask, torch.tensor([[1, 1], [0, 1]]))
    assert mini.encoder_hidden is None


def test_trim_keeps_a_batch_without_shared_padding_as_it_is():
    batch = _rollout([[1, 1], [1, 0]], [[1, 1], [0, 1]])
    assert batch.trim() is batch
