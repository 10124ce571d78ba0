"""``atv_sparse.evaluate``: pure scoring functions, the JSONL reader and its errors, the CLI, and
identical scores across dense, dense-with-zeros and compressed checkpoints."""

import json
import math

import pytest
import torch
from PIL import Image

from atv_sparse.errors import AtvSparseError
from atv_sparse.evaluate import main
from atv_sparse.tinybench import model as tiny_vlm
from atv_sparse.evaluation.items import limit_items, read_eval_file, synthetic_items
from atv_sparse.evaluation.loading import load_model_and_processor
from atv_sparse.evaluation.metrics import compare, exact_match, normalize_answer, paired_difference, retention, summarize
from atv_sparse.evaluation.perplexity import text_perplexity
from atv_sparse.evaluation.scoring import evaluate_model


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    """An untrained tiny VLM (the bundled model's architecture, random weights)."""
    return tiny_vlm.write_untrained(tmp_path_factory.mktemp("vlm") / "untrained", seed=1)


def _records(spec):
    """spec: task -> list of (key, correct, nll)."""
    return [{"task": t, "key": k, "correct": c, "nll": n} for t, rows in spec.items() for k, c, n in rows]


# ---------------------------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [(" The Red. ", "red"), ("An owl", "owl"), ("B", "b"), ("'fox'", "fox"),
                                            ("12", "12"), ("left\n", "left"), ("a  b", "b"), ("Theme", "theme")])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match():
    assert exact_match(" Yes.", "yes") and not exact_match("yes no", "yes") and not exact_match("1", "11")


def test_summarize_counts_distinct_items_and_averages_tasks_equally():
    records = _records({"a": [("x", True, 1.0), ("x", False, 3.0), ("y", True, 2.0), ("z", True, 2.0)],
                        "b": [("p", False, 4.0)]})
    s = summarize(records)
    assert s["tasks"]["a"] == {"n": 4, "distinct": 3, "accuracy": 0.75, "nll": 2.0}
    assert s["tasks"]["b"] == {"n": 1, "distinct": 1, "accuracy": 0.0, "nll": 4.0}
    assert s["average"] == pytest.approx((0.75 + 0.0) / 2)  # per task, not per item (which would be 0.6)
    assert s["average_nll"] == pytest.approx(3.0)
    with pytest.raises(AtvSparseError, match="empty"):
        summarize([])


def test_retention_formula():
    assert retention(0.45, 0.9) == pytest.approx(50.0)
    assert retention(0.9, 0.9) == pytest.approx(100.0)
    assert retention(0.3, 0.0) is None


def test_paired_difference():
    delta, se = paired_difference([True, True, False, False], [True, False, False, False])
    assert delta == pytest.approx(25.0)
    # diffs 0, 1, 0, 0: sample variance 0.25, SE = sqrt(0.25 / 4) = 0.25 -> 25 points
    assert se == pytest.approx(25.0)
    with pytest.raises(ValueError):
        paired_difference([True], [])


def test_compare_averages_per_task_retention():
    base = _records({"a": [("1", True, 0.1), ("2", True, 0.1)], "b": [("3", True, 0.1), ("4", False, 0.1)],
                     "c": [("5", False, 0.1)]})
    ours = _records({"a": [("1", True, 0.2), ("2", False, 0.2)], "b": [("3", True, 0.2), ("4", False, 0.2)],
                     "c": [("5", True, 0.2)]})
    out = compare({**summarize(ours), "records": ours}, {**summarize(base), "records": base})
    assert out["tasks"]["a"]["retention"] == pytest.approx(50.0)
    assert out["tasks"]["b"]["retention"] == pytest.approx(100.0)
    assert out["tasks"]["c"]["retention"] is None  # baseline 0: left out of the average
    assert out["average_retention"] == pytest.approx(75.0)
    assert out["tasks"]["a"]["delta"] == pytest.approx(-50.0)
    with pytest.raises(AtvSparseError, match="different items"):
        compare({**summarize(ours), "records": ours}, {**summarize(base[:-1]), "records": base[:-1]})


# ---------------------------------------------------------------------------------------------
# The JSONL reader
# ---------------------------------------------------------------------------------------------

