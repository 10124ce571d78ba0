"""benchmarks/accuracy.py and its parts (accuracy_plan, accuracy_runs, accuracy_stats, accuracy_render):
the quick subset end to end on the bundled model, and its statistics."""

import json

import pytest

from script_modules import load_script

# The parts first: each imports the ones before it by name (tests/script_modules.py).
plan = load_script("benchmarks/accuracy_plan.py")
runs = load_script("benchmarks/accuracy_runs.py")
stats = load_script("benchmarks/accuracy_stats.py")
load_script("benchmarks/accuracy_render.py")
accuracy = load_script("benchmarks/accuracy.py")


def _result(bits: dict[str, str]) -> dict:
    return {"correct": bits}


def test_paired_difference_averages_seeds_per_item_then_tasks():
    base = _result({"a": "0011", "b": "10"})
    ours = [_result({"a": "1011", "b": "10"}), _result({"a": "0011", "b": "11"})]
    # Task a: item 0 gains in one seed of two -> per-item d = (0.5, 0, 0, 0); task b: d = (0, 0.5).
    delta, se = stats.paired_difference(ours, [base])
    assert delta == pytest.approx(100 * (0.5 / 4 + 0.5 / 2) / 2)
    var_a = sum((x - 0.125) ** 2 for x in (0.5, 0, 0, 0)) / 3 / 4
    var_b = sum((x - 0.25) ** 2 for x in (0, 0.5)) / 1 / 2
    assert se == pytest.approx(100 * (var_a + var_b) ** 0.5 / 2)
    assert stats.paired_difference([base], [base]) == (0.0, 0.0)
    assert stats.verdict(1.0, 0.6) == "within noise (|d| < 2 SE)" and stats.verdict(-2.0, 0.5) == "ATV worse"


def test_retention_leaves_out_tasks_the_dense_model_fails():
    dense = {"tasks": {"a": {"accuracy": 0.5}, "b": {"accuracy": 0.0}, "c": {"accuracy": 1.0}}}
    pruned = {"tasks": {"a": {"accuracy": 0.25}, "b": {"accuracy": 0.1}, "c": {"accuracy": 1.0}}}
    r = stats.retention_of(pruned, dense)
    assert r["tasks"] == {"a": 50.0, "c": 100.0} and r["average"] == 75.0


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("accuracy") / "acc"
    assert accuracy.main(["--quick", "--per-task", "4", "--nsamples", "4", "--workers", "2", "--out", str(out)]) == 0
    return out, json.loads(out.with_suffix(".json").read_text())


def test_quick_run_writes_every_table(quick):
    out, payload = quick
    text = out.with_suffix(".md").read_text()
    for heading in ("Main comparison", "Paired differences", "Visual-token selectors", "alpha", "Table A3", "MoT"):
        assert heading in text
    for method in plan.MAIN_METHODS:
        assert f"| {method} |" in text
    tables = payload["tables"]
    assert set(tables["main"]) == {f"{v}|{m}" for v in plan.VARIANTS for m in plan.MAIN_METHODS}
    assert all(tables["invariance"].values()) and len(tables["invariance"]) == 3
    assert out.with_name(out.name + "-atv-blocks.png").stat().st_size > 1000
    blocks = tables["atv_blocks"]["blocks"]
    assert [b["block"] for b in blocks] == list(range(6)) and "Fig. A1-like" in text
    assert all(b["visual_tokens_used"] == round(b["k_mean"] * 4) for b in blocks)  # 4 samples
    mix = payload["meta"]["calibration_tokens"]["0"]
    assert mix["visual"] == 4 * 64 and 0.5 < mix["visual_share"] < 1  # 4 conversations of one 64-token image
    share = f"calibration tokens {100 * mix['visual_share']:.1f}% visual"
    tables_titles = [line for line in text.splitlines() if line.startswith("##") and "Dense" not in line
                     and not line.startswith("## Main comparison")]
    assert tables_titles and all(share in line for line in tables_titles), tables_titles


