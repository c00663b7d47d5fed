"""Configs: the LLaMA-family base (`ModelConfig`), the recyclable module (`RecycleConfig`) and which fused kernels
inference runs (`KernelConfig`).

Each is a frozen dataclass validated in `__post_init__`; the architecture configs serialise to and from JSON-ready
dicts. Runtime sizes (batch, cache length) are not architecture and live with the caller. `PRESETS` names the shapes
the project uses.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

HiddenSource = Literal["pre_norm", "post_norm"]
Layout = Literal["recycle", "eagle3"]
LAYOUTS = ("recycle", "eagle3")


class ConfigError(ValueError):
    """A config value is out of range or inconsistent."""


def _from_dict(cls, d: dict[str, Any]):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown field(s) {unknown}; known: {sorted(names)}")
    return cls(**d)


@dataclass(frozen=True)
class ModelConfig:
    """A LLaMA-family decoder: RMSNorm, rotary embeddings, SwiGLU MLP, grouped-query attention."""

    vocab_size: int
    n_layer: int
    n_head: int
    n_kv_head: int
    d_model: int
    d_ff: int
    context_length: int = 2048  # the positions the model was trained for; a cache may not exceed it
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_layer", "n_head", "n_kv_head", "d_model", "d_ff", "context_length"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.n_head:
            raise ConfigError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ConfigError(f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.rope_theta <= 0 or self.norm_eps <= 0:
            raise ConfigError("rope_theta and norm_eps must be positive")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        return _from_dict(cls, d)


@dataclass(frozen=True)
class RecycleConfig:
    """The recyclable module: concat(h_t, emb(x_{t+1})) -> Linear(2d, d) -> n_layer decoder layers.

    Its layers have the base's width, heads and MLP size; its output goes through the base's final norm and
    LM head (shared) to predict x_{t+2}.

    hidden: which h_t the module reads. "pre_norm" is the last decoder layer's output; "post_norm" is that after
        the base's final RMSNorm (what the LM head sees).
    input_norm: RMS-normalise h_t and the token embedding separately before the linear map (as DeepSeek-V3's
        MTP module does), which puts the two halves on one scale.
    taps: base layers (0-based) whose outputs at position t the module also reads, as EAGLE-3 fuses low, middle
        and high-level features: h_t becomes h_t + W [norm(tap_1); ...; norm(tap_k)], W (k*d -> d) initialised to
        zero, so that a module trained without taps is where training with them starts. Empty: h_t alone.
    draft_vocab: when > 0, the module drafts for the lossless strategies over this many token ids only (its
        `draft_ids`, the most frequent in its training data; `scripts/draft_vocab.py` adds them): the LM head over
        them is that much cheaper, and verification keeps the output exact. Lossy `recycle`, scoring and training
        use the whole vocabulary. 0: the whole vocabulary everywhere.
    layout: how the module fuses its inputs. "recycle" (the default) is the form above. "eagle3" is EAGLE-3's draft
        layer, so that vLLM and SGLang can run the module (`recyclegpt export`, docs/export.md): the state is
        s_t = fc([tap_1; tap_2; tap_3]) (3d -> d, no norms, h_t not read), and the first decoder layer's attention
        reads concat(norm(emb(x_{t+1})), norm(s_t)) (2d wide) with s_t as its residual; the other layers are
        standard. It needs exactly three `taps`, none of them the base's last layer (the engines read a layer's
        output as the next layer's input); `eagle3_taps(n)` gives the engines' default choice. `hidden` and
        `input_norm` keep their defaults there (the layout has its own norms and does not read h_t).
    Defaults were chosen by measurement: see docs/design.md.
    """

    n_layer: int = 1
    hidden: HiddenSource = "pre_norm"
    input_norm: bool = True
    taps: tuple[int, ...] = ()
    draft_vocab: int = 0
    layout: Layout = "recycle"

    def __post_init__(self) -> None:
        if self.n_layer <= 0:
            raise ConfigError(f"RecycleConfig.n_layer must be positive, got {self.n_layer}")
        if self.hidden not in ("pre_norm", "post_norm"):
            raise ConfigError(f"RecycleConfig.hidden must be 'pre_norm' or 'post_norm', got {self.hidden!r}")
        taps = tuple(self.taps)  # JSON gives a list
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in taps):
            raise ConfigError(f"RecycleConfig.taps must be base layer indices (integers >= 0), got {self.taps!r}")
        if list(taps) != sorted(set(taps)):
            raise ConfigError(f"RecycleConfig.taps must be increasing and distinct, got {self.taps!r}")
        object.__setattr__(self, "taps", taps)
        if not isinstance(self.draft_vocab, int) or self.draft_vocab < 0:
            raise ConfigError(f"RecycleConfig.draft_vocab must be an integer >= 0, got {self.draft_vocab!r}")
        if self.layout not in LAYOUTS:
            raise ConfigError(f"RecycleConfig.layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        if self.layout == "eagle3":
            if len(taps) != 3:
                raise ConfigError(f"RecycleConfig.layout 'eagle3' reads exactly three base layers (taps=(low, middle, "
                                  f"high); eagle3_taps(n_layer) gives vLLM's default), got taps={taps!r}")
            if self.hidden != "pre_norm" or not self.input_norm:
                raise ConfigError("RecycleConfig.layout 'eagle3' has its own input norms and does not read h_t: "
                                  "leave hidden='pre_norm' and input_norm=True")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RecycleConfig":
        return _from_dict(cls, d)


def eagle3_taps(n_layer: int) -> tuple[int, int, int]:
    """vLLM's and SGLang's default EAGLE-3 layers for a base of n_layer layers, as `RecycleConfig.taps` (layer
    outputs, 0-based): the engines capture the inputs of layers (2, n//2, n-3), which are the outputs of layers
    (1, n//2 - 1, n - 4). SmolLM2-135M (30 layers): (1, 14, 26)."""
    if n_layer < 7:  # fewer layers give a repeated layer
        raise ConfigError(f"EAGLE-3's default layers need a base of at least 7 layers, got {n_layer}; pick three taps")
    return 1, n_layer // 2 - 1, n_layer - 4


PRESETS: dict[str, ModelConfig] = {
    # for unit tests: a few thousand parameters
    "tiny": ModelConfig(vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=64, context_length=256),
    # the CPU joint-training experiment (about 15 minutes on two cores)
    "gutenberg-small": ModelConfig(
        vocab_size=8192, n_layer=4, n_head=4, n_kv_head=2, d_model=256, d_ff=688, context_length=256
    ),
    # SmolLM2-135M, as read from its GGUF
    "smollm2-135m": ModelConfig(
        vocab_size=49152, n_layer=30, n_head=9, n_kv_head=3, d_model=576, d_ff=1536,
        context_length=8192, rope_theta=100000.0, norm_eps=1e-5, tie_embeddings=True,
    ),
}


CPU_PRODUCTS = ("auto", "linear", "transposed")  # KernelConfig.cpu_products


@dataclass(frozen=True)
class KernelConfig:
    """Which fused kernels a model's inference calls take where they apply (`Transformer.kernels`). The defaults are
    the measured winners (docs/engine.md's decision table); turning one off runs the torch operators it replaces,
    which is what every call on the CPU, without triton, or outside a kernel's shapes runs anyway. Set it before
    decoding: captured graphs and compiled steps keep the paths they were made with.

    fused_linear: a decode call's products as Triton kernels with the norms, rotary embedding, SwiGLU and residual
        adds folded in (triton_linear), for models no wider than model.FUSED_MAX_WIDTH.
    cached_attention: on that path, the cache write and the attention as one kernel (triton_attention).
    decode_attention: cached calls on few new tokens attend with triton_attention.decode_attention, not SDPA.
    draft_head: the draft tree's norm, head and first top-k selection as one kernel (triton_draft_head).
    pdl: programmatic dependent launch between the fused kernels (Hopper and later; ignored elsewhere).
    cuda_paths_on_cpu: CPU tensors take the CUDA paths too (the Triton kernels, only under Triton's interpreter;
        the sort-free top-k and the split argmax of decoding/topk.py), for tests that check those paths without a GPU.
    cpu_products: how float32 products of at most `model.FEW_ROWS` rows run on the CPU without autograd (a decode
        step, a verification, a draft tree): "linear" (F.linear), "transposed" ((W @ x.T).T, BLAS's tall product,
        a single row doubled), or "auto": whichever of the two this CPU runs faster, measured once per process
        (`model.transposed_faster`). The BLAS libraries' few-row paths differ by CPU by up to 3x either way
        (docs/cpu.md); the two forms sum the same dot products in different orders.
    """

    fused_linear: bool = True
    cached_attention: bool = True
    decode_attention: bool = True
    draft_head: bool = True
    pdl: bool = True
    cuda_paths_on_cpu: bool = False
    cpu_products: str = "auto"

    def __post_init__(self) -> None:
        if self.cpu_products not in CPU_PRODUCTS:
            raise ValueError(f"cpu_products must be one of {', '.join(CPU_PRODUCTS)}, got {self.cpu_products!r}")

    @classmethod
    def torch_only(cls) -> "KernelConfig":
        """Every Triton kernel off: the torch operators alone (cuBLAS, SDPA)."""
        return cls(fused_linear=False, cached_attention=False, decode_attention=False, draft_head=False)
