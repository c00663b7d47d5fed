"""RecycleGPT: fast LLM decoding with a recyclable module (Jiang et al., arXiv 2308.03421)."""

from .api import DEFAULT_MODEL, Generation, RecycleGPT
from .config import PRESETS, ModelConfig, RecycleConfig
from .decoding import DecodeResult, DecodeStats, recycle, standard
from .model import RecyclableModule, RecycleModel, Transformer
from .sampling import SamplingParams

__all__ = ["DEFAULT_MODEL", "Generation", "RecycleGPT", "PRESETS", "ModelConfig", "RecycleConfig", "DecodeResult",
           "DecodeStats", "recycle", "standard", "RecyclableModule", "RecycleModel", "Transformer", "SamplingParams"]
__version__ = "0.1.0"
