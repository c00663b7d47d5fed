"""Export a recyclable module as an EAGLE-3 draft model that vLLM or SGLang load beside the base (docs/export.md).

Only a module of the eagle3 layout (`RecycleConfig(layout="eagle3", taps=(a, b, c))`) computes what the engines'
EAGLE-3 draft computes; its weights map one to one:

    module (eagle3 layout)               engines' EAGLE-3 draft
    fc (3d -> d) over the three taps     fc: `combine_hidden_states` of the captured hidden states
    layers.0 (Eagle3Block)               layers.0 (vLLM) / midlayer (SGLang): the first decoder layer
      emb_norm, hidden_norm                input_layernorm (on the embedding), hidden_norm (on the state)
      attn.wq, wk, wv (2d -> .), wo        self_attn.q_proj, k_proj, v_proj (reading [embedding; state]), o_proj
      mlp_norm, mlp.w1, w3, w2             post_attention_layernorm, mlp.gate_proj, up_proj, down_proj
    layers.i, i >= 1 (Block)             layers.i: input_layernorm, self_attn.*, post_attention_layernorm, mlp.*
    the base's final norm                norm
    the base's LM head (rows draft_ids)  lm_head (draft_vocab_size rows), with d2t / t2d for a draft vocabulary
    the base's token embedding           embed_tokens

This follows the engines' published sources, read for this module (none of their code is copied):

* vLLM, vllm/model_executor/models/llama_eagle3.py: `LlamaDecoderLayer.forward` (layer 0 concatenates
  input_layernorm(embeds) and hidden_norm(hidden_states), in that order, into a QKV projection of 2 * hidden_size
  inputs; the residual is the un-normed hidden state unless `norm_before_residual`), `LlamaModel.load_weights`
  ("midlayer." is read as "layers.0."; q/k/v and gate/up are stacked), `Eagle3LlamaForCausalLM.compute_logits`
  (draft logits scattered to target ids arange(N) + d2t, the rest -inf) and `.load_weights` ("d2t" becomes
  draft_id_to_target_id, "t2d" is skipped, names other than lm_head get "model.").
* vLLM, vllm/model_executor/models/llama.py: `LlamaModel.forward` captures `hidden_states + residual` before layer
  idx for idx in `aux_hidden_state_layers`, i.e. the output of layer idx - 1; `get_eagle3_aux_hidden_state_layers`
  defaults to (2, n // 2, n - 3). vllm/v1/worker/gpu_model_runner.py `_get_eagle3_aux_layers_from_config` reads
  the draft config's top-level `eagle_aux_hidden_state_layer_ids` (then eagle_config's) as those idx.
* vLLM, vllm/transformers_utils/configs/speculators/base.py `SpeculatorsConfig` and algos.py `update_eagle3`: a
  speculators config is `transformer_layer_config` plus draft_vocab_size, target_hidden_size,
  norm_before_residual (true when absent, so it is written) and eagle_aux_hidden_state_layer_ids, and needs
  speculators_config.proposal_methods[0].speculative_tokens and speculators_config.verifier.name_or_path; the
  format is that of the speculators project, src/speculators/models/eagle3/config.py `Eagle3SpeculatorConfig`.
* SGLang, python/sglang/srt/models/llama_eagle3.py: `LlamaForCausalLMEagle3` (one `midlayer`, lm_head of
  draft_vocab_size rows unless tie_word_embeddings, `load_weights` turning d2t into hot token ids d2t + arange)
  and python/sglang/srt/models/llama.py `set_eagle3_layers_to_capture`, which captures the inputs of layers
  [i + 1 for i in eagle_config.eagle_aux_hidden_state_layer_ids]: SGLang's ids are layer outputs, vLLM's layer
  inputs, so the two formats write different numbers for the same layers.

tests/test_export.py checks the files against a plain-PyTorch re-implementation of vLLM's forward.
"""

from __future__ import annotations

import json
from pathlib import Path

import safetensors.torch
import torch

from .models import RecycleModel
from .models.recyclable import Eagle3Block

FORMATS = ("vllm-eagle3", "sglang-eagle3")
CONFIG_STYLES = ("speculators", "plain")  # vLLM reads both; SGLang the plain one
FILES = ("config.json", "model.safetensors")
# Hugging Face ids of the built-in models, for the speculators config's verifier
VERIFIERS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class ExportError(ValueError):
    """The module cannot be written in the format asked for."""


