"""``detoxrl sft``: LoRA and full fine-tuning of tiny T5 and GPT-2 through the CLI, the
outputs loaded by Policy and continued by ``detoxrl train``, the mini corpus's held-out rule
and the bad-input errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from detoxrl import cli
from detoxrl.config import LoraSettings, ModelConfig, load_config
from detoxrl.data.lm_corpus import CorpusSettings, build_corpus
from detoxrl.data.prompts import is_held_out
from detoxrl.models.policy import Policy

ROOT = Path(__file__).resolve().parents[1]


def _pairs_config(tmp_path: Path, base: Path, dialogsum: Path, **training) -> Path:
    cfg = {"model": {"name_or_path": str(base)}, "method": "lora",
           "lora": {"r": 4, "alpha": 8},
           "data": {"kind": "pairs", "prompts": {"path": str(dialogsum), "test_fraction": 0.1,
                                                 "max_prompt_tokens": 128},
                    "max_target_tokens": 24, "rouge_examples": 4, "rouge_max_new_tokens": 8},
           "training": {"learning_rate": 1e-3, "max_steps": 4, "batch_size": 8,
                        "logging_steps": 2, **training}}
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("base", ["tiny_t5_path", "tiny_gpt2_path"])
def test_lora_sft_writes_an_adapter_that_policy_loads(tmp_path, request, tiny_dialogsum, base):
    base_path = request.getfixturevalue(base)
    out = tmp_path / "adapter"
    code = cli.main(["sft", "--config", str(_pairs_config(tmp_path, base_path, tiny_dialogsum)),
                     "--output-dir", str(out), "--quiet"])
    assert code == 0
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json",
                 "metrics.json", "config.yaml", "run_info.json"):
        assert (out / name).is_file(), name
    assert not list(out.rglob("*.bin")) and not (out / ".trainer").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval"]["perplexity"] == pytest.approx(
        torch.tensor(metrics["eval"]["loss"]).exp().item(), rel=1e-5)
    assert {"rouge1", "rouge2", "rougeL"} <= set(metrics["eval"])
    policy = Policy.from_pretrained(ModelConfig(name_or_path=str(base_path), adapter=str(out)))
    assert policy.has_reference_adapter
    trained = dict(policy.model.named_parameters())
    lora_b = [v for k, v in trained.items() if "lora_B" in k and ".default." in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b), "SFT moved the adapter"


@pytest.mark.parametrize("base", ["tiny_gpt2_path", "tiny_t5_path"])
def test_sft_adapter_continued_by_train_has_zero_kl_at_first(tmp_path, request, base,
                                                            tiny_dialogsum,
                                                            tiny_classifier_path):
    from detoxrl.config import TrainConfig
    from detoxrl.rl.detox_trainer import train

    base_path = request.getfixturevalue(base)
    adapter = tmp_path / "adapter"
    assert cli.main(["sft", "--config", str(_pairs_config(tmp_path, base_path,
                                                          tiny_dialogsum)),
                     "--output-dir", str(adapter), "--quiet"]) == 0
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [
        "--model.name_or_path", str(base_path), "--model.adapter", str(adapter),
        "--reward.model", str(tiny_classifier_path), "--data.path", str(tiny_dialogsum),
        "--steps", "1", "--save_every", "0", "--output_dir", str(tmp_path / "rl"),
        "--generation.max_new_tokens_draw", "8"], cls=TrainConfig)
    # With the old log-probs from a separate forward (not from the sampler), the policy and
    # the reference run the same computation on the same batch.
    cfg.ppo.logprobs_from_rollout = False
    result = train(cfg, quiet=True)
    # The rollout of step 1 comes from the SFT adapter and the reference is the same adapter.
    kl = result.metrics[0]["objective/kl"]
    if base == "tiny_gpt2_path":
        assert kl == 0.0
    else:
        # The trainer's old log-probs reuse the encoder output computed during generation (a
        # different batch shape), the reference recomputes it: float rounding only.
        assert abs(kl) < 1e-5
        policy = Policy.from_pretrained(ModelConfig(name_or_path=str(base_path),
                                                    adapter=str(adapter)))
        ids = policy.tokenizer(["#Person1#: hi there"], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = policy.model(input_ids=ids, decoder_input_ids=ids[:, :4]).logits
            with policy.reference():
                ref = policy.model(input_ids=ids, decoder_input_ids=ids[:, :4]).logits
        assert torch.equal(logits, ref)


def _text_file(path: Path, n: int = 120) -> Path:
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "then", "ran", "away", "fast"]
    rows = [" ".join(words[(i + j) % len(words)] for j in range(6 + i % 5)) for i in range(n)]
    path.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("architecture", ["gpt2", "t5"])
def test_full_sft_from_random_weights_writes_a_model_folder(tmp_path, architecture):
    out = tmp_path / "lm"
    args = ["sft", "--model.architecture", architecture, "--method", "full",
            "--model.vocab_size", "300", "--model.hidden_size", "32", "--model.num_layers", "1",
            "--model.num_heads", "2", "--model.intermediate_size", "64",
            "--model.max_positions", "64", "--data.kind", "text",
            "--data.text_path", str(_text_file(tmp_path / "t.jsonl")),
            "--data.eval_fraction", "0.1", "--training.epochs", "8",
            "--training.learning_rate", "3e-3",
            "--training.batch_size", "16", "--output-dir", str(out), "--quiet"]
    assert cli.main(args) == 0
    for name in ("model.safetensors", "config.json", "tokenizer.json", "metrics.json"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    # Far below a uniform guess over the vocabulary (300 tokens): it learned the text.
    assert metrics["eval"]["perplexity"] < 60
    policy = Policy.from_pretrained(ModelConfig(name_or_path=str(out)), LoraSettings(r=2))
    model = policy.model.get_base_model()
    if architecture == "t5":  # the untied head survives the save/load round trip
        assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()
        assert policy.tokenizer("a cat")["input_ids"][-1] == policy.tokenizer.eos_token_id


def _fake_data_dir(root: Path) -> tuple[Path, list[str]]:
    """RTP files plus one row of every other corpus source, in ../shared/data's layout."""
    prompts = [f"Prompt number {i} says" for i in range(60)]
    for name in ("rtp/nontoxic.jsonl", "rtp/toxic.jsonl"):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"prompt": {"text": p}, "continuation": {
            "text": f" continuation {name[4:8]} {i}"}}) + "\n" for i, p in enumerate(prompts)))
    (root / "dialogsum").mkdir()
    (root / "dialogsum" / "train.jsonl").write_text(json.dumps({
        "dialogue": "#P1#: hi", "summary": "#Person1# greets #Person2#."}) + "\n")
    hs = root / "hate-speech"
    for sub in ("davidson", "tweeteval-hate", "dynabench"):
        (hs / sub).mkdir(parents=True)
    (hs / "davidson" / "labeled_data.csv").write_text("class,tweet\n1,rude tweet\n")
    (hs / "tweeteval-hate" / "train_text.txt").write_text("some tweet\n")
    (hs / "dynabench" / "Train.csv").write_text("a dynabench text\n")
    return root, prompts


