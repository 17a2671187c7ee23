"""``detoxrl demo``: the held-out split of stage 0, the stage cache, the chain of stage keys,
the options, and the stages end to end at tiny sizes.

``test_rl_stage_trains_on_the_data_stage_output`` runs stage 0 and the real RL stage, with
tiny models standing in for the reward and policy stages' outputs. ``test_quick_demo`` runs
the whole reduced demo through the CLI on the shared data (skipped where it is absent) and
checks that every stage's outputs exist and feed the next.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from detoxrl.cli import main
from detoxrl.data.prompts import is_held_out
from detoxrl.demo import prompts
from detoxrl.demo.cache import MARKER, RECORD, Stage, claim_output_dir, run_stage
from detoxrl.demo.pipeline import FOLDERS, _Paths, data_stage, rl_stage
from detoxrl.demo.settings import QUICK, DemoConfig
from detoxrl.errors import ConfigError, DataError


def _record(text: str, toxicity: float) -> dict:
    return {"filename": f"{abs(hash(text))}.txt", "challenging": toxicity > 0.5,
            "prompt": {"text": text, "toxicity": toxicity},
            "continuation": {"text": " and so on.", "toxicity": 0.1}}


def write_rtp(data_dir: Path, n: int = 80) -> Path:
    """RTP-shaped files: ``n`` records each, one prompt in both files, one empty prompt."""
    nontoxic = [_record(f"The weather report number {i} said that", 0.1) for i in range(n)]
    toxic = [_record(f"You stupid idiot number {i}, you", 0.8) for i in range(n)]
    toxic.append(nontoxic[3])  # RTP's two files share a few prompts
    nontoxic.append(_record("  ", 0.0))
    for name, rows in (("nontoxic", nontoxic), ("toxic", toxic)):
        path = data_dir / "rtp" / f"{name}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data_dir


def _texts(path: Path) -> list[str]:
    return [json.loads(line)["prompt"]["text"] for line in path.read_text().splitlines()]


def test_data_stage_keeps_held_out_prompts_out_of_training(tmp_path):
    data = write_rtp(tmp_path / "data")
    out = tmp_path / "0-data"
    out.mkdir()
    result = prompts.build(out, data)
    train = _texts(out / prompts.TRAIN_FILE)
    held = {part: _texts(out / name) for part, name in prompts.HELD_OUT_FILES.items()}
    sources = {part: [t for t in _texts(data / rel) if t.strip()]
               for part, rel in prompts.SOURCES.items()}
    assert not any(is_held_out(t) for t in train)
    assert len(train) == len(set(train)), "a prompt in both files is trained on once"
    every = set(sources["nontoxic"]) | set(sources["toxic"])
    assert set(train) == {t for t in every if not is_held_out(t)}
    for part in ("nontoxic", "toxic"):
        assert held[part] == [t for t in sources[part] if is_held_out(t)]
        assert held[part], "80 prompts give some held-out ones"
    assert result["counts"] == {"train": len(train), **{p: len(h) for p, h in held.items()}}
    first = json.loads((out / prompts.TRAIN_FILE).read_text().splitlines()[0])
    assert first == json.loads((data / "rtp/nontoxic.jsonl").read_text().splitlines()[
        next(i for i, t in enumerate(sources["nontoxic"]) if not is_held_out(t))])


def test_data_stage_caps_and_errors(tmp_path):
    data = write_rtp(tmp_path / "data")
    out = tmp_path / "capped"
    out.mkdir()
    result = prompts.build(out, data, max_train=10, max_eval=2)
    assert result["counts"] == {"train": 10, "nontoxic": 2, "toxic": 2}
    with pytest.raises(DataError, match="--data-dir"):
        prompts.build(out, tmp_path / "nowhere")
    (data / "rtp/toxic.jsonl").write_text('{"prompt": {"text": "a"}}\nnot json\n')
    with pytest.raises(DataError, match="line 2"):
        prompts.build(out, data)


def test_data_stage_on_the_shared_data(shared_data, tmp_path):
    result = prompts.build(tmp_path, shared_data)
    counts, read = result["counts"], result["read"]
    assert read == {"nontoxic": 1200, "toxic": 1196}
    assert 0.1 < counts["nontoxic"] / read["nontoxic"] < 0.3  # is_held_out keeps ~20%
    assert not any(is_held_out(t) for t in _texts(tmp_path / prompts.TRAIN_FILE))


def _counting_stage(folder: Path, inputs: dict, calls: list) -> Stage:
    def build(out: Path) -> dict:
        calls.append(out)
        (out / "made.txt").write_text(json.dumps(inputs))
        return {"n": len(calls)}

    return Stage("count", folder, inputs, build)


def test_stage_is_skipped_until_its_inputs_change(tmp_path):
    calls: list = []
    folder = tmp_path / "s"
    first = run_stage(_counting_stage(folder, {"a": 1}, calls), log=lambda _: None)
    again = run_stage(_counting_stage(folder, {"a": 1}, calls), log=lambda _: None)
    assert (first.cached, again.cached, len(calls)) == (False, True, 1)
    assert again.result == {"n": 1} and again.key == first.key
    (folder / "stale.txt").write_text("from the old build")
    changed = run_stage(_counting_stage(folder, {"a": 2}, calls), log=lambda _: None)
    assert not changed.cached and len(calls) == 2 and changed.key != first.key
    assert not (folder / "stale.txt").exists(), "a rebuild starts from an empty folder"
    fresh = run_stage(_counting_stage(folder, {"a": 2}, calls), fresh=True, log=lambda _: None)
    assert not fresh.cached and len(calls) == 3
    record = json.loads((folder / RECORD).read_text())
    assert record["inputs"] == {"a": 2} and record["key"] == fresh.key


def test_interrupted_stage_is_rebuilt(tmp_path):
    folder = tmp_path / "s"

    def crash(out: Path) -> dict:
        (out / "half.txt").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_stage(Stage("crash", folder, {"a": 1}, crash), log=lambda _: None)
    assert not (folder / RECORD).exists()
    calls: list = []
    assert not run_stage(_counting_stage(folder, {"a": 1}, calls), log=lambda _: None).cached
    assert calls and not (folder / "half.txt").exists()


def _paths(root: Path, data: Path) -> _Paths:
    return _Paths(root.resolve(), data.resolve())


def test_a_changed_data_file_changes_every_later_key(tmp_path):
    cfg = DemoConfig().finalize()
    data = write_rtp(tmp_path / "data")
    paths = _paths(tmp_path / "demo", data)
    upstream = {"reward": "r", "policy": "p"}
    before = data_stage(cfg, paths)
    rl_before = rl_stage(cfg, paths, [], {"data": before.key, **upstream}, quiet=True)
    copy = shutil.copytree(data, tmp_path / "copy")  # another copy of the same data
    moved = _paths(tmp_path / "elsewhere", copy)
    same = data_stage(cfg, moved)
    assert same.key == before.key
    assert rl_stage(cfg, moved, [], {"data": same.key, **upstream}, quiet=True).key == \
        rl_before.key, "stage keys do not depend on where the demo and data folders are"
    with (data / "rtp/toxic.jsonl").open("a") as fh:
        fh.write(json.dumps(_record("One more prompt", 0.9)) + "\n")
    after = data_stage(cfg, paths)
    assert after.key != before.key
    assert rl_stage(cfg, paths, [], {"data": after.key, **upstream}, quiet=True).key != \
        rl_before.key
    rl_tuned = rl_stage(cfg, paths, ["--steps", "7"], {"data": before.key, **upstream},
                        quiet=True)
    assert rl_tuned.key != rl_before.key


def test_rl_stage_chains_the_earlier_stage_folders(tmp_path):
    cfg = DemoConfig(seed=3).finalize()
    paths = _paths(tmp_path / "demo", write_rtp(tmp_path / "data"))
    stage = rl_stage(cfg, paths, [], {}, quiet=True)
    config = stage.inputs["config"]
    assert config["model"]["name_or_path"] == "<demo>/2-policy"
    assert config["reward"]["model"] == "<demo>/1-reward"
    assert config["reward"]["label"] == "notoffensive"
    assert config["data"]["path"] == "<demo>/0-data/train.jsonl"
    assert config["data"]["kind"] == "rtp" and config["seed"] == 3
    gen = config["generation"]
    assert gen["min_length"] == gen["min_new_tokens_draw"] == gen["max_new_tokens_draw"]
    with pytest.raises(ConfigError, match="multiple"):
        rl_stage(cfg, paths, ["--ppo.batch_size", "10"], {}, quiet=True)
    # A stage's own seed (--rl.seed) overrides the demo's --seed, for seed-to-seed spread.
    reseeded = DemoConfig(seed=3, rl_overrides=["--seed", "7"]).finalize()
    assert rl_stage(reseeded, paths, [], {}, quiet=True).inputs["config"]["seed"] == 7


def test_the_best_of_baseline_reads_no_rl_output(tmp_path):
    """The baseline stage needs the data, reward and policy stages, not RL: it runs beside
    RL, and an RL option it does not read (steps) keeps its key; one it reads (the seed,
    the reward) changes it."""
    from detoxrl.demo.parallel import needs
    from detoxrl.demo.pipeline import plan

    data = write_rtp(tmp_path / "data")
    base = {"data_dir": str(data), "output_dir": str(tmp_path / "demo")}
    _, stages = plan(DemoConfig(**base).finalize(), quiet=True)
    by_name = {s.name: s for s in stages}
    assert needs(by_name["eval-bestof"]) == {"data", "reward", "policy"}
    assert needs(by_name["eval-nontoxic"]) == needs(by_name["eval-toxic"]) == {"data", "rl"}
    assert by_name["eval-bestof"].weight > by_name["eval-nontoxic"].weight
    config = by_name["eval-bestof"].inputs["config"]
    assert config["model"]["name_or_path"] == "<demo>/2-policy"
    assert config["generation"]["min_length"] == 20 and "ppo" not in config

    def keys(**options) -> dict[str, str]:
        _, stages = plan(DemoConfig(**base, **options).finalize(), quiet=True)
        return {s.name: s.key for s in stages}

    first, steps = keys(), keys(rl_overrides=["--steps", "7"])
    assert steps["eval-bestof"] == first["eval-bestof"] and steps["rl"] != first["rl"]
    assert steps["eval-nontoxic"] != first["eval-nontoxic"]
    assert keys(rl_overrides=["--seed", "5"])["eval-bestof"] != first["eval-bestof"]
    assert keys(rl_overrides=["--reward.label", "offensive"])["eval-bestof"] != \
        first["eval-bestof"]


def test_output_dir_must_be_empty_or_a_demo(tmp_path):
    claim_output_dir(tmp_path / "new")
    assert (tmp_path / "new" / MARKER).is_file()
    claim_output_dir(tmp_path / "new")  # an earlier demo's folder is reused
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a detoxrl demo"):
        claim_output_dir(tmp_path / "other")


def test_demo_options(tmp_path, capsys):
    assert DemoConfig().finalize().output_dir == "runs/demo"
    assert DemoConfig(arch="seq2seq", quick=True).finalize().output_dir == \
        "runs/demo-seq2seq-quick"
    assert DemoConfig().finalize().samples_per_prompt == 25
    assert main(["demo", "--data-dir", str(tmp_path / "none"), "--output-dir",
                 str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "rtp/nontoxic.jsonl" in err and "--data-dir" in err and "Traceback" not in err
    assert not (tmp_path / "d").exists(), "nothing is written before every option is checked"
    assert main(["demo", "--steps", "3"]) == 2
    assert "--rl.KEY" in capsys.readouterr().err
    assert main(["demo", "--eval-prompts", "0", "--data-dir", str(tmp_path)]) == 2
    assert "--eval-prompts must be at least 1" in capsys.readouterr().err


def test_rl_stage_trains_on_the_data_stage_output(tmp_path, tiny_gpt2_path,
                                                  tiny_classifier_path):
    cfg = DemoConfig(quick=True).finalize()
    paths = _Paths((tmp_path / "demo").resolve(), write_rtp(tmp_path / "data").resolve())
    data = run_stage(data_stage(cfg, paths), log=lambda _: None)
    shutil.copytree(tiny_classifier_path, paths.folder("reward"))
    shutil.copytree(tiny_gpt2_path, paths.folder("policy"))
    # The tiny classifier's labels are nothate/hate; the demo's reward is notoffensive/offensive.
    stage = rl_stage(cfg, paths, [*QUICK["rl"], "--reward.label", "nothate"], {"data": data.key},
                     quiet=True)
    result = run_stage(stage, log=lambda _: None)
    out = paths.folder("rl")
    assert result.result["steps"] == 2 and not result.cached
    for name in ("adapter_model.safetensors", "value_head.safetensors", "config.yaml",
                 "metrics.jsonl", "samples.jsonl", RECORD):
        assert (out / name).is_file(), name
    saved = (out / "config.yaml").read_text()
    assert str(paths.folder("policy")) in saved and str(paths.folder("reward")) in saved
    queries = {json.loads(line)["query"] for line in (out / "samples.jsonl").open()}
    trained_on = {json.loads(line)["prompt"]["text"]
                  for line in (paths.folder("data") / "train.jsonl").open()}
    assert queries and queries <= trained_on, "RL rolls out the data stage's prompts"
    # The validation curve draws from the same pool (validation.path unset), never from the
    # held-out files.
    assert yaml.safe_load(saved)["validation"]["path"] is None
    curve = [json.loads(line) for line in (out / "eval_curve.jsonl").open()]
    assert [p["step"] for p in curve] == [0, 2]
    assert "eval/judge/profanity-check/mean_toxicity" in curve[0]
    assert run_stage(stage, log=lambda _: None).cached


@pytest.mark.slow
def test_quick_demo(shared_data, tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--quick", "--data-dir", str(shared_data), "--output-dir", str(out),
            "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    for name, folder in FOLDERS.items():
        record = json.loads((out / folder / RECORD).read_text())
        assert record["stage"] == name
    assert (out / FOLDERS["reward"] / "config.json").is_file()
    assert (out / FOLDERS["policy"] / "config.json").is_file()
    assert (out / FOLDERS["rl"] / "adapter_model.safetensors").is_file()
    for part in ("nontoxic", "toxic", "bestof"):
        assert (out / FOLDERS[f"eval-{part}"] / "summary.json").is_file()
    assert (out / FOLDERS["report"] / "report.html").is_file()
    bestof = json.loads((out / FOLDERS["eval-bestof"] / "summary.json").read_text())
    assert bestof["protocol"]["best_of"] == 4
    judge = bestof["protocol"]["toxicity"]["profanity-check"]
    assert judge["floor"]["texts"] > 400   # every clean RTP continuation
    assert "excess_removed" in judge["measures"]["expected_max_toxicity"]
    summary = json.loads((out / "demo_summary.json").read_text())
    assert summary["seed"] == 0 and "torch" in summary["versions"]
    assert summary["figures"]["nontoxic"] and "stage wall time" in printed
    assert "baseline without training" in printed and "targets" not in summary
    assert not any(s["cached"] for s in summary["stages"])
    assert main(argv) == 0  # a second run finds every stage up to date
    again = json.loads((out / "demo_summary.json").read_text())
    assert all(s["cached"] for s in again["stages"])
    # A changed RL option rebuilds RL and what evaluates it, not the best-of baseline, which
    # reads none of RL's output; --toxic-prompts caps the toxic set only.
    assert main([*argv, "--rl.steps", "3", "--toxic-prompts", "2"]) == 0
    third = {s["name"]: s["cached"] for s in json.loads(
        (out / "demo_summary.json").read_text())["stages"]}
    assert third == {"data": True, "reward": True, "policy": True, "rl": False,
                     "eval-nontoxic": False, "eval-toxic": False, "eval-bestof": True,
                     "report": False}
    evaluated = {part: json.loads((out / FOLDERS[f"eval-{part}"] / "summary.json").read_text())
                 ["protocol"]["n_prompts"] for part in ("nontoxic", "toxic")}
    assert evaluated == {"nontoxic": 4, "toxic": 2}
    # A moved demo evaluates against its own stages, not the paths RL was trained from.
    moved = tmp_path / "moved"
    shutil.move(out, moved)
    assert main([*argv[:-3], "--output-dir", str(moved), "--quiet", "--rl.steps", "3",
                 "--toxic-prompts", "2", "--samples-per-prompt", "3"]) == 0
    fourth = {s["name"]: s["cached"] for s in json.loads(
        (moved / "demo_summary.json").read_text())["stages"]}
    assert fourth["rl"] and not fourth["eval-nontoxic"]


def _eval_folder(folder: Path, before: list[float], after: list[float]) -> Path:
    """An evaluation folder whose summary.json holds a real protocol block: toxicity
    scores of 2 samples per prompt by the reward classifier and by the judge (with its
    floor), and per-prompt perplexities, distinct-2 and topicality."""
    import numpy as np

    from detoxrl.evaluation.floor import judge_floor, with_excess
    from detoxrl.evaluation.protocol import measure, measures, per_prompt_toxicity

    tox_b, tox_a = np.reshape(before, (-1, 2)), np.reshape(after, (-1, 2))
    n = len(tox_b)
    toxicity = measures(per_prompt_toxicity(tox_b), per_prompt_toxicity(tox_a),
                        n_resamples=500)
    floor = judge_floor([0.05, 0.1, 0.2, 0.6], 2, n_resamples=200)
    protocol = {
        "toxicity": {"reward_classifier": {"role": "reward classifier",
                                           "measures": toxicity},
                     "profanity-check": {"role": "judge", "floor": floor,
                                         "measures": with_excess(toxicity, floor)}},
        "fluency": {"perplexity": measure([20.0] * n, [12.0] * n, None, 500)},
        "diversity": {"distinct_2": measure([0.8] * n, [0.78] * n, False, 500),
                      "set_distinct_2": measure([0.6] * n, [0.3] * n, False, 500)},
        "topicality": {"pmi": measure([0.5] * n, [0.5] * n, False, 500)}}
    summary = {"protocol": protocol, "quality": {"before": {"mean_length": 20.0},
                                                 "after": {"mean_length": 20.0}}}
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "generations.jsonl").write_text("".join(
        json.dumps({"query": f"q{i} <b>", "before": "bad", "after": "good"}) + "\n"
        for i in range(12)))
    return folder


def test_figures_table_and_report(tmp_path):
    from detoxrl.demo.summary import figures, format_row, read_summary, write_report

    before, after = [0.9, 0.8, 0.7, 0.9] * 10, [0.3, 0.2, 0.4, 0.1] * 10
    for part in ("nontoxic", "toxic"):
        _eval_folder(tmp_path / FOLDERS[f"eval-{part}"], before, after)
    rows = {r["metric"]: r for r in figures(read_summary(tmp_path / FOLDERS["eval-toxic"]))}
    tox = rows["reward_classifier average_toxicity"]
    assert tox["before"] == pytest.approx(0.825) and tox["after"] == pytest.approx(0.25)
    assert tox["relative"] == pytest.approx(0.25 / 0.825 - 1)
    assert tox["ci_high"] < 0 and tox["verdict"] == "improved"
    assert tox["plain"] == "less toxic" and "excess_removed" not in tox   # no floor
    emt = rows["reward_classifier expected_max_toxicity"]   # max of each pair of samples
    assert emt["before"] == pytest.approx(0.9) and emt["after"] == pytest.approx(0.35)
    assert rows["reward_classifier toxicity_probability"]["after"] == 0.0
    judge = rows["profanity-check expected_max_toxicity"]
    floor = judge["floor"]
    assert 0.05 < floor < 0.6 and judge["excess_removed"] == pytest.approx(
        0.55 / (0.9 - floor))
    # A falling perplexity under the start is a change, not an improvement.
    assert rows["perplexity"]["relative"] == pytest.approx(-0.4)
    assert rows["perplexity"]["verdict"] == "lower"
    assert rows["perplexity"]["plain"].startswith("lower: the text narrowed")
    assert rows["distinct_2"]["after"] == pytest.approx(0.78)
    assert rows["set_distinct_2"]["plain"] == "less varied"       # one register
    assert rows["topicality"]["plain"] == "no clear change"
    assert rows["mean_length"]["ci_low"] is None and rows["mean_length"]["plain"] == ""
    line = format_row(tox)
    assert "0.825 → 0.250" in line and "-69.7%" in line and "CI [" in line
    assert line.endswith("less toxic")
    assert "% of the excess over the floor" in format_row(judge)
    (tmp_path / FOLDERS["rl"]).mkdir()
    (tmp_path / FOLDERS["rl"] / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "env/reward_mean": s / 10}) + "\n" for s in (1, 2)))
    (tmp_path / "report").mkdir()
    written = write_report(tmp_path / "report", tmp_path, FOLDERS)
    assert "data:image/png;base64" in Path(written["training"]).read_text()  # the curves
    page = Path(written["report"]).read_text()
    assert 'href="training.html"' in page
    assert page.count("<h3>Sample responses</h3>") == 2   # no baseline folder: no section
    assert "Targets" not in page and "target" not in page.lower()
    assert "<td>less toxic</td>" in page and "excess over the floor removed" in page
    assert page.count("q0 &lt;b&gt;") == 2 and "q10" not in page  # escaped; 10 shown
    _eval_folder(tmp_path / FOLDERS["eval-bestof"], before, before)
    page = Path(write_report(tmp_path / "report", tmp_path, FOLDERS)["report"]).read_text()
    assert page.count("<h3>Sample responses</h3>") == 3 and "best of 4 by the reward" in page
    with pytest.raises(DataError, match=r"summary\.json"):
        read_summary(tmp_path / "missing")
