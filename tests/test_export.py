"""The EAGLE-3 export (recyclegpt.export) and the module layout it needs (RecycleConfig(layout="eagle3")).

`EngineDraft` re-implements, in plain PyTorch, the EAGLE-3 draft forward that vLLM publishes in
vllm/model_executor/models/llama_eagle3.py (`LlamaDecoderLayer.forward`: layer 0 concatenates
input_layernorm(embeds) and hidden_norm(hidden_states) into a 2d-wide QKV projection, the un-normed hidden state is
the residual, vLLM's RMSNorm adds the residual before norming; `LlamaModel.forward` ends with norm(hidden, residual)
and returns the normed and the pre-norm states; `Eagle3LlamaForCausalLM.combine_hidden_states` is fc,
`compute_logits` scatters the draft vocabulary's logits to arange(N) + d2t, the rest -inf; `load_weights` reads
"midlayer." as "layers.0.", skips t2d and stacks q/k/v), the config handling of
vllm/transformers_utils/configs/speculators/ (base.py `SpeculatorsConfig.extract_transformers_pre_trained_config`,
algos.py `update_eagle3`, where norm_before_residual defaults to true), and the target's capture of
vllm/model_executor/models/llama.py (`hidden_states + residual` before layer idx, for idx in the draft config's
`eagle_aux_hidden_state_layer_ids`: the output of layer idx - 1). Its SGLang variant reads what
python/sglang/srt/models/llama_eagle3.py loads (`midlayer`, hot token ids d2t + arange) and captures as
python/sglang/srt/models/llama.py `set_eagle3_layers_to_capture` does ([i + 1 for i in eagle_config's ids]). The
engine's drafting loop (vllm/v1/spec_decode/eagle.py) feeds token x_{t+1} at the position of h_t, then each draft
at the next position with the pre-norm output as the next hidden state.

The target here is transformers' LlamaForCausalLM with the base's weights (output_hidden_states[j] is the input of
layer j, what vLLM captures), so the layer indices are checked against a model that is not the project's.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from test_speculative import prompts_for

import recyclegpt.models.transformer as transformer_mod
from recyclegpt.cli.main import build_parser, main
from recyclegpt.config import PRESETS, ConfigError, RecycleConfig, eagle3_taps
from recyclegpt.decoding.engine import Engine
from recyclegpt.decoding.loops import standard
from recyclegpt.decoding.sampling import SamplingParams
from recyclegpt.decoding.speculative import ModuleDrafter, Round
from recyclegpt.decoding.strategies import get, names, reference_decode
from recyclegpt.evals.hf_baselines import to_hf_llama
from recyclegpt.export import ExportError, eagle3_config, export_eagle3
from recyclegpt.loading.checkpoint import load_module, save_checkpoint
from recyclegpt.models import ModelOutput, RecyclableModule, RecycleModel
from recyclegpt.training.data import train_bpe
from recyclegpt.training.objectives import recycle_losses
from recyclegpt.training.train import add_draft_vocab

CFG = dataclasses.replace(PRESETS["tiny"], n_layer=6, rope_theta=100000.0)
TAPS = (0, 2, 3)  # uneven, so that an index off by one reads other layers


def eagle3_model(seed: int = 0, *, n_layer: int = 2, draft: int | None = 40, cfg=CFG) -> RecycleModel:
    """A random pair with an eagle3-layout module: every norm gain random (so that swapped norms show), a sharp
    head (argmax far from ties) and, with `draft`, a draft vocabulary of that many random ids."""
    torch.manual_seed(seed)
    model = RecycleModel.build(cfg, RecycleConfig(n_layer=n_layer, taps=TAPS, layout="eagle3")).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
        model.base.tok_emb.weight.mul_(30.0)  # tied with the head
        model.module.fc.weight.mul_(5.0)
    if draft:
        ids = torch.randperm(cfg.vocab_size)[:draft]
        model = RecycleModel(model.base, add_draft_vocab(model.module, ids)).eval()
    return model


# -- a plain-PyTorch EAGLE-3 draft, as the engines compute it ------------------------------------------------------


def rms_norm(x, w, eps, residual=None):
    """vLLM's RMSNorm (forward_native): with a residual, the sum is both normed and returned as the new residual."""
    if residual is not None:
        x = x + residual
        residual = x
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w
    return y if residual is None else (y, residual)


