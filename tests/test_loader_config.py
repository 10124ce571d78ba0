"""The strict quantization_config schema: a garbage field never loads, on any of the three routes.

Every case is one edit of a real block written by atv_sparse.convert; the error must name the
file and the key, and the same edit must stop atv_sparse.load, AutoModelForCausalLM.from_pretrained
and the vLLM plugin's checks before any tensor is read.
"""

import json
import shutil

import pytest

import atv_sparse
from atv_sparse.convert import main
from atv_sparse.errors import AtvSparseError
from atv_sparse.formats.spec import build_quantization_config, check_model_config, check_quantization_config
from atv_sparse.patterns import parse_pattern
from atv_sparse.vllm_plugin.checks import check_block, pruned_modules_in_checkpoint

WHERE = "ckpt/config.json"

# (key edited, new value or DELETE, words the message must hold besides the file and key)
DELETE = object()
GARBAGE = [
    ("targets", "3:4", "list of module names"),
    ("targets", ["re:("], "not a valid regular expression"),
    ("targets", [], "not empty"),
    ("targets", [5], "non-empty module name"),
    ("targets", ["re:a{99999999999}"], "not a valid regular expression"),
    ("targets", ["re:" + "(" * 500 + "a" + ")" * 500], "not a valid regular expression"),
    ("targets", ["x" * 5000], "at most 1024 characters"),
    ("ignore", None, "list of module names"),
    ("ignore", {"a": 1}, "list of module names"),
    ("ignore", ["re:[z-a]"], "not a valid regular expression"),
    ("sparsity", 1.5, "strictly between 0 and 1"),
    ("sparsity", "3:4", "strictly between 0 and 1"),
    ("sparsity", True, "strictly between 0 and 1"),
    ("sparsity", 0.7, "1 - N / M"),
    ("pattern", "3:4:5", "is not N:M"),
    ("pattern", " 2:4", "is not N:M"),
    ("pattern", "4:2", "0 < N < M"),
    ("pattern", "1:99999", "is not N:M"),
    ("pattern", 24, "'N:M'"),
    ("pattern", DELETE, "it is missing"),
    ("format_version", "1", "format version '1' is not supported"),
    ("format_version", True, "format version True is not supported"),
    ("format_version", 2, "format version 2 is not supported"),
    ("format", "dense", "unknown atv_sparse format 'dense'"),
    ("method", 5, "method name"),
    ("method", "", "method name"),
    ("method_settings", [1, 2], "JSON object"),
    ("version", 1.0, "version string"),
    ("bogus_key", 1, "unknown key"),
    ("quant_method", "atv-sparse", "not an atv_sparse checkpoint"),
]
IDS = [f"{k}={str(v)[:20]}" for k, v, _ in GARBAGE]


def written_block(pattern="2:4", sparsity=None) -> dict:
    p = parse_pattern(pattern, sparsity)
    return build_quantization_config(p, "wanda", {"nsamples": 4}, ["re:model[.]layers[.][0-9]+[.].*"], [], "0.1.0")


def edited(block: dict, key: str, value) -> dict:
    block = dict(block)
    if value is DELETE:
        block.pop(key)
    else:
        block[key] = value
    return block


@pytest.mark.parametrize("pattern,sparsity", [("2:4", None), ("4:8", None), ("3:7", None), ("unstructured", 0.7)])
def test_written_blocks_pass(pattern, sparsity):
    block = written_block(pattern, sparsity)
    assert check_quantization_config(block, WHERE) == parse_pattern(pattern, sparsity)
    assert check_model_config({"quantization_config": block, "text_config": {"quantization_config": block}},
                              WHERE) == parse_pattern(pattern, sparsity)


def test_dense_config_has_no_pattern():
    assert check_model_config({"architectures": ["LlamaForCausalLM"]}, WHERE) is None


@pytest.mark.parametrize("key,value,words", GARBAGE, ids=IDS)
def test_garbage_field_is_one_named_error(key, value, words):
    with pytest.raises(AtvSparseError) as e:
        check_quantization_config(edited(written_block(), key, value), WHERE)
    message = str(e.value)
    assert message.startswith(WHERE) and words in message
    if key not in ("format_version", "format", "quant_method"):
        assert f"quantization_config.{key}" in message


def test_unstructured_needs_its_sparsity():
    block = edited(written_block("unstructured", 0.6), "sparsity", DELETE)
    with pytest.raises(AtvSparseError, match="quantization_config.sparsity.*needs it"):
        check_quantization_config(block, WHERE)


