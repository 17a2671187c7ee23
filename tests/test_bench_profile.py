"""bench/ppo_profile.py's table: samples split by trainer phase and part of the network."""

from __future__ import annotations

from helpers import load_bench


def test_table_attributes_samples_by_phase_and_call_site(tmp_path):
    model = tmp_path / "model.py"
    model.write_text("def forward(self):\n"
                     "    enc = self.encoder(x)\n"
                     "    dec = self.decoder(y)\n"
                     "    return self.lm_head(dec)\n")
    top = "<module> (ppo_profile.py:1);measured_step (ppo_profile.py:2)"

    def stack(phase: str, *frames: str) -> str:
        return ";".join([top, f"Learner.{phase} (detoxrl/rl/learner.py:9)", *frames])

    raw = "\n".join([
        stack("rollout", f"forward ({model}:2)", "linear (torch/nn/functional.py:1)") + " 30",
        stack("rollout", f"forward ({model}:3)") + " 10",
        stack("forward_old_and_ref", f"forward ({model}:4)") + " 10",
        stack("ppo_epochs", "backward (torch/_tensor.py:5)", f"forward ({model}:2)") + " 20",
        stack("score", "ClassifierReward.__call__ (detoxrl/models/reward.py:7)") + " 30",
        f"<module> (ppo_profile.py:1);setup (ppo_modes.py:3);forward ({model}:2) 99",
    ])
    path = tmp_path / "raw.txt"
    path.write_text(raw + "\n")
    lines = load_bench("ppo_profile").table(path).splitlines()
    assert lines[0].startswith("100 samples")       # the setup sample is not in the step
    rows = {line.split(" | ")[0].strip("| "): line for line in lines[4:]}
    assert rows["rollout"] == "| rollout | 30.0 | 10.0 | 0.0 | 0.0 | 0.0 | 0.0 | 40.0 |"
    assert rows["forward"] == "| forward | 0.0 | 0.0 | 10.0 | 0.0 | 0.0 | 0.0 | 10.0 |"
    assert rows["optimize"] == "| optimize | 0.0 | 0.0 | 0.0 | 20.0 | 0.0 | 0.0 | 20.0 |"
    assert rows["score"] == "| score | 0.0 | 0.0 | 0.0 | 0.0 | 30.0 | 0.0 | 30.0 |"
