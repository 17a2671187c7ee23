"""Supervised training with ``transformers.Trainer``: the reward classifier and the LM.

``reward_training`` fine-tunes a sequence classifier on labelled texts (``detoxrl
train-reward``) and ``reward_card`` writes its README with the reward's validity; ``sft``
trains or fine-tunes the policy LM (``detoxrl sft``); ``common`` holds what both share
(model section, Trainer settings, the atomic output folder). Imports ``detoxrl.errors``,
``config``, ``runs``, ``models``, ``data`` and ``evaluation`` (ROUGE, validity).
"""