def test_run_log_keeps_finished_runs_of_its_key(tmp_path):
    path = tmp_path / "runs.jsonl"
    log = runs.RunLog(path, {"per_task": 4})
    log.append({"name": "a", "average": 0.5})
    with open(path, "a") as f:
        f.write('{"key": {"per_task": 4}, "run": {"name": "cut')  # a run killed mid-write
    log.append({"name": "b", "average": 0.25})
    runs.RunLog(path, {"per_task": 8}).append({"name": "a", "average": 1.0})
    assert log.load() == {"a": {"name": "a", "average": 0.5}, "b": {"name": "b", "average": 0.25}}
    assert runs.RunLog(path, {"per_task": 8}).load() == {"a": {"name": "a", "average": 1.0}}
    assert runs.RunLog(tmp_path / "none.jsonl", {}).load() == {}


def test_second_invocation_reuses_the_run_log(quick, tmp_path):
    """Every run of the quick invocation is in its log; the same invocation again prunes nothing and
    writes the same tables (the runs file holds every per-item result the paired statistics need)."""
    out, payload = quick
    log = out.with_suffix(".runs.jsonl")
    names = [json.loads(line)["run"]["name"] for line in log.read_text().splitlines()]
    assert sorted(names) == sorted(r["name"] for r in payload["runs"])
    again = tmp_path / "acc"
    argv = ["--quick", "--per-task", "4", "--nsamples", "4", "--workers", "2", "--out", str(again),
            "--run-log", str(log)]
    assert accuracy.main(argv) == 0
    second = json.loads(again.with_suffix(".json").read_text())
    assert second["tables"] == payload["tables"]
    assert second["meta"]["jobs_from_log"] == len(names) == second["meta"]["jobs"]
    assert "of them from the run log" in again.with_suffix(".md").read_text()
    assert log.read_text().count("\n") == len(names)  # nothing pruned, nothing appended


def test_rerender_reproduces_the_tables(quick, tmp_path):
    out, payload = quick
    copy = tmp_path / "again.json"
    copy.write_text(out.with_suffix(".json").read_text())
    text = accuracy.rerender(copy)
    assert text + "\n" == out.with_suffix(".md").read_text()


def test_quick_run_facts(quick):
    """Properties the runs must show whatever the accuracies: the outlier transform does not change
    the dense model, alpha = 0 is text-only calibration, and ATV's visual budget is between the two."""
    _, payload = quick
    runs = {r["name"]: r for r in payload["runs"]}
    plain, outlier = runs["plain/dense/-/dense/seedNone"], runs["outlier/dense/-/dense/seedNone"]
    assert plain["tasks"] == outlier["tasks"]
    text, alpha0 = runs["plain/wanda/text/2:4/seed0"], runs["plain/wanda/atv/2:4/seed0/alpha0"]
    assert text["tasks"] == alpha0["tasks"]
    ablation = payload["tables"]["ablation"]
    assert ablation["text-only"]["2:4"]["visual_tokens"] == 0
    assert 0 < ablation["ATV (drift)"]["2:4"]["visual_tokens"] < ablation["mixed"]["2:4"]["visual_tokens"]
    # Magnitude's scores move with the rescaled columns, so its pruned model differs between the variants.
    assert runs["plain/magnitude/-/2:4/seedNone"]["average_nll"] != runs["outlier/magnitude/-/2:4/seedNone"]["average_nll"]


def test_selector_and_alpha_rows_paired_against_their_reference(quick):
    """The selector table pairs each row with ATV's drift selector, item by item: text-only minus ATV
    recomputed here from the logged per-item results, and equal to alpha = 0 minus alpha = 1."""
    out, payload = quick
    lines = map(json.loads, out.with_suffix(".runs.jsonl").read_text().splitlines())
    logged = {line["run"]["name"]: line["run"] for line in lines}
    text, atv = logged["plain/wanda/text/2:4/seed0"], logged["plain/wanda/atv/2:4/seed0"]
    per_task = [sum(int(a) - int(b) for a, b in zip(text["correct"][t], atv["correct"][t])) / len(atv["correct"][t])
                for t in atv["correct"]]
    ablation, alpha = payload["tables"]["ablation"], payload["tables"]["alpha"]
    pair = ablation["text-only"]["2:4"]["vs_reference"]
    assert pair["reference"] == "ATV (drift)" and pair["delta"] == pytest.approx(100 * sum(per_task) / len(per_task))
    assert alpha["alpha=0"]["2:4"]["vs_reference"]["delta"] == pytest.approx(pair["delta"])
    assert "vs_reference" not in ablation["ATV (drift)"]["2:4"] and "vs_reference" not in alpha["alpha=1"]["2:4"]
    checks = {c["prediction"]: c for c in payload["tables"]["prediction"]}
    assert checks["alpha = 1 >= alpha = 0 at 2:4"]["delta"] == pytest.approx(-pair["delta"])
    assert "Selectors: ATV (drift) >= random at 2:4" in checks
    text_md = out.with_suffix(".md").read_text()
    assert "the row minus ATV (drift)" in text_md and "2:4 paired" in text_md