def _write(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_read_eval_file(tmp_path):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (30, 20), (200, 10, 10)).save(tmp_path / "img" / "a.png")
    path = _write(tmp_path / "qa.jsonl", [{"image": "img/a.png", "question": "What colour?", "answer": "red",
                                           "task": "colour"}, "",
                                          {"question": "What is 2 plus 2?", "answer": "4"}])
    items = read_eval_file(path)
    assert [(it.task, it.question, it.answer) for it in items] == [("colour", "What colour?", "red"),
                                                                   ("data", "What is 2 plus 2?", "4")]
    assert items[0].image.size == (30, 20) and items[1].image is None
    assert len(read_eval_file(path, limit=1)) == 1


@pytest.mark.parametrize("lines, message", [
    ([{"question": "q", "answer": "a"}, {"image": None, "question": "q2"}], r'line 2: missing field "answer"'),
    ([{"answer": "a"}], r'line 1: missing field "question"'),
    ([{"image": "nope.png", "question": "q", "answer": "a"}], r"line 1: cannot read image .*nope.png"),
    ([{"image": "bad.png", "question": "q", "answer": "a"}], r"line 1: cannot read image .*bad.png"),
    (["{not json"], r"line 1: not valid JSON"),
    (['{"question": ' + "7" * 5000 + ', "answer": "a"}'], r"line 1: not valid JSON"),  # int() refuses 5000 digits
    (["[" * 100_000 + "]" * 100_000], r"line 1: not valid JSON \(nested too deeply\)"),
    ([{"question": "q", "answer": 3}], r'line 1: "answer" must be a non-empty string'),
    ([{"question": "What is \ud800?", "answer": "a"}], r'line 1: "question" holds an unpaired surrogate escape'),
    ([{"question": "q", "answer": "a", "task": "\udfff"}], r'line 1: "task" holds an unpaired surrogate escape'),
    ([], r"is empty"),
])
def test_read_eval_file_errors(tmp_path, lines, message):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(AtvSparseError, match=message):
        read_eval_file(_write(tmp_path / "qa.jsonl", lines))


def test_limit_items():
    items = synthetic_items(3, seed=0, tasks=("count", "facts"))
    assert [it.task for it in limit_items(items, per_task=2)] == ["count"] * 2 + ["facts"] * 2
    assert len(limit_items(items, limit=4)) == 4


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------

def test_cli_on_a_vlm_with_a_data_file(vlm_dir, tmp_path, capsys):
    Image.new("RGB", (56, 56), (10, 10, 200)).save(tmp_path / "a.png")
    data = _write(tmp_path / "qa.jsonl", [{"image": "a.png", "question": "What colour is the image?", "answer": "blue"},
                                          {"question": "What is 1 plus 2?", "answer": "3", "task": "sums"}])
    out = tmp_path / "scores.json"
    assert main([str(vlm_dir), "--data", str(data), "--json", str(out), "--quiet", "--device", "cpu"]) == 0
    report = json.loads(out.read_text())
    assert set(report["tasks"]) == {"data", "sums"} and len(report["records"]) == 2
    assert all(math.isfinite(r["nll"]) and r["nll"] > 0 for r in report["records"])
    assert "average" in capsys.readouterr().out


def test_cli_synthetic_with_baseline(vlm_dir, tmp_path):
    out = tmp_path / "scores.json"
    args = [str(vlm_dir), "--per-task", "2", "--tasks", "count", "facts", "--baseline", str(vlm_dir),
            "--json", str(out), "--quiet", "--device", "cpu"]
    assert main(args) == 0
    report = json.loads(out.read_text())
    assert [r["task"] for r in report["records"]] == ["count"] * 2 + ["facts"] * 2
    for task in report["tasks"].values():  # the same model as its own baseline
        assert task["delta"] == 0 and task["retention"] in (None, pytest.approx(100.0))


def test_cli_errors(vlm_dir, tiny_llama, tmp_path, capsys):
    assert main([str(tmp_path / "missing"), "--quiet"]) == 2
    assert "no such checkpoint directory" in capsys.readouterr().err
    assert main([str(tiny_llama), "--quiet", "--device", "cpu"]) == 2
    assert "not a vision-language model" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert main([str(vlm_dir), "--data", str(empty), "--quiet", "--device", "cpu"]) == 2
    assert "is empty" in capsys.readouterr().err
    assert main([str(vlm_dir), "--tasks", "colour", "--quiet", "--device", "cpu"]) == 2
    assert "unknown task" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--data", "--ppl"])
