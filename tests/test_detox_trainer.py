"""DetoxTrainer from loaded objects, callbacks, the model card, peft loading, generate."""

from __future__ import annotations

import json
import time

import pytest
import torch
import yaml
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, TrainerCallback

from detoxrl import DetoxTrainer, TrainConfig, cli
from detoxrl.config import PPOConfig, SamplingConfig

TOPICS = ["the meeting", "dinner", "the train", "the bank", "my car", "the party"]


def overlap(prompts, completions, references, **kwargs):
    """Share of a completion's words that appear in its reference summary (a dataset column)."""
    overlap.seen = references
    return [sum(w in ref.split() for w in c.split()) / max(len(c.split()), 1)
            for c, ref in zip(completions, references, strict=True)]


class StopAfter(TrainerCallback):
    """Stops training after ``n`` steps and asks for an evaluation after the first."""

    def __init__(self, n):
        self.n, self.step_metrics, self.evaluations = n, [], []

    def on_step_end(self, args, state, control, metrics=None, **kwargs):
        self.step_metrics.append((state.global_step, metrics))
        control.should_evaluate = state.global_step == 1
        control.should_training_stop = state.global_step >= self.n
        return control

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.evaluations.append(metrics)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_t5_path, tiny_classifier_path):
    from datasets import Dataset
    from peft import LoraConfig

    out = tmp_path_factory.mktemp("api") / "run"
    rows = [{"prompt": f"#Person1#: Shall we talk about {t}?\n#Person2#: Sure.\nSummary:",
             "references": f"They talk about {t}."} for t in TOPICS * 2]
    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_t5_path)
    tokenizer = AutoTokenizer.from_pretrained(tiny_t5_path)
    args = TrainConfig(steps=5, output_dir=str(out), seed=3,
                       ppo=PPOConfig(batch_size=4, mini_batch_size=2, learning_rate=1e-3),
                       generation=SamplingConfig(min_new_tokens_draw=3, max_new_tokens_draw=6,
                                                 min_length=1))
    stop = StopAfter(2)
    trainer = DetoxTrainer(model=model, processing_class=tokenizer, args=args,
                           train_dataset=Dataset.from_list(rows),
                           eval_dataset=Dataset.from_list(rows[:4]),
                           peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"]),
                           reward_funcs=[overlap, str(tiny_classifier_path)],
                           reward_weights=[1.0, 0.5], callbacks=[stop], quiet=True)
    metrics = trainer.train()
    return trainer, metrics, stop, out


def test_a_trainer_from_loaded_objects_trains_and_logs_each_reward(trained):
    _, metrics, stop, out = trained
    assert [m["step"] for m in metrics] == [1, 2]  # the callback stopped a 5-step run
    assert [s for s, _ in stop.step_metrics] == [1, 2]
    assert stop.step_metrics[0][1] is metrics[0]   # on_step_end receives the metrics
    for m in metrics:
        assert {"env/reward/overlap", "env/reward/roberta-hate"} <= set(m)
        total = m["env/reward/overlap"] + 0.5 * m["env/reward/roberta-hate"]
        assert m["env/reward_mean"] == pytest.approx(total, abs=1e-5)
    assert all(r.startswith("They talk about") for r in overlap.seen)  # the column arrived
    assert len(stop.evaluations) == 1 and "eval/reward/overlap" in stop.evaluations[0]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2]
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["lora"]["r"], saved["lora"]["alpha"]) == (4, 8)
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["task_type"] == "SEQ_2_SEQ_LM"
    info = json.loads((out / "run_info.json").read_text())
    assert [r["name"] for r in info["rewards"]] == ["overlap", "roberta-hate"]


def test_the_run_folder_readme_is_a_model_card(trained):
    _, metrics, _, out = trained
    card = (out / "README.md").read_text()
    assert card.startswith("---\nbase_model:") and "library_name: peft" in card
    for text in ("## Reward", "`env/reward/overlap` | 1.0", "## Algorithm", "PPO",
                 "## Final training metrics", "At step 2", "Not evaluated yet",
                 "AutoPeftModelForSeq2SeqLM", "learning_rate: 0.001"):
        assert text in card, text
    assert f"{metrics[-1]['objective/kl']:.4f}" in card
    # Once an evaluation summary exists, the card shows its table.
    (out / "eval").mkdir()
    boot = {"ci_low": -0.2, "ci_high": -0.1, "verdict": "improved"}
    (out / "eval" / "summary.json").write_text(json.dumps({"n": 50, "metrics": {"toxicity": {
        "before": {"mean": 0.5}, "after": {"mean": 0.35}, "bootstrap": {"mean": boot}}}}))
    from detoxrl import write_model_card

    card = write_model_card(out).read_text()
    assert "| toxicity (mean) | 0.5000 | 0.3500 | -0.1500 | [-0.2000, -0.1000] | improved |" \
        in card
    (out / "eval" / "summary.json").unlink()
    (out / "eval").rmdir()