def test_text_config_copy_is_checked_and_must_equal():
    good = written_block()
    with pytest.raises(AtvSparseError, match="text_config.quantization_config.targets"):
        check_model_config({"quantization_config": good,
                            "text_config": {"quantization_config": edited(good, "targets", "3:4")}}, WHERE)
    with pytest.raises(AtvSparseError, match="text_config.quantization_config.method differs"):
        check_model_config({"quantization_config": good,
                            "text_config": {"quantization_config": edited(good, "method", "tamp")}}, WHERE)
    with pytest.raises(AtvSparseError, match="top-level quantization_config is missing"):
        check_model_config({"text_config": {"quantization_config": good}}, WHERE)
    with pytest.raises(AtvSparseError, match="text_config is a JSON list"):
        check_model_config({"quantization_config": good, "text_config": []}, WHERE)


@pytest.fixture(scope="module")
def packed(tmp_path_factory, tiny_llama):
    out = tmp_path_factory.mktemp("cfg") / "packed"
    assert main([str(tiny_llama), "--out", str(out), "--method", "magnitude", "--quiet"]) == 0
    return out


def with_block(src, dst, key, value):
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = edited(config["quantization_config"], key, value)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


# the five, and one per kind of check
ROUTE_CASES = [GARBAGE[i] for i in (0, 1, 7, 10, 11, 14, 20, 28)]


@pytest.mark.parametrize("key,value,words", ROUTE_CASES, ids=[f"{k}={str(v)[:20]}" for k, v, _ in ROUTE_CASES])
def test_garbage_never_loads_on_any_route(packed, tmp_path, key, value, words, monkeypatch):
    from transformers import AutoModelForCausalLM
    from transformers.modeling_utils import PreTrainedModel

    bad = with_block(packed, tmp_path / "bad", key, value)

    def no_tensor_read(*args, **kwargs):
        raise AssertionError("a tensor was read before the config was refused")

    # weights are loaded by this method; refusing first means it never runs
    monkeypatch.setattr(PreTrainedModel, "_load_pretrained_model", no_tensor_read)
    for route in (atv_sparse.load, AutoModelForCausalLM.from_pretrained, pruned_modules_in_checkpoint):
        with pytest.raises(AtvSparseError) as e:
            route(bad)
        assert words in str(e.value), route
        assert "config.json" in str(e.value)
    block = json.loads((bad / "config.json").read_text())["quantization_config"]
    with pytest.raises(AtvSparseError, match=words.replace("(", r"\(")):
        check_block(block, str(bad / "config.json"))


def test_python_constants_in_config_json_still_load(packed, tmp_path):
    """json.dumps writes NaN / Infinity for such floats; transformers reads them, so must we."""
    ok = tmp_path / "ok"
    shutil.copytree(packed, ok)
    config = json.loads((ok / "config.json").read_text())
    config["some_limit"] = float("inf")
    (ok / "config.json").write_text(json.dumps(config))
    atv_sparse.load(ok, progress=False)


def test_architectures_must_be_class_names(packed, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(packed, bad)
    config = json.loads((bad / "config.json").read_text())
    config["architectures"] = 5
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(AtvSparseError, match="architectures: expected a list of class names"):
        atv_sparse.load(bad)


@pytest.mark.parametrize("text,words", [
    ("{\"a\": " + "[" * 100000, "nested too deeply"),
    ('{"a": ' + "1" * 5000 + "}", "not valid UTF-8 JSON"),
    ('{"a": 1, "a": 2}', "appears twice"),
    ("\udcff", "not valid UTF-8 JSON"),
    ("[1, 2]", "expected a JSON object"),
])
def test_unreadable_config_json(packed, tmp_path, text, words):
    bad = tmp_path / "bad"
    shutil.copytree(packed, bad)
    (bad / "config.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(AtvSparseError, match=words) as e:
        atv_sparse.load(bad)
    assert "config.json" in str(e.value)


@pytest.mark.parametrize("architectures", [None, "absent", []])
def test_dense_checkpoint_without_architectures_loads_by_model_type(tiny_llama, tmp_path, architectures):
    """transformers' GGUF reader saves ``architectures: null``: the loader takes the class from
    ``model_type``, as convert does, and loads the same weights as the plain class would."""
    import torch
    from transformers import LlamaForCausalLM

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_llama, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config.pop("architectures") if architectures == "absent" else config.update(architectures=architectures)
    (ckpt / "config.json").write_text(json.dumps(config))
    model = atv_sparse.load(ckpt, progress=False)
    reference = LlamaForCausalLM.from_pretrained(tiny_llama)
    assert type(model).__name__ == "LlamaForCausalLM"
    ids = torch.randint(0, config["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(1))
    assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_dense_checkpoint_of_unknown_model_type_without_architectures(tiny_llama, tmp_path):
    """No ``architectures`` and a model_type atv_sparse does not know: the error convert gives."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_llama, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config.update(architectures=None, model_type="mistral")
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(AtvSparseError, match=r"no `architectures` and its model_type 'mistral' is not one of llama"):
        atv_sparse.load(ckpt, progress=False)
    assert main([str(ckpt), "--method", "magnitude", "--pattern", "2:4", "--out", str(tmp_path / "out"), "--quiet",
                 "--device", "cpu"]) == 2