def test_quick_run_on_the_tiny_next_with_a_prediction(tmp_path):
    """The new model's tables in CI time: anyres scenes (336 image tokens), >= 85% visual calibration
    tokens in every title, the prediction printed first and each checkable claim given an outcome."""
    prediction = tmp_path / "prediction.md"
    prediction.write_text("ATV ahead of Wanda, written before the run.\n")
    out = tmp_path / "next"
    assert accuracy.main(["--model", "tiny-next", "--quick", "--per-task", "3", "--nsamples", "4", "--workers", "2",
                          "--sections", "main", "calibration", "--variants", "plain", "--prediction", str(prediction),
                          "--out", str(out)]) == 0
    payload = json.loads(out.with_suffix(".json").read_text())
    text = out.with_suffix(".md").read_text()
    assert text.startswith("# Accuracy of pruning methods on the tiny LLaVA-NeXT")
    assert payload["meta"]["image_tokens"] == 336
    assert payload["meta"]["calibration_tokens"]["0"]["visual_share"] >= 0.85
    assert text.index("ATV ahead of Wanda, written before the run.") < text.index("## Outcome beside the prediction")
    checked = {c["prediction"] for c in payload["tables"]["prediction"]}
    assert {"ATV > Wanda at 2:4", "ATV > TAMP at 2:4", "Wanda: ATV >= text-only calibration"} <= checked
    assert set(payload["tables"]["main"]) == {f"plain|{m}" for m in plan.MAIN_METHODS}
    assert not payload["tables"]["ablation"] and not payload["tables"]["mot"] and "Table 3" not in text


def test_outlier_strength_shares_the_run_log(quick, tmp_path):
    """benchmarks/outlier_strength.py reuses the accuracy runs it shares (dense, ATV, magnitude on the
    plain and the 4-channel outlier model), prunes only the new variant, and pairs ATV against each row."""
    strength = load_script("benchmarks/outlier_strength.py")
    out, _ = quick
    log = tmp_path / "runs.jsonl"
    log.write_text(out.with_suffix(".runs.jsonl").read_text())
    argv = ["--model", "tiny-vlm", "--per-task", "4", "--nsamples", "4", "--seeds", "0", "--channels", "4", "8",
            "--patterns", "2:4", "--workers", "1", "--out", str(tmp_path / "os"), "--run-log", str(log)]
    assert strength.main(argv) == 0
    payload = json.loads((tmp_path / "os.json").read_text())
    assert payload["meta"]["new_runs"] == 1 and payload["meta"]["from_log"] == 4
    assert len(payload["meta"]["channels"]["outlier8"]) == 8
    logged = {line["run"]["name"]: line["run"] for line in map(json.loads, log.read_text().splitlines())}
    atv, mag = logged["plain/wanda/atv/2:4/seed0"], logged["plain/magnitude/-/2:4/seedNone"]
    per_task = [sum(int(a) - int(b) for a, b in zip(atv["correct"][t], mag["correct"][t])) / len(mag["correct"][t])
                for t in mag["correct"]]
    rows = {r["row"]: r for r in payload["table"]}
    assert rows["magnitude, no outliers"]["atv_minus"] == pytest.approx(100 * sum(per_task) / len(per_task))
    assert "outlier8/magnitude/-/2:4/seedNone" in logged and "se" not in rows["ATV"]
