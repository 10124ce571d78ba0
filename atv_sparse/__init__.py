"""atv-sparse: prune LLMs and vision-language models to 2:4, 4:8 or unstructured sparsity, write a
compressed checkpoint, and run it.

Importing this package registers the ``atv_sparse`` quantization method with ``transformers``, so
``AutoModelForCausalLM.from_pretrained(dir)`` loads a compressed checkpoint; import it first.
"""

__version__ = "0.1.0"

from .errors import AtvSparseError  # noqa: E402
from .nn import SparseLinear, load  # noqa: E402
from .nn.hf_quantizer import register as _register_hf_quantizer  # noqa: E402
from .patterns import Pattern, parse_pattern  # noqa: E402

_register_hf_quantizer()

__all__ = ["AtvSparseError", "Pattern", "SparseLinear", "__version__", "load", "parse_pattern"]
