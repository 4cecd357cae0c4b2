"""torch_moe: Mixture-of-Experts layers for PyTorch on C++ custom ops (torch.ops.torch_moe.*)."""

from __future__ import annotations

import torch

try:
    from . import _build_info
except ImportError as err:  # the source tree, not an installed build: _build_info.py is written by the build
    raise ImportError(
        f"torch_moe is imported from {__path__[0]}, which holds no build of the extension ({err}). Either build it "
        "there (pip install --no-build-isolation -e .) or run Python from outside the repository so that the "
        "installed torch_moe is imported."
    ) from None


def _load_extension():
    if _build_info.TORCH_VERSION != torch.__version__:
        raise ImportError(
            f"torch_moe was built against torch {_build_info.TORCH_VERSION} but torch {torch.__version__} is "
            "installed; rebuild it against the installed torch: pip install --no-build-isolation --force-reinstall ."
        )
    try:
        from . import _C
    except ImportError as err:
        raise ImportError(
            f"torch_moe._C failed to load ({err}); it was built against torch {_build_info.TORCH_VERSION} and "
            f"torch {torch.__version__} is installed: rebuild with pip install --no-build-isolation ."
        ) from err
    return _C


_C = _load_extension()

from . import _fake  # noqa: E402  (fake kernels need the op schemas that _C registers)
from . import ops  # noqa: E402
from . import distributed  # noqa: E402
from . import losses  # noqa: E402
from . import memory  # noqa: E402
from . import routing  # noqa: E402
from . import dispatch  # noqa: E402
from .experts import Experts  # noqa: E402
from .layer import MoE, MoEStats, aux_loss  # noqa: E402
from . import parallel  # noqa: E402
from .convert import moefy  # noqa: E402
from .diagnostics import MoETracker  # noqa: E402
from .routing import Router  # noqa: E402
from .soft_moe import SoftMoE  # noqa: E402
from . import surgery  # noqa: E402
from .surgery import expert_importance, merge_experts, prune_experts  # noqa: E402

__version__ = "0.1.0"


def build_info() -> dict:
    """How the loaded extension was built: torch version, CUDA kernels in or not, CUDA archs."""
    return {
        "torch_version": _C.torch_version(),
        "with_cuda": _C.with_cuda(),
        "cuda_arch_list": _C.cuda_arch_list(),
        "cuda_runtime_version": _C.cuda_runtime_version(),
    }


__all__ = ["MoE", "SoftMoE", "Router", "Experts", "MoEStats", "MoETracker", "moefy", "aux_loss", "ops", "losses",
           "memory", "routing", "dispatch", "distributed", "parallel", "surgery", "expert_importance", "prune_experts",
           "merge_experts", "build_info"]
