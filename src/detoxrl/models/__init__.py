"""The networks: the policy, the reward classifiers, loading them, sampling from them.

``policy`` wraps a seq2seq or causal LM with its LoRA adapter, reference and value head
(the seq2seq/causal split lives there; ``value_head`` the head); ``reward`` the classifier
rewards; ``loading`` ``from_pretrained`` with clear errors; ``decoding`` the one decoding
loop, ``sampler`` its next-token sampler, ``generation`` length limits, masks and beam
search; ``prefix`` a causal pass that reads each query shared by several rows once;
``rollout`` the sampled batch (:class:`~detoxrl.models.rollout.Rollout`); ``tiny`` the
offline test models; ``inference`` the public ``generate``; ``lora`` the default LoRA
targets; ``quiet`` the library messages silenced around loading; ``attention`` the
attention kernels the policy's passes may use on a GPU. Imports ``detoxrl.errors``,
``detoxrl.config`` and ``detoxrl.runs``.
"""
