"""The networks: the policy, the reward classifiers, loading them, sampling from them.

``policy`` wraps a seq2seq or causal LM with its LoRA adapter, reference and value head
(the seq2seq/causal split lives there); ``reward`` the classifier rewards; ``loading``
``from_pretrained`` with clear errors; ``generation`` the sampling helpers; ``rollout`` the
sampled batch (:class:`~detoxrl.models.rollout.Rollout`); ``tiny`` the offline test
models; ``inference`` the public ``generate``; ``lora`` the default LoRA targets;
``quiet`` the library messages silenced around loading. Imports ``detoxrl.errors``,
``detoxrl.config`` and ``detoxrl.runs``.
"""
