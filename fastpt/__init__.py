"""fastpt: fused kernels, models and recipes for pre-training and fine-tuning transformers.

Importing fastpt loads the compiled core (``fastpt._C``), which registers the
``torch.ops.fastpt.*`` operators; the public functions live in :mod:`fastpt.ops` and
the modules in :mod:`fastpt.nn`.
"""

from fastpt._loader import load_extension as _load_extension

_C = _load_extension()

from fastpt import nn, ops  # noqa: E402  (ops need _C loaded first)
from fastpt.nn.int8_linear import quantize_  # noqa: E402
from fastpt import patch  # noqa: E402  (callable: fastpt.patch(model) patches a transformers model)
from fastpt.patch import patch_bert, patch_gpt2, patch_llama, patch_t5, unpatch  # noqa: E402

__version__ = _C.build_info()["version"]


def build_info() -> dict:
    """How the extension was built: versions, CUDA kernels, CPU features and kernel build in use."""
    info = dict(_C.build_info())
    info["cpu_features"] = dict(_C.cpu_features())
    info["cpu_capability"] = _C.cpu_capability()
    return info


__all__ = ["build_info", "nn", "ops", "patch", "patch_bert", "patch_gpt2", "patch_llama", "patch_t5",
           "quantize_", "unpatch"]