def test_peft_alone_loads_the_run_folder(trained):
    from peft import AutoPeftModelForSeq2SeqLM

    trainer, _, _, out = trained
    merged = AutoPeftModelForSeq2SeqLM.from_pretrained(out).merge_and_unload().eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    enc = tokenizer(["#Person1#: Shall we talk about dinner?"], return_tensors="pt")
    decoder = torch.tensor([[merged.config.decoder_start_token_id, 5, 6, 7]])
    with torch.no_grad():
        logits = merged(**enc, decoder_input_ids=decoder).logits
        ours = trainer.model(**enc, decoder_input_ids=decoder).logits
        with trainer.model.disable_adapter():
            base = trainer.model(**enc, decoder_input_ids=decoder).logits
    torch.testing.assert_close(logits, ours, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(logits, base, atol=1e-5)  # the adapter is really in it


def test_generate_answers_with_the_adapter_and_the_reference(trained, tiny_t5_path, capsys):
    from peft import AutoPeftModelForSeq2SeqLM

    _, _, _, out = trained
    prompt = "#Person1#: Shall we talk about the bank?"
    assert cli.main(["generate", str(out), prompt, "--with", "both", "--greedy",
                     "--max-new-tokens", "6", "--json"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    tok = AutoTokenizer.from_pretrained(out)
    enc = tok([prompt], return_tensors="pt")
    greedy = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": tok.pad_token_id,
              "eos_token_id": tok.eos_token_id}
    trained_model = AutoPeftModelForSeq2SeqLM.from_pretrained(out).merge_and_unload()
    base = AutoModelForSeq2SeqLM.from_pretrained(tiny_t5_path)
    for name, model in (("trained", trained_model), ("reference", base)):
        ids = model.eval().generate(**enc, **greedy)
        assert row[name] == tok.decode(ids[0], skip_special_tokens=True), name
    assert row["prompt"] == prompt
    assert cli.main(["generate", str(out / "nope"), "x"]) == 2
    assert "not a finished run folder" in capsys.readouterr().err


def test_offline_every_missing_resource_is_reported_at_once(tmp_path, capfd):
    start = time.perf_counter()
    code = cli.main(["train", "--output-dir", str(tmp_path / "r"),
                     "--model.name_or_path", "detoxrl-test/no-such-model",
                     "--model.adapter", "./no/such/adapter",
                     "--reward.model", "detoxrl-test/no-such-classifier",
                     "--data.path", "detoxrl-test/no-such-data"])
    elapsed = time.perf_counter() - start
    err = capfd.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "4 resource(s)" in err, err
    for name in ("no-such-model", "./no/such/adapter", "no-such-classifier", "no-such-data",
                 "--repo-type dataset"):
        assert name in err, name
    assert elapsed < 10, elapsed
    assert not (tmp_path / "r").exists()


def test_trackers_must_be_installed_and_flags_not_abbreviated(tmp_path, capfd):
    import accelerate.utils as au
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    absent = [n for n in LOGGER_TYPE_TO_CLASS if not getattr(au, f"is_{n}_available")()]
    if absent:
        name = "tensorboard" if "tensorboard" in absent else absent[0]
        code = cli.main(["train", "--config", "configs/tiny.yaml", "--output-dir",
                         str(tmp_path / "r"), "--log_with", f"[{name}]"])
        err = capfd.readouterr().err
        assert code == 2 and "not installed" in err and name in err
        if name == "tensorboard":
            assert "detoxrl[tracking]" in err
    code = cli.main(["train", "--config", "configs/tiny.yaml", "--output-dir",
                     str(tmp_path / "r"), "--overwrit"])
    assert code == 2 and "overwrit" in capfd.readouterr().err
    assert not (tmp_path / "r").exists()
