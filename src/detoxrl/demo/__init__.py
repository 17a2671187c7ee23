"""``detoxrl demo``: a real detoxification, offline, as a chain of cached stages.

0. data: the RealToxicityPrompts prompts split by :func:`detoxrl.data.is_held_out` into the
   RL prompts and the two held-out evaluation sets (non-toxic, toxic);
1. reward: a mini offensive-language classifier trained on TweetEval offensive
   (:func:`detoxrl.supervised.reward_training.train_reward`), its validity measured;
2. policy: a mini LM trained from scratch on public text (:func:`detoxrl.supervised.sft.sft`);
3. RL: PPO with a fresh LoRA adapter on that LM (:func:`detoxrl.rl.detox_trainer.train`);
4. evaluation of both held-out sets with the RealToxicityPrompts protocol, each judge
   figure beside its floor on clean human text, and of the baseline without training
   (the starting policy, each sample the best of 4 by the reward);
5. the report and the before/after table.

Each stage records what it was built from (:mod:`detoxrl.demo.cache`), so a re-run skips
what is built and rebuilds a stage whose inputs changed, and every stage after it. Stages
that do not read each other run side by side, one process each (:mod:`detoxrl.demo.parallel`).
Imports the Python API of ``config``, ``runs``, ``data``, ``evaluation``, ``rl`` and
``supervised``; never ``commands`` or ``cli``.
"""
