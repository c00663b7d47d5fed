"""RecycleGPT: fast LLM decoding with a recyclable module (Jiang et al., arXiv 2308.03421)."""

from .api import DEFAULT_MODEL, EngineOptions, Generation, RecycleGPT
from .config import PRESETS, KernelConfig, ModelConfig, RecycleConfig
from .decoding.loops import DecodeResult, DecodeStats, recycle, standard
from .decoding.sampling import SamplingParams
from .loading import load
from .models import RecyclableModule, RecycleModel, Transformer

__all__ = ["DEFAULT_MODEL", "EngineOptions", "Generation", "RecycleGPT", "PRESETS", "KernelConfig", "ModelConfig",
           "RecycleConfig", "load", "DecodeResult", "DecodeStats", "recycle", "standard", "RecyclableModule",
           "RecycleModel", "Transformer", "SamplingParams"]
__version__ = "0.1.0"
