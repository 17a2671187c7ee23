"""Reinforcement learning: the math, the algorithms, one step, and the trainer around it.

``math`` and ``kl`` are pure tensor functions with their sources; ``algorithms`` says what
PPO, RLOO and GRPO do differently; ``learner`` runs one step (rollout, score, forwards,
rewards, advantages, updates, KL controller); ``assembly`` builds the learner from a config
(the one place), ``distributed`` holds the accelerator, precision, DeepSpeed and
cross-process helpers; ``detox_trainer`` the public ``DetoxTrainer`` and ``train``, which
write the run folder; ``inputs`` turns what a user passes into prompts and names. Imports
``detoxrl.errors``, ``config``, ``runs``, ``models``, ``data`` and ``evaluation`` (the model
card); never ``supervised``, ``demo``, ``commands`` or ``cli``.
"""
