"""PPO's critic: a linear value estimate on the policy's last hidden state, and its file."""

from __future__ import annotations

from torch import Tensor, nn

VALUE_HEAD_FILE = "value_head.safetensors"


class ValueHead(nn.Module):
    """A linear value estimate from the last hidden state; kept in fp32 for stable targets."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.summary.weight, std=1.0 / (hidden_size + 1) ** 0.5)
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: Tensor) -> Tensor:                 # (B, T, H) -> (B, T)
        return self.summary(hidden.to(self.summary.weight.dtype)).squeeze(-1)