def neox_rope(x, positions, theta):
    """vLLM's get_rope for LLaMA (neox style: the two halves of each head rotate together). x (T, H, D)."""
    D = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, D, 2, dtype=torch.float) / D))
    freqs = positions.float()[:, None] * inv_freq
    cos, sin = freqs.cos()[:, None], freqs.sin()[:, None]
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class EngineDraft:
    """The exported draft as vLLM (engine="vllm") or SGLang (engine="sglang") loads and runs it, one sequence."""

    def __init__(self, folder, engine: str = "vllm"):
        config = json.loads((folder / "config.json").read_text())
        # vLLM's get_config takes a config without model_type that has speculators_config as the speculators format
        if config.get("model_type") is None and config.get("speculators_config") is not None:
            # SpeculatorsConfig.extract_transformers_pre_trained_config + update_eagle3
            assert engine == "vllm" and config["speculators_model_type"] == "eagle3"
            spec = config["speculators_config"]
            assert spec["proposal_methods"][0]["speculative_tokens"] >= 1 and "name_or_path" in spec["verifier"]
            c = dict(config["transformer_layer_config"])
            c["draft_vocab_size"] = config.get("draft_vocab_size")
            c["norm_before_residual"] = config.get("norm_before_residual", True)
            if config.get("target_hidden_size") is not None:
                c["target_hidden_size"] = config["target_hidden_size"]
            c["eagle_aux_hidden_state_layer_ids"] = config.get("eagle_aux_hidden_state_layer_ids")
            c["architectures"] = ["Eagle3LlamaForCausalLM"]
        else:
            c = config
            assert c["architectures"] == ["LlamaForCausalLMEagle3"]
        assert c["model_type"] == "llama" and not c["tie_word_embeddings"] and c["hidden_act"] == "silu"
        self.c = c
        self.eps, self.theta = c["rms_norm_eps"], c["rope_theta"]
        self.H, self.Hkv = c["num_attention_heads"], c["num_key_value_heads"]
        self.D = c.get("head_dim") or c["hidden_size"] // self.H
        self.norm_before_residual = bool(c.get("norm_before_residual", False))
        if engine == "vllm":  # gpu_model_runner._get_eagle3_aux_layers_from_config: top level, then eagle_config
            ids = c.get("eagle_aux_hidden_state_layer_ids") or (c.get("eagle_config") or {}).get(
                "eagle_aux_hidden_state_layer_ids")
            self.capture = list(ids)
        else:  # SGLang: model_runner reads eagle_config's ids, llama.py captures the inputs of layers id + 1
            self.capture = [i + 1 for i in c["eagle_config"]["eagle_aux_hidden_state_layer_ids"]]
        w = safetensors.torch.load_file(str(folder / "model.safetensors"))
        N, V = c["draft_vocab_size"], c["vocab_size"]
        if engine == "vllm":  # Eagle3LlamaForCausalLM.load_weights
            w = {k.replace("midlayer.", "layers.0."): v for k, v in w.items() if "t2d" not in k}
            self.targets = torch.arange(N) + w.pop("d2t", torch.zeros(N, dtype=torch.long))
        else:  # LlamaForCausalLMEagle3.load_weights: d2t gives the hot token ids, t2d is skipped; one midlayer
            assert not any(k.startswith("layers.") for k in w)
            w = {k.replace("midlayer.", "layers.0."): v for k, v in w.items() if "t2d" not in k}
            d2t = w.pop("d2t", None)
            self.targets = torch.arange(N) if d2t is None else d2t + torch.arange(d2t.shape[0])
        self.w, self.V, self.N = w, V, N
        self.n_layer = c["num_hidden_layers"]
        assert w["lm_head.weight"].shape == (N, c["hidden_size"])
        assert w["fc.weight"].shape == (c["hidden_size"], 3 * c.get("target_hidden_size", c["hidden_size"]))
        assert w["layers.0.self_attn.q_proj.weight"].shape[1] == 2 * c["hidden_size"]
        self.kv = None

    def combine(self, aux: torch.Tensor) -> torch.Tensor:
        """combine_hidden_states: the captured hidden states, side by side (T, 3d), through fc."""
        return F.linear(aux, self.w["fc.weight"])

    def _attention(self, i, x, positions):
        p = f"layers.{i}.self_attn."
        qkv = F.linear(x, torch.cat([self.w[p + n + "_proj.weight"] for n in "qkv"]))  # QKVParallelLinear
        q, k, v = qkv.split((self.H * self.D, self.Hkv * self.D, self.Hkv * self.D), dim=-1)
        T = x.shape[0]
        q = neox_rope(q.view(T, self.H, self.D), positions, self.theta)
        k = neox_rope(k.view(T, self.Hkv, self.D), positions, self.theta)
        v = v.view(T, self.Hkv, self.D)
        if self.kv[i] is not None:  # the draft's KV cache: earlier positions
            k, v = torch.cat((self.kv[i][0], k)), torch.cat((self.kv[i][1], v))
        self.kv[i] = (k, v)
        g = self.H // self.Hkv
        q, k, v = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
        # a new block of T queries sees every cached position and, causally, its own block
        S = k.shape[2]
        mask = torch.ones(T, S, dtype=torch.bool).tril(S - T)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None if T == 1 else mask)
        return F.linear(y[0].transpose(0, 1).reshape(T, self.H * self.D), self.w[p + "o_proj.weight"])

    def forward(self, input_ids, positions, hidden):
        """LlamaModel.forward: (normed output, pre-norm output), each (T, d)."""
        if self.kv is None:
            self.kv = [None] * self.n_layer
        w, eps = self.w, self.eps
        embeds = F.embedding(input_ids, w["embed_tokens.weight"])
        residual = None
        for i in range(self.n_layer):
            p = f"layers.{i}."
            if i == 0:
                embeds = rms_norm(embeds, w[p + "input_layernorm.weight"], eps)
                if self.norm_before_residual:
                    hidden = rms_norm(hidden, w[p + "hidden_norm.weight"], eps)
                    residual = hidden
                else:
                    residual = hidden
                    hidden = rms_norm(hidden, w[p + "hidden_norm.weight"], eps)
                hidden = torch.cat((embeds, hidden), dim=-1)
            else:
                hidden, residual = rms_norm(hidden, w[p + "input_layernorm.weight"], eps, residual)
            hidden = self._attention(i, hidden, positions)
            hidden, residual = rms_norm(hidden, w[p + "post_attention_layernorm.weight"], eps, residual)
            gate, up = F.linear(hidden, torch.cat((w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"]))
                                ).chunk(2, dim=-1)
            hidden = F.linear(F.silu(gate) * up, w[p + "mlp.down_proj.weight"])
        return rms_norm(hidden, w["norm.weight"], eps, residual)

    def compute_logits(self, normed):
        """Draft logits over the target vocabulary: arange(N) + d2t get the draft head's logits, the rest -inf."""
        logits = F.linear(normed, self.w["lm_head.weight"])
        full = logits.new_full((*logits.shape[:-1], self.V), float("-inf"))
        full[..., self.targets] = logits
        return full

    def propose(self, aux, prompt, next_token, k):
        """The engine's chain: the draft over the prompt's positions (token t+1 at position t), then k - 1 steps on
        its own tokens and pre-norm outputs. Returns the k draft tokens and their logits (k, V)."""
        self.kv = None
        L = len(prompt)
        ids = torch.tensor(prompt[1:] + [next_token])
        normed, pre = self.forward(ids, torch.arange(L), self.combine(aux))
        logits = [self.compute_logits(normed[-1])]
        tokens = [int(logits[-1].argmax())]
        for j in range(1, k):
            normed, pre = self.forward(torch.tensor([tokens[-1]]), torch.tensor([L - 1 + j]), pre[-1:])
            logits.append(self.compute_logits(normed[-1]))
            tokens.append(int(logits[-1].argmax()))
        return tokens, torch.stack(logits)


def target_aux(hf, prompt, capture):
    """The target's captured hidden states (L, 3d) and its next token: transformers' hidden_states[j] is the input of
    layer j (0: the embeddings), which is what vLLM captures for id j."""
    out = hf(torch.tensor([prompt]), output_hidden_states=True)
    return torch.cat([out.hidden_states[j][0] for j in capture], dim=-1), int(out.logits[0, -1].argmax())


@pytest.fixture
def exact_products(monkeypatch):
    """A reordering of sums the project makes on the CPU, turned off so that its results are bit for bit those of
    plain operators: cached attention's folding of a group's query heads into rows (`attention_mask`; off, K and V
    repeated per head). The few-row products take F.linear through the model's KernelConfig (the test sets it)."""
    monkeypatch.setattr(transformer_mod, "FOLD_MAX_TOKENS", 0)


# -- the export against the engines' forward -----------------------------------------------------------------------


CASES = {  # format, config style, module layers, draft vocabulary
    "vllm-speculators": ("vllm-eagle3", "speculators", 2, 40),
    "vllm-plain": ("vllm-eagle3", "plain", 1, 40),
    "vllm-full-vocab": ("vllm-eagle3", "speculators", 1, None),
    "sglang": ("sglang-eagle3", "plain", 1, 40),
}


@pytest.mark.parametrize("case", CASES)
@torch.no_grad()
def test_the_engines_draft_equals_the_module(case, tmp_path, exact_products):
    fmt, style, n_layer, draft = CASES[case]
    model = eagle3_model(1, n_layer=n_layer, draft=draft)
    model.kernels = dataclasses.replace(model.kernels, cpu_products="linear")  # plain products, bit for bit
    export_eagle3(model, tmp_path, fmt=fmt, style=style, verifier="tiny-base", dtype=torch.float32)
    ref = EngineDraft(tmp_path, "vllm" if fmt == "vllm-eagle3" else "sglang")
    assert ref.capture == [t + 1 for t in TAPS]  # the inputs of the layers after the taps
    if draft:  # d2t maps the draft head's rows to the module's draft ids; t2d marks them
        assert torch.equal(ref.targets, model.module.draft_ids)
        t2d = safetensors.torch.load_file(str(tmp_path / "model.safetensors"))["t2d"]
        assert t2d.dtype == torch.bool and torch.equal(t2d.nonzero()[:, 0], model.module.draft_ids)
    else:
        assert torch.equal(ref.targets, torch.arange(CFG.vocab_size))
    model.refresh_draft_head()
    hf = to_hf_llama(model.base)
    for prompt in prompts_for(5, 3) + [[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]]:
        aux, x_L = target_aux(hf, prompt, ref.capture)
        L = len(prompt)
        # the taps the project reads are the layers the engine captures
        full = model.base(torch.tensor([prompt]), taps=model.taps)
        torch.testing.assert_close(full.taps[0], aux, rtol=1e-5, atol=1e-5)
        assert x_L == int(full.logits[0, -1].argmax())
        # one pass over the prompt on the same captured states: the draft logits are equal, bit for bit
        state = model.state(ModelOutput(full.logits, full.hidden, aux[None]))
        ids = torch.tensor([prompt[1:] + [x_L]])
        got = model.recycle(state, ids, draft=True)
        ref.kv = None
        normed, pre = ref.forward(ids[0], torch.arange(L), ref.combine(aux))
        assert torch.equal(got.logits[0], ref.compute_logits(normed)), prompt
        assert torch.equal(got.hidden[0], pre)
        # a chain of drafts as the project's drafter makes them after the prompt, and as the engine does
        taps = []
        state_of = model.state
        model.state = lambda out: taps.append(out.taps) or state_of(out)
        k = 4
        r = Round(model, [prompt], max_new_tokens=k + 2, extra_slots=k + 1, name="chain",
                  sampling=SamplingParams(), stop_ids=(), stream=None)
        r.prefill()
        del model.state
        assert int(r.pending[0]) == x_L
        logits_seen = []
        recycle = model.recycle

        def recording(*a, **kw):
            out = recycle(*a, **kw)
            logits_seen.append(out.logits[0, -1])
            return out

        model.recycle = recording
        try:
            tokens, _ = ModuleDrafter(r).draft(k)
        finally:
            del model.recycle
        # on the taps the project's base computed (transformers' differ from them in the last bits)
        want, want_logits = ref.propose(taps[0][0], prompt, x_L, k)
        assert tokens[0].tolist() == want, prompt
        if draft:
            assert set(want) <= set(model.module.draft_ids.tolist())
        assert torch.equal(torch.stack(logits_seen), want_logits), prompt


def test_export_files_and_configs(tmp_path):
    model = eagle3_model(2, n_layer=2, draft=40)
    export_eagle3(model, tmp_path / "v", fmt="vllm-eagle3", verifier="org/base")
    config = json.loads((tmp_path / "v" / "config.json").read_text())
    assert config["speculators_model_type"] == "eagle3" and config["norm_before_residual"] is False
    assert config["speculators_config"]["verifier"]["name_or_path"] == "org/base"
    assert config["eagle_aux_hidden_state_layer_ids"] == [1, 3, 4] and config["draft_vocab_size"] == 40
    tl = config["transformer_layer_config"]
    assert (tl["num_hidden_layers"], tl["hidden_size"], tl["vocab_size"]) == (2, 32, CFG.vocab_size)
    tensors = safetensors.torch.load_file(str(tmp_path / "v" / "model.safetensors"))
    assert tensors["fc.weight"].dtype == torch.bfloat16 and tensors["d2t"].dtype == torch.int64
    assert {"layers.0.hidden_norm.weight", "layers.1.input_layernorm.weight", "embed_tokens.weight"} <= set(tensors)
    plain = eagle3_config(model, "vllm-eagle3", style="plain")
    assert plain["architectures"] == ["LlamaForCausalLMEagle3"]
    assert plain["eagle_aux_hidden_state_layer_ids"] == [1, 3, 4] and "eagle_config" not in plain
    one = eagle3_model(2, n_layer=1, draft=None)
    export_eagle3(one, tmp_path / "s", fmt="sglang-eagle3", embed=False)
    config = json.loads((tmp_path / "s" / "config.json").read_text())
    assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == list(TAPS)  # SGLang's are layer outputs
    assert config["draft_vocab_size"] == CFG.vocab_size and not config["tie_word_embeddings"]
    tensors = safetensors.torch.load_file(str(tmp_path / "s" / "model.safetensors"))
    assert "midlayer.hidden_norm.weight" in tensors and "d2t" not in tensors and "embed_tokens.weight" not in tensors
    with pytest.raises(ExportError, match="already holds"):
        export_eagle3(one, tmp_path / "s", fmt="sglang-eagle3")
    export_eagle3(one, tmp_path / "s", fmt="sglang-eagle3", force=True)
    with pytest.raises(ExportError, match="one-layer"):
        export_eagle3(model, tmp_path / "s2", fmt="sglang-eagle3")
    with pytest.raises(ExportError, match="plain config"):
        export_eagle3(one, tmp_path / "s3", fmt="sglang-eagle3", style="speculators")


def test_the_default_layout_is_refused(tmp_path):
    torch.manual_seed(0)
    model = RecycleModel.build(CFG, RecycleConfig(n_layer=1, taps=TAPS))
    with pytest.raises(ExportError, match="needs a module of the eagle3 layout") as e:
        export_eagle3(model, tmp_path / "o", fmt="vllm-eagle3")
    assert "\n" not in str(e.value) and not (tmp_path / "o").exists()


def test_cli_export(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat. " * 50)
    tok = train_bpe([text], 280)
    cfg = dataclasses.replace(CFG, vocab_size=tok.vocab_size)
    save_checkpoint(tmp_path / "e3", eagle3_model(3, n_layer=1, cfg=cfg), tokenizer=tok)
    assert main(["export", str(tmp_path / "out"), "--format", "vllm-eagle3", "--model", str(tmp_path / "e3"),
                 "--config-style", "plain"]) == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle3"] and config["draft_vocab_size"] == 40
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "rec", RecycleModel.build(cfg, RecycleConfig()), tokenizer=tok)
    capsys.readouterr()
    assert main(["export", str(tmp_path / "out2"), "--format", "sglang-eagle3", "--model", str(tmp_path / "rec")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "needs a module of the eagle3 layout" in err
    args = build_parser().parse_args(["retrofit", "x.txt", "--out", "o", "--layout", "eagle3", "--taps", "1,14,26"])
    assert (args.layout, args.taps) == ("eagle3", (1, 14, 26))


# -- the layout in the project: config, decoding, training ----------------------------------------------------------


def test_layout_config():
    assert RecycleConfig().layout == "recycle" and RecycleConfig.from_dict({"n_layer": 1}).layout == "recycle"
    cfg = RecycleConfig(taps=[1, 2, 3], layout="eagle3")
    assert RecycleConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    for bad, match in [(dict(layout="eagle4"), "layout"), (dict(layout="eagle3"), "exactly three"),
                       (dict(layout="eagle3", taps=(1, 2)), "exactly three"),
                       (dict(layout="eagle3", taps=(1, 2, 3), input_norm=False), "own input norms"),
                       (dict(layout="eagle3", taps=(1, 2, 3), hidden="post_norm"), "own input norms")]:
        with pytest.raises(ConfigError, match=match):
            RecycleConfig(**bad)
    with pytest.raises(ValueError, match="last layer"):
        RecyclableModule(CFG, RecycleConfig(taps=(1, 2, 5), layout="eagle3"))
    assert eagle3_taps(30) == (1, 14, 26) and eagle3_taps(7) == (1, 2, 3)
    with pytest.raises(ConfigError):
        eagle3_taps(6)


@pytest.mark.parametrize("strategy", names())
def test_every_strategy_decodes_with_the_eagle3_layout(strategy):
    """The eager reference loops, and the engine (on the CPU: its static loop) for the module's strategies."""
    model = eagle3_model(4, n_layer=2, draft=None)
    prompts = prompts_for(6, 2)
    want = standard(model.base, prompts, max_new_tokens=12).tokens
    res = reference_decode(model, strategy, prompts, max_new_tokens=12, draft_len=3)
    if get(strategy).lossless:
        assert res.tokens == want
    else:
        assert [len(t) for t in res.tokens] == [12] * 2
    if get(strategy).needs_module:
        engine = Engine(model, bucket=16).decode(strategy, prompts, max_new_tokens=12, draft_len=3)
        assert engine.tokens == res.tokens


def test_transformers_generate_with_the_eagle3_layout():
    """recyclegpt.hf.generate reads the taps through hooks on transformers' layers: exact greedy there too."""
    from recyclegpt import hf

    model = eagle3_model(8, n_layer=1, draft=40)
    lm = to_hf_llama(model.base)
    for prompt in prompts_for(9, 2):
        x = torch.tensor([prompt])
        out = lm.generate(x, custom_generate=hf.generate, max_new_tokens=10, do_sample=False, module=model.module,
                          strategy="speculative", draft_len=3)
        assert torch.equal(out, lm.generate(x, max_new_tokens=10, do_sample=False))


def test_lossless_drafting_accepts_with_a_good_eagle3_drafter():
    """A base whose greedy token is nearly always the same one, and a module that drafts it: most drafts are
    accepted, and the output is still standard's."""
    model = eagle3_model(5, n_layer=1, draft=None)
    with torch.no_grad():
        model.base.tok_emb.weight[7] *= 4.0  # a head row that dominates every state
        model.module.fc.weight.zero_()
        model.module.fc.weight[:, :CFG.d_model] = torch.eye(CFG.d_model)  # s_t = the first tap
    prompts = prompts_for(7, 3)
    want = standard(model.base, prompts, max_new_tokens=20).tokens
    for strategy in ("recycle-verified", "speculative", "tree"):
        res = reference_decode(model, strategy, prompts, max_new_tokens=20, draft_len=3)
        assert res.tokens == want
        assert sum(res.stats.accept_hist[1:]) > 0, strategy


def test_eagle3_layout_trains_and_round_trips(tmp_path):
    model = eagle3_model(6, n_layer=2, draft=None).train()
    model.base.requires_grad_(False)
    idx = torch.randint(0, CFG.vocab_size, (2, 12))
    out = recycle_losses(model, idx, lam=1.0, train_base=False, rollout=2, feature_weight=0.1, target="both")
    out["loss"].backward()
    first = model.module.layers[0]
    for p in (model.module.fc.weight, first.attn.wq.weight, first.emb_norm.weight, first.hidden_norm.weight,
              model.module.layers[1].attn.wq.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    save_checkpoint(tmp_path / "ck", model, base_ref="tiny-base")
    loaded = load_module(tmp_path / "ck", model.base)
    assert loaded.cfg == model.module.cfg
    for k, v in model.module.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.cuda
def test_cuda_graphs_with_the_eagle3_layout_equal_standard():
    """On CUDA the first layer keeps the torch operators (Eagle3Block) while the other layers and the base take the
    fused Triton paths; CUDA graphs give standard's tokens and the reference loop's recycle tokens."""
    model = eagle3_model(4, n_layer=2, draft=40).cuda()
    prompts = prompts_for(6, 3)
    want = standard(model.base, prompts, max_new_tokens=24).tokens
    graphs = Engine(model, graphs=True, bucket=16)
    for strategy in ("recycle-verified", "speculative", "tree"):
        assert graphs.decode(strategy, prompts, max_new_tokens=24, draft_len=3).tokens == want, strategy
    assert graphs.decode("recycle", prompts, max_new_tokens=24).tokens == reference_decode(
        model, "recycle", prompts, max_new_tokens=24).tokens