def check_exportable(model: RecycleModel, fmt: str) -> None:
    """Raise ExportError (one line) unless `model`'s module can be written as `fmt`."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    cfg = model.module.cfg
    if cfg.layout != "eagle3":
        raise ExportError(f"{fmt} needs a module of the eagle3 layout (RecycleConfig(layout='eagle3', taps=...), "
                          f"retrofit --layout eagle3 --taps A,B,C); this module has the {cfg.layout!r} layout, whose "
                          f"fc maps concat(h_t, emb) to d before its first layer, which EAGLE-3's draft cannot compute")
    if fmt == "sglang-eagle3" and cfg.n_layer != 1:
        raise ExportError(f"sglang-eagle3 writes SGLang's one-layer EAGLE-3 draft (its midlayer); this module has "
                          f"{cfg.n_layer} layers: export it as vllm-eagle3")


def aux_layer_ids(model: RecycleModel, fmt: str) -> list[int]:
    """The config's eagle_aux_hidden_state_layer_ids for the module's taps (outputs of those base layers): vLLM
    captures the input of the layer it names (tap + 1), SGLang the output (tap)."""
    return [t + 1 for t in model.module.cfg.taps] if fmt == "vllm-eagle3" else list(model.module.cfg.taps)


def draft_token_ids(model: RecycleModel, vocab: str = "draft") -> torch.Tensor | None:
    """The draft vocabulary's token ids (increasing) the export's lm_head covers; None for the whole vocabulary
    (vocab "full", or a module without a draft vocabulary)."""
    if vocab not in ("draft", "full"):
        raise ExportError(f"vocab must be 'draft' or 'full', got {vocab!r}")
    ids = getattr(model.module, "draft_ids", None)
    return None if vocab == "full" or ids is None else ids.detach().to("cpu", torch.long)


def eagle3_tensors(model: RecycleModel, fmt: str, *, vocab: str = "draft", embed: bool = True,
                   dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """The draft's tensors by the engines' names: floating weights in `dtype`, d2t int64 and t2d bool."""
    check_exportable(model, fmt)
    module, base = model.module, model.base
    first = module.layers[0]
    assert isinstance(first, Eagle3Block)

    def block(prefix: str, b, norm_in: torch.Tensor) -> dict[str, torch.Tensor]:
        names = {"input_layernorm": norm_in, "self_attn.q_proj": b.attn.wq.weight,
                 "self_attn.k_proj": b.attn.wk.weight, "self_attn.v_proj": b.attn.wv.weight,
                 "self_attn.o_proj": b.attn.wo.weight, "post_attention_layernorm": b.mlp_norm.weight,
                 "mlp.gate_proj": b.mlp.w1.weight, "mlp.up_proj": b.mlp.w3.weight, "mlp.down_proj": b.mlp.w2.weight}
        return {f"{prefix}{name}.weight": w for name, w in names.items()}

    first_prefix = "layers.0." if fmt == "vllm-eagle3" else "midlayer."
    out = {"fc.weight": module.fc.weight, first_prefix + "hidden_norm.weight": first.hidden_norm.weight}
    out |= block(first_prefix, first, first.emb_norm.weight)
    for i, b in enumerate(module.layers[1:], start=1):
        out |= block(f"layers.{i}.", b, b.attn_norm.weight)
    ids = draft_token_ids(model, vocab)
    head = base.lm_head.weight
    out["norm.weight"] = base.norm.weight
    out["lm_head.weight"] = head if ids is None else head.detach().index_select(0, ids.to(head.device))
    if embed:
        out["embed_tokens.weight"] = base.tok_emb.weight
    # copies: views into fused matrices (fuse_projections) and tied weights are refused by safetensors
    out = {k: v.detach().to("cpu", dtype=dtype, copy=True).contiguous() for k, v in out.items()}
    if ids is not None:
        out["d2t"] = ids - torch.arange(ids.numel())  # target id = draft id + d2t[draft id]
        t2d = torch.zeros(base.cfg.vocab_size, dtype=torch.bool)
        t2d[ids] = True
        out["t2d"] = t2d
    return out


def _dtype_name(dtype: torch.dtype) -> str:
    names = {v: k for k, v in DTYPES.items()}
    if dtype not in names:
        raise ExportError(f"export dtype must be one of {', '.join(DTYPES)}, got {dtype}")
    return names[dtype]


def eagle3_config(model: RecycleModel, fmt: str, *, style: str | None = None, vocab: str = "draft",
                  verifier: str | None = None, speculative_tokens: int = 3,
                  dtype: torch.dtype = torch.bfloat16) -> dict:
    """config.json for the draft. style: "speculators" (vLLM's speculators format, the default for vllm-eagle3) or
    "plain" (a LLaMA config with architectures LlamaForCausalLMEagle3, which both engines read; the only one for
    sglang-eagle3). verifier: the base's name or path, recorded in a speculators config (where `vllm serve DRAFT`
    reads which base to load). speculative_tokens: the speculators config's proposal length (vLLM's default
    num_speculative_tokens for it)."""
    check_exportable(model, fmt)
    style = style or ("speculators" if fmt == "vllm-eagle3" else "plain")
    if style not in CONFIG_STYLES:
        raise ExportError(f"unknown config style {style!r}; choose one of {', '.join(CONFIG_STYLES)}")
    if fmt == "sglang-eagle3" and style != "plain":
        raise ExportError("sglang-eagle3 writes the plain config (SGLang's LlamaForCausalLMEagle3)")
    if not isinstance(speculative_tokens, int) or speculative_tokens < 1:
        raise ExportError(f"speculative_tokens must be an integer >= 1, got {speculative_tokens!r}")
    cfg, rcfg = model.base.cfg, model.module.cfg
    ids = draft_token_ids(model, vocab)
    draft_vocab = cfg.vocab_size if ids is None else int(ids.numel())
    layer = {
        "model_type": "llama", "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff, "num_hidden_layers": rcfg.n_layer, "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.context_length, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "rope_scaling": None, "attention_bias": False, "mlp_bias": False,
        # the draft's head is its own tensor (of the draft vocabulary's rows), never its embedding
        "tie_word_embeddings": False, "torch_dtype": _dtype_name(dtype),
    }
    aux = aux_layer_ids(model, fmt)
    eagle = {"draft_vocab_size": draft_vocab, "target_hidden_size": cfg.d_model, "norm_before_residual": False}
    if style == "plain":
        config = {"architectures": ["LlamaForCausalLMEagle3"], **layer, **eagle}
        if fmt == "vllm-eagle3":
            config["eagle_aux_hidden_state_layer_ids"] = aux
        else:
            config["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": aux, "use_aux_hidden_state": True}
        return config
    return {
        "architectures": ["Eagle3Speculator"], "speculators_model_type": "eagle3",
        "transformer_layer_config": {"architectures": ["LlamaForCausalLM"], **layer}, **eagle,
        "eagle_aux_hidden_state_layer_ids": aux, "torch_dtype": _dtype_name(dtype),
        "speculators_config": {
            "algorithm": "eagle3", "default_proposal_method": "greedy",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": speculative_tokens,
                                  "accept_tolerance": 0.0, "verifier_accept_k": 1}],
            "verifier": {"name_or_path": verifier, "architectures": ["LlamaForCausalLM"]},
        },
    }


def default_verifier(model: str | Path | None) -> str | None:
    """The base a speculators config names, from --model: a built-in name's Hugging Face id, a Hugging Face
    folder's path, a RecycleGPT checkpoint's base ref (resolved the same way); else None."""
    if model is None:
        return None
    name = str(model)
    if name in VERIFIERS:
        return VERIFIERS[name]
    path = Path(name)
    if (path / "recycle.json").is_file():
        try:
            ref = json.loads((path / "recycle.json").read_text()).get("base", {}).get("ref")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            return None
        return default_verifier(ref) if ref else None
    if (path / "config.json").is_file():
        return str(path.resolve())
    return None


def export_eagle3(model: RecycleModel, out_dir: str | Path, *, fmt: str = "vllm-eagle3", style: str | None = None,
                  vocab: str = "draft", verifier: str | None = None, speculative_tokens: int = 3,
                  embed: bool = True, dtype: torch.dtype = torch.bfloat16, force: bool = False) -> Path:
    """Write config.json and model.safetensors of the EAGLE-3 draft into out_dir (created; its two files are
    replaced only with force). Returns out_dir. Raises ExportError for a module the format cannot hold."""
    config = eagle3_config(model, fmt, style=style, vocab=vocab, verifier=verifier,
                           speculative_tokens=speculative_tokens, dtype=dtype)
    tensors = eagle3_tensors(model, fmt, vocab=vocab, embed=embed, dtype=dtype)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir} exists and is not a directory")
    existing = [f for f in FILES if (out_dir / f).exists()]
    if existing and not force:
        raise ExportError(f"{out_dir} already holds {', '.join(existing)} (pass force to replace them)")
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / ".model.safetensors.tmp"
    safetensors.torch.save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(out_dir / "model.safetensors")
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out_dir
