"""The validation curve (``eval_every``): its metrics by hand, the points a run logs, resume,
the report's figure, ``DetoxTrainer.should_evaluate`` and the refused inputs."""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
from pathlib import Path

import pytest

from detoxrl import DetoxTrainer, cli
from detoxrl.config import load_config
from detoxrl.evaluation.curve import CURVE_FILE, curve_metrics, read_curve
from detoxrl.evaluation.curve_report import best_point
from detoxrl.evaluation.report import build_report

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
JUDGES = ("profanity-check", "test_curve:length_judge")
RUN = ["--steps", "3", "--save_every", "2", "--generation.max_new_tokens_draw", "10",
       "--validation.num_prompts", "4", "--validation.samples_per_prompt", "2",
       "--validation.judges", ",".join(JUDGES)]
EXPECTED_KEYS = {"eval/reward/mean", "eval/kl", "eval/sqrt_kl", "eval/distinct_2",
                 "eval/response_length",
                 *(f"eval/judge/{j}/{m}" for j in JUDGES
                   for m in ("mean_toxicity", "toxicity_probability"))}


def length_judge(texts):
    """A judge for the tests: longer responses count as more toxic."""
    return [min(len(t.split()) / 20, 1.0) for t in texts]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _training(rows: list[dict]) -> list[dict]:
    """Each step's training metrics: no timings, no validation points."""
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "tokens/", "eval/"))}
            for r in rows if r["step"] > 0]


def test_metrics_of_one_point_by_hand():
    rewards, kl = [1.0, 2.0, 3.0, 4.0], [0.5, 1.5, 2.0, 4.0]
    judge = [0.1, 0.6, 0.2, 0.3]                # prompt 0 has a sample >= 0.5, prompt 1 none
    responses = ["a b c", "a b d", "x y", "x y"]  # bigrams: 3 of 4 unique, then 1 of 2
    m = curve_metrics(rewards, {"j": judge}, kl, responses, k=2, lengths=[3, 3, 2, 2])
    assert m["eval/reward/mean"] == pytest.approx(2.5)
    assert m["eval/kl"] == pytest.approx(2.0)
    assert m["eval/sqrt_kl"] == pytest.approx(math.sqrt(2.0))
    assert m["eval/judge/j/mean_toxicity"] == pytest.approx(0.3)
    assert m["eval/judge/j/toxicity_probability"] == pytest.approx(0.5)
    assert m["eval/distinct_2"] == pytest.approx((3 / 4 + 1 / 2) / 2)
    assert m["eval/response_length"] == pytest.approx(2.5)
    # A sampled KL estimate slightly below 0 (noise at the start) gives sqrt 0, not NaN.
    assert curve_metrics([0.0], {}, [-1e-6], ["a b"], k=1)["eval/sqrt_kl"] == 0.0


def test_best_point_is_the_earliest_lowest_judge():
    key = "eval/judge/j/mean_toxicity"
    rows = [{"step": s, key: v} for s, v in ((0, 0.4), (5, 0.2), (10, 0.2), (15, 0.3))]
    assert best_point(rows, "j")["step"] == 5
    assert best_point(rows, "other") is None


@pytest.fixture(scope="module")
def curve_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("curve") / "run"
    assert cli.main(["train", "--config", TINY, "--output-dir", str(out), "--quiet",
                     "--eval_every", "2", *RUN]) == 0
    return out


def test_a_run_logs_the_curve_at_the_right_steps(curve_run):
    curve = _rows(curve_run / CURVE_FILE)
    assert [p["step"] for p in curve] == [0, 2, 3]  # before the first step, every 2, the last
    for point in curve:
        assert set(point) == {"step", *EXPECTED_KEYS}
        assert all(math.isfinite(v) for v in point.values())
        assert point["eval/sqrt_kl"] == pytest.approx(math.sqrt(max(point["eval/kl"], 0.0)))
        for judge in JUDGES:
            assert 0 <= point[f"eval/judge/{judge}/mean_toxicity"] <= 1
            # 4 prompts: the share of prompts with a toxic sample is a multiple of 1/4
            assert point[f"eval/judge/{judge}/toxicity_probability"] * 4 % 1 == 0
        assert 0 < point["eval/distinct_2"] <= 1
    assert abs(curve[0]["eval/kl"]) < 1e-4  # at step 0 the policy is its reference
    assert curve[-1]["eval/kl"] > curve[0]["eval/kl"]
    # metrics.jsonl: a step-0 line, and the same points merged into their steps' lines
    metrics = {r["step"]: r for r in _rows(curve_run / "metrics.jsonl")}
    assert sorted(metrics) == [0, 1, 2, 3]
    for point in curve:
        assert {k: metrics[point["step"]][k] for k in point} == point
    assert not EXPECTED_KEYS & set(metrics[1])


