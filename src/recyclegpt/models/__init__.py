"""The models: the LLaMA-family base (`transformer`), the recyclable module with the pair (`recyclable`), and
weight-only int8 products on the CPU (`quantize`)."""

from .quantize import Int8Weight, quantize_int8_
from .recyclable import RECYCLE_VOCABS, RecyclableModule, RecycleModel
from .transformer import (
                          FEW_ROWS,
                          FOLD_MAX_TOKENS,
                          FUSED_MAX_WIDTH,
                          MLP,
                          Attention,
                          Block,
                          KVCache,
                          Linear,
                          ModelOutput,
                          RMSNorm,
                          Tables,
                          Transformer,
                          Tree,
                          apply_rotary,
                          attention_mask,
                          call_tables,
                          fuse_projections,
                          fused_linear_fits,
                          init_weights,
                          linear,
                          prefill_attention,
                          rotary,
                          round_up,
                          run_blocks,
                          transposed_faster,
                          use_cached_attention,
                          use_decode_kernel,
                          use_draft_head_kernel,
                          use_fused_linear,
)

__all__ = ["Int8Weight", "quantize_int8_", "RECYCLE_VOCABS", "RecyclableModule", "RecycleModel", "FEW_ROWS",
           "FOLD_MAX_TOKENS", "FUSED_MAX_WIDTH",
           "MLP", "Attention", "Block", "KVCache", "Linear", "ModelOutput", "RMSNorm", "Tables", "Transformer", "Tree",
           "apply_rotary", "attention_mask", "call_tables", "fuse_projections", "fused_linear_fits", "init_weights",
           "linear", "prefill_attention", "rotary", "round_up", "run_blocks", "use_cached_attention",
           "use_decode_kernel", "use_draft_head_kernel", "use_fused_linear", "transposed_faster"]
