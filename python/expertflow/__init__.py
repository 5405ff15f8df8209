"""ExpertFlow: run Mixture-of-Experts models on a GPU far smaller than the model.

Every expert lives once in pinned host memory (:class:`ExpertPool`); the GPU holds a cache of expert
slots (:class:`ExpertCache`) fed by a copy engine that keeps host-to-device copies behind compute.
"""

from .runtime import POLICIES, ExpertCache, ExpertFlowError, ExpertPool, LayerSpec, TensorSpec, get_backend


def from_pretrained(*args, **kwargs):
    """Loads a local MoE checkpoint with offloaded experts; see :func:`expertflow.loader.from_pretrained`."""
    from .loader import from_pretrained as load

    return load(*args, **kwargs)


def enable_cuda_graphs(model, mode=None) -> None:
    """Decodes with the non-expert layers compiled and replayed as CUDA graphs; see
    :func:`expertflow.loader.enable_cuda_graphs`."""
    from .loader import enable_cuda_graphs as enable

    enable(model, mode)


def __getattr__(name: str):
    # The serving engine imports transformers' cache classes: loaded on first use.
    if name in ("Engine", "Request", "SamplingParams", "EngineError"):
        from . import serving

        return getattr(serving, name)
    raise AttributeError(f"module 'expertflow' has no attribute '{name}'")

__version__ = "0.1.0"

__all__ = [
    "POLICIES",
    "Engine",
    "EngineError",
    "ExpertCache",
    "ExpertFlowError",
    "ExpertPool",
    "LayerSpec",
    "Request",
    "SamplingParams",
    "TensorSpec",
    "enable_cuda_graphs",
    "from_pretrained",
    "get_backend",
    "__version__",
]