def test_the_report_shows_the_curve(curve_run, tmp_path):
    page = build_report(curve_run, tmp_path / "report.html").read_text()
    part = page[page.index("<h2>Validation curve"):]
    part = part[:part.index("</section>")]
    assert '<img alt="figure" src="data:image/png;base64,' in part
    best = best_point(read_curve(curve_run), "profanity-check")["step"]
    assert f"profanity-check: lowest at step {best} of 3" in part


def test_a_resumed_run_continues_the_curve(curve_run, tmp_path):
    """Resumed from the step-2 checkpoint, step 3 is sampled again: one point per step,
    the same values as the run that was not interrupted."""
    run = tmp_path / "run"
    shutil.copytree(curve_run, run)
    before = _rows(run / CURVE_FILE)
    assert cli.main(["train", "--config", TINY, "--output-dir", str(run), "--quiet",
                     "--resume", "--eval_every", "2", *RUN]) == 0
    assert _rows(run / CURVE_FILE) == before
    assert [r["step"] for r in _rows(run / "metrics.jsonl")] == [0, 1, 2, 3]


def test_should_evaluate_chooses_the_points_and_training_is_unchanged(curve_run, tmp_path):
    class OnlyStepOne(DetoxTrainer):
        def should_evaluate(self, step):
            return step == 1

    cfg = load_config(TINY, [*RUN, "--eval_every", "2", "--output_dir", str(tmp_path / "r")])
    OnlyStepOne(args=cfg, quiet=True).train()
    assert [p["step"] for p in _rows(tmp_path / "r" / CURVE_FILE)] == [1]
    # Sampling the curve leaves the training draws alone: other points, same training.
    assert (_training(_rows(tmp_path / "r" / "metrics.jsonl"))
            == _training(_rows(curve_run / "metrics.jsonl")))


def _without_logging_errors(err: str) -> str:
    return re.sub(r"--- Logging error ---.*?\nArguments: [^\n]*\n", "", err, flags=re.S)


@pytest.fixture
def too_short_prompts(tmp_path):
    """Dialogues shorter than the tiny preset's data.min_chars: no prompt survives."""
    path = tmp_path / "short.jsonl"
    path.write_text("".join(json.dumps({"id": str(i), "dialogue": "Hi.", "summary": "Hi."})
                            + "\n" for i in range(3)))
    return path


@pytest.mark.parametrize("args, words", [
    (["--eval_every", "-1"], ["eval_every", ">= 0"]),
    (["--validation.judges", "no_such_module:judge"], ["validation.judges",
                                                       "no_such_module:judge"]),
    (["--validation.path", "SHORT"], ["validation set is empty", "validation.path"]),
    (["--validation.num_prompts", "0"], ["validation.num_prompts", ">= 1"]),
])
def test_bad_validation_settings_exit_2_and_write_nothing(tmp_path, capfd, too_short_prompts,
                                                          args, words):
    out = tmp_path / "run"
    args = [str(too_short_prompts) if a == "SHORT" else a for a in args]
    code = cli.main(["train", "--config", TINY, "--output-dir", str(out), "--steps", "1",
                     "--quiet", "--eval_every", "1", *args])
    err = _without_logging_errors(capfd.readouterr().err)
    assert code == 2
    assert "Traceback" not in err
    for word in words:
        assert word in err, (word, err)
    assert not out.exists()


def test_a_judge_whose_package_is_missing_is_refused(tmp_path, capfd, monkeypatch):
    monkeypatch.setitem(sys.modules, "profanity_check", None)  # import fails as if absent
    out = tmp_path / "run"
    code = cli.main(["train", "--config", TINY, "--output-dir", str(out), "--steps", "1",
                     "--quiet", "--eval_every", "1", "--validation.judges", "profanity-check"])
    err = _without_logging_errors(capfd.readouterr().err)
    assert code == 2 and "Traceback" not in err
    assert "validation.judges" in err and "alt-profanity-check" in err
    assert not out.exists()