def test_corpus_keeps_every_held_out_rtp_record_out(tmp_path):
    root, prompts = _fake_data_dir(tmp_path)
    held = [p for p in prompts if is_held_out(p)]
    assert 0 < len(held) < len(prompts)
    rows = build_corpus(root, CorpusSettings(rtp_toxic=-1, dialogsum=1, davidson=1,
                                             tweeteval=1, dynabench=1))
    rtp = [r for r in rows if r["source"] == "rtp"]
    assert len(rtp) == 2 * (len(prompts) - len(held))
    assert {r["source"] for r in rows} == {"rtp", "dialogsum", "davidson", "tweeteval",
                                           "dynabench"}
    text = "\n".join(r["text"] for r in rows)
    assert not [p for p in held if p + " " in text]
    assert all(r["text"].startswith(r["prefix"]) for r in rtp)


def test_corpus_summaries_read_as_prose(tmp_path):
    root, _ = _fake_data_dir(tmp_path)
    rows = build_corpus(root, CorpusSettings(rtp_nontoxic=0, rtp_toxic=0, dialogsum=0,
                                             dialogsum_summaries=1, davidson=0, tweeteval=0,
                                             dynabench=0))
    assert [r["source"] for r in rows] == ["dialogsum_summaries"]
    first, verb, second = rows[0]["text"].split(" ", 2)
    assert verb == "greets" and second.endswith(".") and "#" not in rows[0]["text"]
    assert first != second[:-1] and first.istitle() and second[:-1].istitle()


def test_real_corpus_holds_no_evaluation_prompt(shared_data):
    rows = build_corpus(shared_data, CorpusSettings(rtp_toxic=-1, dialogsum=200, davidson=200,
                                                    tweeteval=200, dynabench=200))
    text = "\n".join(r["text"] for r in rows)
    held = []
    for name in ("nontoxic", "toxic"):
        with (shared_data / "rtp" / f"{name}.jsonl").open() as fh:
            for line in fh:
                record = json.loads(line)
                if is_held_out(record["prompt"]["text"]):
                    held.append(record)
    assert len(held) > 300
    assert not [r for r in held if r["prompt"]["text"] + r["continuation"]["text"] in text]
    assert not [r for r in held if r["continuation"]["text"].strip() in text]


@pytest.mark.parametrize("args, words", [
    (["--model.architecture", "gpt2", "--model.name_or_path", "null"],
     ["method: lora", "method: full"]),
    (["--data.kind", "text", "--data.text_path", "nope.jsonl"], ["nope.jsonl", "data_dir"]),
    (["--data.prompts.text_column", "speech"], ["speech", "dialogue"]),
])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, capfd, tiny_t5_path, tiny_dialogsum,
                                              args, words):
    out = tmp_path / "out"
    code = cli.main(["sft", "--config", str(_pairs_config(tmp_path, tiny_t5_path,
                                                           tiny_dialogsum)),
                     "--output-dir", str(out), "--quiet", *args])
    err = capfd.readouterr().err
    assert code == 2 and "Traceback" not in err
    for word in words:
        assert word in err, (word, err)
    assert not out.exists()


def test_tokenizer_that_does_not_fit_the_model(tmp_path, capfd, tiny_gpt2_path,
                                               tiny_dialogsum):
    from detoxrl.models import tiny

    big = tiny.train_tokenizer([f"word{i} other{i * 7}" for i in range(3000)], 2000)
    big.save_pretrained(tmp_path / "big")
    code = cli.main(["sft", "--config", str(_pairs_config(tmp_path, tiny_gpt2_path,
                                                           tiny_dialogsum)),
                     "--model.tokenizer", str(tmp_path / "big"),
                     "--output-dir", str(tmp_path / "out"), "--quiet"])
    assert code == 2 and "do not belong together" in capfd.readouterr().err
    assert not (tmp_path / "out").exists()
