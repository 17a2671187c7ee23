"""Which fused attention kernels the policy's passes may use on a GPU.

On CUDA, PyTorch's scaled-dot-product attention may pick cuDNN's kernel. cuDNN plans each
new shape on the host, and decoding makes a new shape (one more cached key) at every token,
so its planning dominated a rollout: on an H200 at the gpt2 shape, 85% of the rollout's host
time went to ``aten::_cudnn_attention_forward`` and the GPU was busy 3% of the time
(``bench/results/gpu-h200.md``). Flash and memory-efficient attention need no such planning.
Imports torch only.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


@contextmanager
def no_cudnn_attention(device: torch.device):
    """Scaled-dot-product attention without the cuDNN backend on CUDA; nothing elsewhere."""
    if device.type != "cuda":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                      SDPBackend.MATH]):
        yield
