"""PruneRecipe: one table from a method to its score rule and selector, every setting checked when
built; prune_model's one result; library errors naming parameters, shown by the CLI as flags."""

import dataclasses

import pytest
import torch

from atv_sparse.calib import load_calibration
from atv_sparse.convert import cli_message
from atv_sparse.errors import AtvSparseError
from atv_sparse.models import adapter_for, read_config
from atv_sparse.patterns import parse_pattern
from atv_sparse.prune.driver import PruneResult
from atv_sparse.prune.pipeline import prune_model
from atv_sparse.prune.recipe import METHODS, PruneRecipe, TokenSelection
from atv_sparse.prune.sparsegpt import SparseGpt
from atv_sparse.prune.wanda import Wanda
from atv_sparse.prune.targets import resolve_targets

TWO_FOUR, HALF = parse_pattern("2:4"), parse_pattern("unstructured", 0.5)


@pytest.mark.parametrize("method,score,tokens", [
    ("magnitude", "magnitude", None), ("wanda", "wanda", "mixed"), ("sparsegpt", "sparsegpt", "mixed"),
    ("atv", "wanda", "atv"), ("atv-sparsegpt", "sparsegpt", "atv"), ("tamp", "tamp", "tamp"),
])
def test_method_names_its_rule_and_selector(method, score, tokens):
    recipe = PruneRecipe(method, TWO_FOUR)
    assert (recipe.rule.name, recipe.tokens) == (score, tokens) == (METHODS[method].rule.name, METHODS[method].tokens)
    assert recipe == PruneRecipe.build(method, TWO_FOUR)


def test_calib_tokens_replace_a_plain_methods_selector():
    assert PruneRecipe.build("wanda", TWO_FOUR, calib_tokens="visual").tokens == "visual"
    assert PruneRecipe.build("sparsegpt", TWO_FOUR, calib_tokens="atv").tokens == "atv"
    assert PruneRecipe.build("atv", TWO_FOUR, calib_tokens="atv").tokens == "atv"  # its own: allowed
    recipe = PruneRecipe.build("tamp", HALF, das=True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.rule.das = False


def test_each_setting_lives_with_its_owner():
    recipe = PruneRecipe.build("atv-sparsegpt", TWO_FOUR, alpha=2.0, budget_rule="paper", blocksize=64, percdamp=0.1,
                               das=False, seed=3)
    assert recipe.rule == SparseGpt(blocksize=64, percdamp=0.1) and recipe.seed == 3
    assert recipe.selection == TokenSelection("atv", alpha=2.0, budget_rule="paper")
    assert recipe.selection.settings() == {"alpha": 2.0, "budget_rule": "paper"}
    assert recipe.rule.settings() == {"blocksize": 64, "percdamp": 0.1}
    # SparseGPT's settings given to Wanda are checked and ignored, as the CLI always passes them.
    assert PruneRecipe.build("wanda", TWO_FOUR, blocksize=64).rule == Wanda()
    assert PruneRecipe.build("tamp", HALF, das=True).rule.settings() == {"das": True}
    assert PruneRecipe.build("magnitude", TWO_FOUR, alpha=3.0).selection is None
    with pytest.raises(AtvSparseError, match="runs the sparsegpt rule, not wanda"):
        PruneRecipe("atv-sparsegpt", TWO_FOUR, rule=Wanda())
    with pytest.raises(TypeError, match="unknown setting 'power'"):
        PruneRecipe.build("wanda", TWO_FOUR, power=2)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(method="nope"), "`method` 'nope': choose one of magnitude, wanda"),
    (dict(blocksize=0), "`blocksize` must be at least 1"),
    (dict(method="sparsegpt", blocksize=0), "`blocksize` must be at least 1"),
    (dict(percdamp=-0.1), "`percdamp` must be >= 0"),
    (dict(method="magnitude", alpha=-1.0), "`alpha` must be >= 0"),
    (dict(alpha=-1.0), "`alpha` must be >= 0"),
    (dict(budget_rule="median"), "`budget_rule` 'median'"),
    (dict(method="wanda", calib_tokens="everything"), "`calib_tokens` 'everything'"),
    (dict(method="magnitude", calib_tokens="text"), "`calib_tokens` does not apply to `method` magnitude"),
    (dict(method="atv", calib_tokens="abs"), "use `method` wanda `calib_tokens` abs instead"),
    (dict(method="atv-sparsegpt", calib_tokens="text"), "use `method` sparsegpt `calib_tokens` text instead"),
    (dict(method="tamp", das=True), "`das` applies to `method` tamp with `pattern` unstructured only"),
    (dict(method="wanda", pattern=HALF, das=True), "`das` applies to"),
    (dict(method="atv", budget_target=10), "`budget_target` applies to `calib_tokens` abs/dbs/drift-fixed only"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_settings_are_refused_when_built(kwargs, needle):
    kwargs = {"method": "wanda", "pattern": TWO_FOUR, **kwargs}
    with pytest.raises(AtvSparseError) as err:
        PruneRecipe.build(**kwargs)
    assert needle in str(err.value)


def test_pattern_must_be_a_pattern():
    with pytest.raises(TypeError, match="parse_pattern"):
        PruneRecipe("wanda", "2:4")


def test_cli_shows_parameters_as_its_flags():
    error = AtvSparseError("`budget_target` applies to `calib_tokens` abs/dbs/drift-fixed only")
    assert cli_message(error) == "--budget-from applies to --calib-tokens abs/dbs/drift-fixed only"
    error = AtvSparseError("layer x: leave it dense with `skip_incompatible` or `ignore` x")
    assert cli_message(error) == "layer x: leave it dense with --skip-incompatible or --ignore x"
    error = AtvSparseError("`device` mps: no mps device is available; `out_dir` /o; `rule` 'x'")
    assert cli_message(error) == "--device mps: no mps device is available; --out /o; --budget-rule 'x'"
    # names the CLI does not have stay as they are
    error = AtvSparseError("key_mask leaves no key at or before `last`; pip install x (or atv-sparse[plot])")
    assert cli_message(error) == str(error)


def test_prune_model_returns_one_result(tiny_llama, calib_txt):
    adapter = adapter_for(read_config(tiny_llama), tiny_llama)
    model = adapter.load(tiny_llama)
    calibration = load_calibration(tiny_llama, adapter, path=calib_txt, nsamples=3, seqlen=16, seed=1)
    assert calibration.tokens is None and calibration.source == str(calib_txt)
    assert [s["input_ids"].shape for s in calibration.samples] == [(1, 16)] * 3
    prefix = adapter.layers_prefix(model)
    plan = resolve_targets(model, prefix, TWO_FOUR)
    targets = {name: model.get_submodule(name) for name in plan.targets}
    result = prune_model(model, adapter.decoder_layers(model), prefix, targets, PruneRecipe("sparsegpt", TWO_FOUR),
                         calibration, torch.device("cpu"), progress=False)
    assert isinstance(result, PruneResult) and set(result.bitmasks) == set(targets) and result.budget == {}
    assert list(result.timings) == ["capture", "calibrate", "prune", "propagate"]
    assert [b["block"] for b in result.blocks] == [0, 1] and result.blocks[0]["tokens"] == 3 * 16
    with pytest.raises(AtvSparseError, match="`samples` is empty"):
        prune_model(model, adapter.decoder_layers(model), prefix, targets, PruneRecipe("wanda", TWO_FOUR), None,
                    torch.device("cpu"), progress=False)
