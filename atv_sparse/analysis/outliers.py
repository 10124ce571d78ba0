"""Give a model the outlier input channels real LLMs have, without changing what it computes.

Real LLMs have a few hidden channels whose activations are tens of times larger than the rest;
that is why activation-aware pruning (Wanda, SparseGPT) beats magnitude pruning on them. A tiny
model trained for minutes has none, so magnitude wins there, the opposite of real models
(/work/shared/notes/tiny-vlm-benchmark.md). This transform creates such channels:

    for each decoder block, for each RMSNorm -> the linears it feeds
        (input_layernorm -> q/k/v_proj, post_attention_layernorm -> gate/up_proj):
        norm.weight[ch]       *= c      the norm's output channels ch become c times larger
        linear.weight[:, ch]  /= c      ... and every consumer undoes it

Each consumer computes ``sum_j W[i, j] x[j]``; scaling ``x[ch]`` by c and ``W[:, ch]`` by 1/c
leaves every product unchanged, so the model's function is unchanged. With c a power of two
(the default, 32) both scalings are exact in binary floating point and every product is the
same number, so outputs are bit-identical; any other c adds one rounding per scaled weight
(relative 2^-24 in fp32), the size of the rounding the forward already does.

Effect on the pruners: magnitude's score |W| of the scaled columns drops by c (they get pruned
first); Wanda's score ``|W_ij| * ||X_j||`` is unchanged (exactly, for a power-of-two c);
SparseGPT's saliency ``W_ij^2 / [H^-1]_jj^2`` is invariant too, except through its dampening
``percdamp * mean(diag H)``, which grows with the c^2-scaled diagonal entries.

The same channels are used in every norm of every block: the outlier features of real LLMs sit
in the same few hidden dimensions throughout the network (Dettmers et al., LLM.int8()).

    python -m atv_sparse.analysis.outliers MODEL_DIR --out OUT --channels 4 --scale 32
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import torch
from torch import nn

from ..errors import AtvSparseError, with_flags
from ..formats.staging import StagedOutputDir, check_output_dir, copy_aux_files

# RMSNorm attribute of a decoder block -> the linears that read its output (Llama / Qwen2 blocks).
NORM_CONSUMERS = {
    "input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj"),
}
DEFAULT_CHANNELS, DEFAULT_SCALE = 4, 32.0


@dataclasses.dataclass
class OutlierTransform:
    """What ``add_outlier_channels`` changed.

    channels: the hidden channels scaled (sorted); scale: c; seed: the seed that chose them;
    norms: full names of the norms whose weight[channels] was multiplied by c; linears: full
    names of the linears whose weight[:, channels] was divided by c.
    """

    channels: list[int]
    scale: float
    seed: int
    norms: list[str]
    linears: list[str]

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def choose_channels(hidden_size: int, count: int, seed: int) -> list[int]:
    """``count`` distinct channels of ``range(hidden_size)``, sorted, drawn with ``torch.Generator(seed)``."""
    if not 1 <= count < hidden_size:
        raise AtvSparseError(f"`channels` must be in [1, {hidden_size - 1}] for hidden size {hidden_size}, got {count}")
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(hidden_size, generator=generator)[:count].tolist())


def _blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if get_decoder is not None else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise AtvSparseError(f"{type(model).__name__}: no decoder blocks found (model.get_decoder().layers); "
                             "the outlier transform applies to Llama / Qwen2 language models and the LLaVA / "
                             "Qwen2-VL models built on them")
    prefix = next(name for name, module in model.named_modules() if module is layers)
    return prefix, layers


def _check_block(name: str, block: nn.Module, hidden_size: int) -> None:
    for norm_name, consumers in NORM_CONSUMERS.items():
        norm = getattr(block, norm_name, None)
        weight = getattr(norm, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.shape != (hidden_size,):
            raise AtvSparseError(f"{name}.{norm_name}: expected an RMSNorm with a ({hidden_size},) weight "
                                 f"(a Llama / Qwen2 decoder block), found {type(norm).__name__}")
        for consumer in consumers:
            try:
                linear = block.get_submodule(consumer)
            except AttributeError:
                linear = None
            if not isinstance(linear, nn.Linear) or linear.in_features != hidden_size:
                raise AtvSparseError(f"{name}.{consumer}: expected an nn.Linear with in_features={hidden_size} "
                                     f"fed by {norm_name}, found {type(linear).__name__}; the outlier transform "
                                     "needs a dense Llama / Qwen2 decoder block (not a pruned checkpoint)")


@torch.no_grad()
def add_outlier_channels(model: nn.Module, channels: int = DEFAULT_CHANNELS, scale: float = DEFAULT_SCALE,
                         seed: int = 0) -> OutlierTransform:
    """Scale ``channels`` hidden channels of every block's RMSNorms by ``scale`` and divide the matching
    input columns of the linears they feed by ``scale``, in place (see the module docstring).

    model: a Llama / Qwen2 causal LM, or a LLaVA / Qwen2-VL style model whose language model has
    such blocks (any dtype). The vision tower, projector, embeddings, final norm and lm_head are
    untouched. Returns what changed. A power-of-two ``scale`` keeps the outputs bit-identical.
    """
    if not (math.isfinite(scale) and scale > 0):
        raise AtvSparseError(f"`scale` must be a positive finite number, got {scale}")
    prefix, layers = _blocks(model)
    first_norm = getattr(getattr(layers[0], "input_layernorm", None), "weight", None)
    if not isinstance(first_norm, torch.Tensor) or first_norm.dim() != 1:
        raise AtvSparseError(f"{prefix}.0: no input_layernorm weight; the outlier transform needs Llama / Qwen2 blocks")
    hidden_size = first_norm.shape[0]
    for b, block in enumerate(layers):
        _check_block(f"{prefix}.{b}", block, hidden_size)
    chosen = choose_channels(hidden_size, channels, seed)
    index = torch.tensor(chosen)
    report = OutlierTransform(channels=chosen, scale=float(scale), seed=seed, norms=[], linears=[])
    for b, block in enumerate(layers):
        for norm_name, consumers in NORM_CONSUMERS.items():
            norm_weight = getattr(block, norm_name).weight
            norm_weight[index.to(norm_weight.device)] *= scale
            report.norms.append(f"{prefix}.{b}.{norm_name}")
            for consumer in consumers:
                weight = block.get_submodule(consumer).weight
                weight[:, index.to(weight.device)] /= scale
                report.linears.append(f"{prefix}.{b}.{consumer}")
    return report


def write_outlier_model(model_dir: str | Path, out_dir: str | Path, channels: int = DEFAULT_CHANNELS,
                        scale: float = DEFAULT_SCALE, seed: int = 0, overwrite: bool = False) -> OutlierTransform:
    """Load the dense checkpoint in ``model_dir``, transform it, and write it to ``out_dir``.

    The output is a normal Hugging Face directory (``save_pretrained`` in the checkpoint's dtype,
    the tokenizer / processor / chat template files copied) plus ``outliers.json`` saying what
    changed. It is written to a temporary directory beside ``out_dir`` and renamed into place
    only when complete (``formats.staging``).
    """
    from ..models import adapter_for, read_config

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    config = read_config(model_dir)
    if "quantization_config" in config:
        raise AtvSparseError(f"{model_dir}: a compressed checkpoint "
                             f"({config['quantization_config'].get('quant_method')}); give the dense model")
    check_output_dir(out_dir, overwrite, model_dir)  # before the model is loaded
    model = adapter_for(config, model_dir).load(model_dir)
    report = add_outlier_channels(model, channels, scale, seed)
    with StagedOutputDir(out_dir, overwrite, model_dir) as stage:
        model.save_pretrained(stage.tmp)
        copy_aux_files(model_dir, stage.tmp, own={"outliers.json"})
        (stage.tmp / "outliers.json").write_text(
            json.dumps({**report.to_json(), "source": str(model_dir)}, indent=2) + "\n")
        stage.commit()
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m atv_sparse.analysis.outliers",
                                description="Write a function-preserving copy of a Llama / Qwen2 / LLaVA / Qwen2-VL "
                                            "checkpoint with outlier input channels (RMSNorm weight x c, the input "
                                            "columns of the linears it feeds / c).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model_dir", metavar="MODEL_DIR", help="dense Hugging Face model directory")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--channels", type=int, default=DEFAULT_CHANNELS, help="number of hidden channels to scale")
    p.add_argument("--scale", type=float, default=DEFAULT_SCALE,
                   help="factor c; a power of two keeps the outputs bit-identical")
    p.add_argument("--seed", type=int, default=0, help="seed choosing the channels")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return p


# Parameter names (in the library's messages) -> this command's flags.
FLAGS = {"channels": "--channels", "scale": "--scale", "out_dir": "--out", "overwrite": "--overwrite"}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = write_outlier_model(args.model_dir, args.out, args.channels, args.scale, args.seed, args.overwrite)
    except AtvSparseError as e:
        print(f"error: {with_flags(str(e), FLAGS)}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: channels {report.channels} x {report.scale:g} in {len(report.norms)} norms, "
          f"{len(report.linears)} linears")
    return 0


if __name__ == "__main__":
    sys.exit(main())