def test_bad_input_files_are_refused_before_the_model_loads(vlm_dir, tmp_path, capsys, monkeypatch, flag):
    """A bad --data or --ppl file is one error naming it, before any model is loaded."""
    import atv_sparse.evaluate as evaluate

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the input files were checked")

    monkeypatch.setattr(evaluate, "load_model_and_processor", no_load)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n" if flag == "--data" else "  \n")
    assert main([str(vlm_dir), flag, str(bad), "--quiet", "--device", "cpu"]) == 2
    assert str(bad) in capsys.readouterr().err


def test_perplexity_works_on_text_and_vision_language_models(vlm_dir, tiny_llama, tmp_path):
    text = tmp_path / "held_out.txt"
    text.write_text("Sparse models keep two of every four weights. " * 20)
    out = tmp_path / "ppl.json"
    assert main([str(tiny_llama), "--ppl", str(text), "--seqlen", "32", "--json", str(out), "--device", "cpu"]) == 0
    ppl = json.loads(out.read_text())["ppl"]
    # Direct computation, as Wanda's eval_ppl_wikitext: full windows of 32 tokens, each scored from
    # its start (mean loss per window, averaged), the trailing partial window dropped.
    model, tok = load_model_and_processor(tiny_llama)
    ids = tok(text.read_text(), add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    n = ids.numel() // 32
    assert ids.numel() % 32, "the text must leave a partial window for this test to check that it is dropped"
    with torch.no_grad():
        losses = [float(torch.nn.functional.cross_entropy(model(input_ids=ids[k * 32:(k + 1) * 32][None]).logits[0, :-1],
                                                          ids[k * 32 + 1:(k + 1) * 32])) for k in range(n)]
    assert ppl["ppl"] == pytest.approx(math.exp(sum(losses) / n), rel=1e-5)
    assert (ppl["windows"], ppl["dropped"]) == (n, ids.numel() - 32 * n)
    model, proc = load_model_and_processor(vlm_dir)
    assert math.isfinite(text_perplexity(model, proc, text.read_text(), 32)["ppl"])
    (tmp_path / "blank.txt").write_text("  \n")
    assert main([str(tiny_llama), "--ppl", str(tmp_path / "blank.txt"), "--device", "cpu"]) == 2
    with pytest.raises(AtvSparseError, match="fewer than one window of --seqlen 4096"):
        text_perplexity(model, proc, text.read_text(), 4096, "held_out.txt")


def _scores(path, items):
    model, proc = load_model_and_processor(path)
    return evaluate_model(model, proc, items, progress=False)["records"]


def test_dense_and_its_dense_with_zeros_export_score_identically(vlm_dir, tmp_path):
    """A 0%-sparsity dense-with-zeros export (the writer behind ``convert --format dense``) scores
    exactly as the dense checkpoint it came from."""
    from atv_sparse.formats.checkpoint import write_checkpoint

    model, _ = load_model_and_processor(vlm_dir)
    export = tmp_path / "export"
    write_checkpoint(model, export, source_dir=vlm_dir, bitmasks={}, patterns={}, packed=False,
                     quantization_config=None, extra_json={}, max_shard_size=1 << 30, overwrite=False)
    items = synthetic_items(3, seed=2)
    assert _scores(vlm_dir, items) == _scores(export, items)


def test_pruned_dense_and_compressed_checkpoints_score_identically(vlm_dir, tmp_path):
    """The same 2:4 pruning written dense-with-zeros and compressed (bitmask + values): same
    correctness and the same answer NLL, item by item; and different from the unpruned model."""
    from atv_sparse.convert import main as convert

    common = [str(vlm_dir), "--method", "magnitude", "--pattern", "2:4", "--device", "cpu"]
    assert convert(common + ["--format", "dense", "--out", str(tmp_path / "dense")]) == 0
    assert convert(common + ["--format", "packed", "--out", str(tmp_path / "packed")]) == 0
    items = synthetic_items(3, seed=4)
    dense, packed = _scores(tmp_path / "dense", items), _scores(tmp_path / "packed", items)
    assert [r["correct"] for r in dense] == [r["correct"] for r in packed]
    assert [r["nll"] for r in dense] == pytest.approx([r["nll"] for r in packed], rel=1e-6, abs=1e-6)
    assert [r["nll"] for r in dense] != pytest.approx([r["nll"] for r in _scores(vlm_dir, items)], rel=1e-3)


def test_image_tasks_need_a_vision_language_model(tiny_llama):
    model, tok = load_model_and_processor(tiny_llama)
    with pytest.raises(AtvSparseError, match="not a vision-language model"):
        evaluate_model(model, tok, synthetic_items(1, tasks=("count",)), progress=False)


def test_prepared_and_cached_decoder_inputs_score_like_the_plain_path(vlm_dir):
    """Processing the items once (prepare_items) and running the decoder alone from cached inputs
    (cache_decoder_inputs) give the per-item results of the plain path, for the model the cache
    came from and for a copy with pruned (here: perturbed) decoder linears."""
    import copy

    from atv_sparse.evaluation.scoring import cache_decoder_inputs, prepare_items

    model, processor = load_model_and_processor(vlm_dir)
    items = synthetic_items(3, seed=5)
    prepared = prepare_items(model, processor, items, batch_size=8)
    cached = cache_decoder_inputs(model, prepared)
    other = copy.deepcopy(model)
    with torch.no_grad():
        for layer in other.get_decoder().layers:
            layer.mlp.up_proj.weight.mul_(torch.rand_like(layer.mlp.up_proj.weight) > 0.5)
    for m in (model, other):
        plain = evaluate_model(m, processor, items, batch_size=8, progress=False)["records"]
        assert evaluate_model(m, processor, prepared, progress=False)["records"] == plain
        assert evaluate_model(m, processor, cached, progress=False)["records"] == plain
    assert (evaluate_model(other, processor, cached, progress=False)["records"]
            != evaluate_model(model, processor, cached, progress=False)["records"])
    with pytest.raises(AtvSparseError, match="teacher-forced"):
        evaluate_model(model, processor, prepared, scorer="generate")


def test_scoring_through_an_attached_mot_probe(vlm_dir):
    """The scorer calls the inner model directly; the probe routes there too, and unpruned it scores
    exactly like the original model."""
    from atv_sparse.analysis.mot import attach_mot

    model, processor = load_model_and_processor(vlm_dir)
    items = synthetic_items(2, seed=2)
    before = evaluate_model(model, processor, items, progress=False)["records"]
    probe = attach_mot(model)
    assert evaluate_model(model, processor, items, progress=False)["records"] == before
    with torch.no_grad():
        for mot in probe.linears.values():
            mot.visual.weight.zero_()  # only image positions change
    assert evaluate_model(model, processor, items, progress=False)["records"] != before


def test_refusals_come_before_any_model_loads(vlm_dir, tmp_path, capsys, monkeypatch):
    """An existing --json without --overwrite, an unknown task and a --baseline that is not a model are
    refused (exit 2, the problem named) before a model loads; the existing file is left as it was."""
    import atv_sparse.evaluate as evaluate

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(evaluate, "load_model_and_processor", no_load)
    out = tmp_path / "scores.json"
    out.write_text("earlier scores")
    assert main([str(vlm_dir), "--json", str(out), "--quiet", "--device", "cpu"]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err and out.read_text() == "earlier scores"
    assert main([str(vlm_dir), "--tasks", "count", "colours", "--quiet", "--device", "cpu"]) == 2
    assert "unknown task(s) colours" in capsys.readouterr().err
    assert main([str(vlm_dir), "--baseline", str(tmp_path), "--quiet", "--device", "cpu"]) == 2
    assert "not a model directory" in capsys.readouterr().err
    assert main([str(vlm_dir), "--json", str(tmp_path / "missing" / "s.json"), "--quiet", "--device", "cpu"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_json_is_replaced_only_with_overwrite(vlm_dir, tmp_path):
    out = tmp_path / "scores.json"
    out.write_text("earlier scores")
    args = [str(vlm_dir), "--tasks", "count", "--per-task", "2", "--json", str(out), "--quiet", "--device", "cpu"]
    assert main(args + ["--overwrite"]) == 0
    assert json.loads(out.read_text())["tasks"]["count"]["n"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["scores.json"]  # no temporary file left
