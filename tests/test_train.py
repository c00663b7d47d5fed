"""Training on the CPU with the tiny preset and synthetic text: objectives, data, the loop, resume, retrofit."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch

from recyclegpt.config import PRESETS, ConfigError, RecycleConfig
from recyclegpt.models import RecycleModel, Transformer
from recyclegpt.training.data import (
    ChatExamples,
    DataError,
    TextWindows,
    encode_example,
    load_dataset,
    read_jsonl,
    train_bpe,
)
from recyclegpt.training.objectives import recycle_losses
from recyclegpt.training.train import TrainConfig, lr_at, retrofit, train_joint

SENTENCES = ["the cat sat on the mat.", "a dog ran to the red ball.", "she sang a song of the sea.",
             "we walk home in the rain.", "birds fly over the green hill."]


def write_corpus(folder, name="corpus.txt", n=600, seed=0):
    rng = random.Random(seed)
    path = folder / name
    path.write_text(" ".join(rng.choice(SENTENCES) for _ in range(n)))
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    path = write_corpus(folder)
    return path, train_bpe([path], 300)


def model_cfg(tok):
    return dataclasses.replace(PRESETS["tiny"], vocab_size=tok.vocab_size)


def small_cfg(**kw):
    base = dict(steps=30, batch_size=8, seq_len=32, lr=3e-3, min_lr=3e-4, warmup=3, eval_every=10, eval_batches=2,
                val_fraction=0.1, log_every=5, progress=False)
    return TrainConfig(**{**base, **kw})


def first_and_last_val(metrics):
    val = [m for m in metrics if m["split"] == "val"]
    return val[0], val[-1]


def test_joint_training_lowers_both_losses(corpus, tmp_path):
    path, tok = corpus
    model, metrics = train_joint(cfg=small_cfg(), model_cfg=model_cfg(tok), rcfg=RecycleConfig(), files=[path],
                                 out_dir=tmp_path / "ck", tokenizer=tok)
    first, last = first_and_last_val(metrics)
    assert last["val_lm"] < first["val_lm"] - 1.0
    assert last["val_rec"] < first["val_rec"] - 1.0
    assert last["val_rec_acc"] > first["val_rec_acc"]
    logged = [json.loads(line) for line in (tmp_path / "ck" / "metrics.jsonl").read_text().splitlines()]
    assert logged == metrics


def test_resume_is_bit_identical(corpus, tmp_path, monkeypatch):
    path, tok = corpus
    cfg = small_cfg(steps=8, save_every=4, eval_every=4, grad_accum=2)
    full, _ = train_joint(cfg=cfg, model_cfg=model_cfg(tok), rcfg=RecycleConfig(), files=[path],
                          out_dir=tmp_path / "full", tokenizer=tok)

    # crash in step 6, after the checkpoint of step 4 was written
    real_batch = TextWindows.train_batch

    def crashing_batch(self, *, seed, index, batch_size):
        if index == 5 * cfg.grad_accum:
            raise KeyboardInterrupt
        return real_batch(self, seed=seed, index=index, batch_size=batch_size)

    monkeypatch.setattr(TextWindows, "train_batch", crashing_batch)
    with pytest.raises(KeyboardInterrupt):
        train_joint(cfg=cfg, model_cfg=model_cfg(tok), rcfg=RecycleConfig(), files=[path], out_dir=tmp_path / "cut",
                    tokenizer=tok)
    monkeypatch.setattr(TextWindows, "train_batch", real_batch)
    assert json.loads((tmp_path / "cut" / "trainer_state.json").read_text())["step"] == 4

    resumed, metrics = train_joint(cfg=cfg, model_cfg=model_cfg(tok), rcfg=RecycleConfig(), files=[path],
                                   out_dir=tmp_path / "cut", resume=True)
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert [m["step"] for m in metrics if m["split"] == "val"] == [0, 4, 8]


def test_resume_refuses_changed_config(corpus, tmp_path):
    path, tok = corpus
    train_joint(cfg=small_cfg(steps=2, warmup=1), model_cfg=model_cfg(tok), rcfg=RecycleConfig(), files=[path],
                out_dir=tmp_path / "ck", tokenizer=tok)
    with pytest.raises(ConfigError, match="lr"):
        train_joint(cfg=small_cfg(steps=4, warmup=1, lr=1e-2), model_cfg=model_cfg(tok), rcfg=RecycleConfig(),
                    files=[path], out_dir=tmp_path / "ck", resume=True)
    with pytest.raises(FileExistsError):
        train_joint(cfg=small_cfg(steps=2, warmup=1), model_cfg=model_cfg(tok), rcfg=RecycleConfig(), files=[path],
                    out_dir=tmp_path / "ck", tokenizer=tok)


def test_baseline_is_the_joint_base_without_the_module(corpus, tmp_path):
    # with lam = 0 the module adds nothing to the base's gradients, so the base must follow the baseline exactly:
    # same initialisation, same batches, same updates (without clipping: the global norm over more parameters
    # may round differently)
    path, tok = corpus
    cfg = small_cfg(steps=4, eval_every=0, grad_clip=0.0)
    baseline, metrics = train_joint(cfg=cfg, model_cfg=model_cfg(tok), rcfg=None, files=[path],
                                    out_dir=tmp_path / "base", tokenizer=tok)
    joint, _ = train_joint(cfg=dataclasses.replace(cfg, lam=0.0), model_cfg=model_cfg(tok), rcfg=RecycleConfig(),
                           files=[path], out_dir=tmp_path / "joint", tokenizer=tok)
    assert isinstance(baseline, Transformer)
    for (name, a), (_, b) in zip(baseline.state_dict().items(), joint.base.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert "val_rec" not in metrics[-1] and "val_lm" in metrics[-1]


def test_retrofit_leaves_base_unchanged_and_lowers_rec(corpus, tmp_path):
    path, tok = corpus
    base, _ = train_joint(cfg=small_cfg(steps=20, eval_every=0), model_cfg=model_cfg(tok), rcfg=None,
                          files=[path], out_dir=tmp_path / "base", tokenizer=tok)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model, metrics = retrofit(cfg=small_cfg(steps=20, lr=1e-2), base=base, tokenizer=tok, rcfg=RecycleConfig(),
                              files=[path], out_dir=tmp_path / "module", base_ref="tiny-base")
    for k, v in base.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(not p.requires_grad for p in base.parameters())
    first, last = first_and_last_val(metrics)
    assert last["val_rec"] < first["val_rec"] - 1.0
    assert first["val_lm"] == last["val_lm"]
    meta = json.loads((tmp_path / "module" / "recycle.json").read_text())
    assert meta["base"]["ref"] == "tiny-base" and meta["tokenizer"] is None
    assert not (tmp_path / "module" / "base.safetensors").exists()


@pytest.mark.parametrize("target", ["distill", "both"])
def test_distill_target_trains(corpus, tmp_path, target):
    path, tok = corpus
    _, metrics = train_joint(cfg=small_cfg(steps=20, target=target), model_cfg=model_cfg(tok), rcfg=RecycleConfig(),
                             files=[path], out_dir=tmp_path / "ck", tokenizer=tok)
    first, last = first_and_last_val(metrics)
    assert last["val_rec"] < first["val_rec"]
    assert last["val_rec_agree"] > first["val_rec_agree"]


def test_distill_loss_is_kl_to_the_base_one_step_ahead():
    torch.manual_seed(0)
    cfg = PRESETS["tiny"]
    model = RecycleModel.build(cfg, RecycleConfig())
    idx = torch.randint(0, cfg.vocab_size, (2, 10))
    out = recycle_losses(model, idx, lam=1.0, target="distill")
    base = model.base(idx)
    q = model.recycle(base.hidden[:, :-2], idx[:, 1:-1]).logits.log_softmax(-1)
    p = base.logits[:, 1:-1].log_softmax(-1)
    kl = torch.nn.functional.kl_div(q, p, log_target=True, reduction="none").sum(-1).mean()
    torch.testing.assert_close(out["rec"], kl)
    torch.testing.assert_close(out["loss"], out["lm"] + kl)


def test_masks_select_targets():
    torch.manual_seed(0)
    cfg = PRESETS["tiny"]
    model = RecycleModel.build(cfg, RecycleConfig())
    idx = torch.randint(0, cfg.vocab_size, (2, 12))
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[:, 7:] = True
    out = recycle_losses(model, idx, lam=0.5, loss_mask=mask)
    short = recycle_losses(model, idx[:, :12], lam=0.5)
    assert out["lm_tokens"].item() == 10 and out["rec_tokens"].item() == 10
    assert short["lm_tokens"].item() == 22 and short["rec_tokens"].item() == 20
    # the loss over a masked row equals the mean over the kept targets only
    base = model.base(idx)
    ce = torch.nn.functional.cross_entropy(base.logits[:, 6:-1].flatten(0, 1), idx[:, 7:].flatten())
    torch.testing.assert_close(out["lm"], ce)
    # the frozen-base objective gives no gradient to the base and its loss is L_rec alone
    model.base.requires_grad_(False)
    frozen = recycle_losses(model, idx, lam=0.5, train_base=False)
    frozen["loss"].backward()
    torch.testing.assert_close(frozen["loss"], frozen["rec"])
    assert model.module.fc.weight.grad is not None


@pytest.mark.parametrize("target", ["data", "distill", "both"])
def test_ragged_masks_equal_the_full_logits_computation(target):
    """The head runs only at target positions; the losses equal masked means over full (B, T, V) logits."""
    torch.manual_seed(1)
    cfg = PRESETS["tiny"]
    model = RecycleModel.build(cfg, RecycleConfig())
    idx = torch.randint(0, cfg.vocab_size, (3, 11))
    mask = torch.rand(3, 11) > 0.4
    out = recycle_losses(model, idx, lam=0.3, loss_mask=mask, target=target)
    base = model.base(idx)
    rec = model.recycle(base.hidden[:, :-2], idx[:, 1:-1]).logits
    m1, m2 = mask[:, 1:], mask[:, 2:]
    ce = torch.nn.functional.cross_entropy(base.logits[:, :-1][m1], idx[:, 1:][m1])
    log_q, log_p = rec[m2].log_softmax(-1), base.logits[:, 1:-1][m2].log_softmax(-1)
    terms = []
    if target != "distill":
        terms.append(torch.nn.functional.cross_entropy(rec[m2], idx[:, 2:][m2], reduction="none"))
    if target != "data":
        terms.append((log_p.exp() * (log_p - log_q)).sum(-1))
    expected = (sum(terms) / len(terms)).mean()
    torch.testing.assert_close(out["lm"], ce)
    torch.testing.assert_close(out["rec"], expected)
    torch.testing.assert_close(out["loss"], ce + 0.3 * expected)
    agree = (rec[m2].argmax(-1) == base.logits[:, 1:-1][m2].argmax(-1)).float().mean()
    torch.testing.assert_close(out["rec_agree"], agree)
    assert out["rec_tokens"].item() == int(m2.sum()) and out["lm_tokens"].item() == int(m1.sum())


def test_feature_regression_term():
    torch.manual_seed(2)
    cfg = PRESETS["tiny"]
    model = RecycleModel.build(cfg, RecycleConfig(n_layer=2))
    idx = torch.randint(0, cfg.vocab_size, (2, 9))
    mask = torch.rand(2, 9) > 0.3
    plain = recycle_losses(model, idx, lam=1.0, loss_mask=mask, target="both")
    out = recycle_losses(model, idx, lam=1.0, loss_mask=mask, target="both", feature_weight=0.5)
    assert "feat" not in plain
    base = model.base(idx)
    module_out = model.recycle(base.hidden[:, :-2], idx[:, 1:-1]).hidden
    m = mask[:, 2:]
    feat = torch.nn.functional.smooth_l1_loss(model.base.norm(module_out[m]), model.base.norm(base.hidden[:, 1:-1][m]))
    torch.testing.assert_close(out["feat"], feat)
    torch.testing.assert_close(out["rec"], plain["rec"])  # "rec" stays the token loss
    torch.testing.assert_close(out["loss"], plain["loss"] + 0.5 * feat)


def test_retrofit_with_feature_regression_lowers_it(corpus, tmp_path):
    path, tok = corpus
    base, _ = train_joint(cfg=small_cfg(steps=10, eval_every=0), model_cfg=model_cfg(tok), rcfg=None,
                          files=[path], out_dir=tmp_path / "base", tokenizer=tok)
    _, metrics = retrofit(cfg=small_cfg(steps=20, lr=1e-2, target="distill", feature_weight=1.0), base=base,
                          tokenizer=tok, rcfg=RecycleConfig(), files=[path], out_dir=tmp_path / "module",
                          base_ref="tiny-base")
    first, last = first_and_last_val(metrics)
    assert last["val_feat"] < first["val_feat"] and last["val_rec"] < first["val_rec"]
    with pytest.raises(ConfigError, match="feature_weight"):
        TrainConfig(feature_weight=-1.0)


def test_batches_depend_only_on_seed_and_index():
    data = TextWindows.from_stream(torch.arange(1000).numpy(), seq_len=16, val_fraction=0.1)
    a, _ = data.train_batch(seed=1, index=7, batch_size=4)
    b, _ = data.train_batch(seed=1, index=7, batch_size=4)
    c, _ = data.train_batch(seed=1, index=8, batch_size=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.max() < 900  # training windows never reach into the validation tail
    (val, _), = data.val_batches(n_batches=1, batch_size=4)
    assert val.min() >= 900


def test_chat_jsonl_masks_the_prompt(corpus, tmp_path):
    _, tok = corpus
    lines = [{"prompt": "the cat", "response": "sat on the mat."}] * 4 + [
        {"messages": [{"role": "user", "content": "a dog"}, {"role": "assistant", "content": "ran."}]}]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    with pytest.raises(DataError, match="chat template"):  # a messages example needs a template ... unless 2 turns
        (tmp_path / "multi.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "a"}] * 2 + [
            {"role": "assistant", "content": "b"}]}) + "\n")
        load_dataset([tmp_path / "multi.jsonl"], tok, seq_len=32, val_fraction=0.0)
    data = load_dataset([path], tok, seq_len=32, val_fraction=0.2)
    assert isinstance(data, ChatExamples) and len(data.train) == 4 and len(data.val) == 1
    idx, mask = data.train_batch(seed=0, index=0, batch_size=2)
    n_prompt = len(tok.encode("the cat"))
    response = tok.encode("sat on the mat.") + [tok.eos_ids[0]]
    assert mask[0].tolist() == [False] * n_prompt + [True] * len(response)
    assert idx[0, n_prompt:].tolist() == response


def test_plain_continuation_records_skip_the_chat_template(corpus, tmp_path):
    _, tok = corpus
    templated = dataclasses.replace(tok, chat_template="{% for m in messages %}[{{ m.role }}] {{ m.content }} "
                                    "{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}")
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps({"prompt": "the cat", "response": "sat on the mat."}) + "\n"
                    + json.dumps({"prompt": "the cat", "response": " sat on the mat.", "chat": False}) + "\n")
    data = load_dataset([path], templated, seq_len=64, val_fraction=0.0)
    (chat_ids, chat_n), (plain_ids, plain_n) = data.train
    assert chat_ids[:chat_n] == templated.encode("[user] the cat [assistant] ")
    assert plain_ids == tok.encode("the cat") + tok.encode(" sat on the mat.", add_bos=False)  # no eos
    assert plain_n == len(tok.encode("the cat"))
    # without a template, a prompt/response pair ends with the separator and a continuation does not
    data = load_dataset([path], tok, seq_len=64, val_fraction=0.0)
    assert data.train[0][0][-1] == tok.eos_ids[0] and data.train[1][0][-1] != tok.eos_ids[0]


def test_examples_are_batch_encoded_as_one_at_a_time(corpus, tmp_path):
    _, tok = corpus
    templated = dataclasses.replace(tok, add_bos=True, chat_template="{% for m in messages %}[{{ m.role }}] "
                                    "{{ m.content }} {% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}")
    texts = ["the cat", "", " sat on the mat.", "a dog ran"]
    assert templated.encode_batch(texts) == [templated.encode(t) for t in texts]
    assert templated.encode_batch(texts, add_bos=False) == [templated.encode(t, add_bos=False) for t in texts]
    pairs = [{"prompt": f"the cat {i}", "response": f"sat on mat {i}."} for i in range(6)] + [
        {"prompt": "a dog", "response": " ran away", "chat": False}]
    turns = [{"role": r, "content": c} for r, c in [("user", "hi"), ("assistant", "yo"), ("user", "and?"),
                                                     ("assistant", "done.")]]
    for t, records in ((templated, pairs + [{"messages": turns}]), (tok, pairs)):  # multi-turn needs a template
        path = tmp_path / "mixed.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
        data = load_dataset([path], t, seq_len=64, val_fraction=0.0)
        assert data.train == [encode_example(m, t, w, chat=c) for m, w, c in read_jsonl([path])]


def test_text_mixed_into_chat_examples(corpus, tmp_path):
    text_path, tok = corpus
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": "the cat", "response": f"sat {i}."}) for i in range(5)) + "\n")
    chat = load_dataset([path], tok, seq_len=16, val_fraction=0.2)
    mixed = load_dataset([path, text_path], tok, seq_len=16, val_fraction=0.2)
    stream = tok.encode(text_path.read_text(), add_bos=False)
    n_windows = (len(stream) + 1) // 16  # the file is one document followed by the separator
    assert len(mixed.train) == n_windows + len(chat.train) and mixed.val == chat.val  # validation: chat alone
    assert mixed.train[0] == (stream[:16], 0) and mixed.train[1] == (stream[16:32], 0)
    # a text window is all targets: its mask is true everywhere
    idx, mask = mixed._collate([mixed.train[0], chat.train[0]])
    assert idx[0].tolist() == stream[:16] and mask[0].all()
    (tmp_path / "tiny.txt").write_text("the cat")
    with pytest.raises(DataError, match="fewer than one window"):
        load_dataset([path, tmp_path / "tiny.txt"], tok, seq_len=64, val_fraction=0.2)


def test_data_errors(corpus, tmp_path):
    _, tok = corpus
    with pytest.raises(DataError, match="no such file"):
        load_dataset([tmp_path / "missing.txt"], tok, seq_len=8, val_fraction=0.0)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="empty corpus"):
        load_dataset([tmp_path / "empty.txt"], tok, seq_len=8, val_fraction=0.0)
    with pytest.raises(DataError, match="empty corpus"):
        train_bpe([tmp_path / "empty.txt"], 300)
    (tmp_path / "short.txt").write_text("the cat")
    with pytest.raises(DataError, match="shorter than one window"):
        load_dataset([tmp_path / "short.txt"], tok, seq_len=64, val_fraction=0.0)
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a",\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: bad JSON"):
        load_dataset([tmp_path / "bad.jsonl"], tok, seq_len=8, val_fraction=0.0)
    (tmp_path / "keys.jsonl").write_text('{"question": "a"}\n')
    with pytest.raises(DataError, match=r"keys.jsonl:1: expected"):
        load_dataset([tmp_path / "keys.jsonl"], tok, seq_len=8, val_fraction=0.0)


def test_train_config_validation():
    with pytest.raises(ConfigError, match="min_lr"):
        TrainConfig(lr=1e-3, min_lr=1e-2)
    with pytest.raises(ConfigError, match="target"):
        TrainConfig(target="teacher")
    with pytest.raises(ConfigError, match="warmup"):
        TrainConfig(steps=10, warmup=-1)
    short = TrainConfig(steps=2, lr=1.0, min_lr=0.1)  # the default warm-up (100) over a 2-step smoke run
    assert [lr_at(short, i) for i in range(2)] == [pytest.approx(0.5), pytest.approx(1.0)]
    cfg = TrainConfig(steps=100, warmup=10, lr=1.0, min_lr=0.1)
    assert lr_at(cfg, 0) == pytest.approx(0.1) and lr_at(cfg, 9) == pytest.approx(1.0)
    assert lr_at(cfg, 99) == pytest.approx(0.1)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_rollout_terms_equal_a_hand_rolled_draft():
    """Depth k reads the depth-(k-1) output one position back in place of h_t; same targets, same teacher."""
    torch.manual_seed(3)
    cfg = PRESETS["tiny"]
    model = RecycleModel.build(cfg, RecycleConfig(n_layer=1))
    idx = torch.randint(0, cfg.vocab_size, (2, 10))
    mask = torch.rand(2, 10) > 0.3
    plain = recycle_losses(model, idx, lam=1.0, loss_mask=mask, target="data")
    out = recycle_losses(model, idx, lam=1.0, loss_mask=mask, target="data", rollout=3, rollout_weight=0.5)
    assert "roll" not in plain
    base = model.base(idx)
    g1 = model.recycle(base.hidden[:, :-2], idx[:, 1:-1]).hidden  # positions 0..7
    g2 = model.recycle(g1[:, :-1], idx[:, 2:-1]).hidden  # positions 1..7
    g3 = model.recycle(g2[:, :-1], idx[:, 3:-1]).hidden  # positions 2..7
    teacher = base.logits[:, 1:-1]  # the base's prediction of x_{t+2}, for t = 0..7
    losses, agree, n = [], 0.0, 0
    for k, g in ((2, g2), (3, g3)):
        m = mask[:, 2:].clone()
        m[:, :k - 1] = False
        logits = model.base.head(g)[m[:, k - 1:]]
        losses.append(torch.nn.functional.cross_entropy(logits, idx[:, 2:][m]))
        agree += (logits.argmax(-1) == teacher[m].argmax(-1)).float().sum()
        n += int(m.sum())
    roll = sum(losses) / 2
    torch.testing.assert_close(out["roll"], roll)
    torch.testing.assert_close(out["roll_agree"], agree / n)
    assert out["roll_tokens"].item() == n
    torch.testing.assert_close(out["rec"], plain["rec"])  # "rec" stays the one-step loss
    torch.testing.assert_close(out["loss"], plain["loss"] + 0.5 * roll)


def base_and_first_module(corpus, tmp_path):
    """A tiny trained base and a module retrofitted on it (saved in tmp_path / "m1"), for fine-tuning tests."""
    path, tok = corpus
    base, _ = train_joint(cfg=small_cfg(steps=10, eval_every=0), model_cfg=model_cfg(tok), rcfg=None,
                          files=[path], out_dir=tmp_path / "base", tokenizer=tok)
    _, metrics = retrofit(cfg=small_cfg(steps=20, lr=1e-2), base=base, tokenizer=tok, rcfg=RecycleConfig(),
                          files=[path], out_dir=tmp_path / "m1", base_ref="tiny-base")
    return path, tok, base, metrics


def test_retrofit_with_rollout_from_an_initial_module(corpus, tmp_path):
    path, tok, base, before = base_and_first_module(corpus, tmp_path)
    _, metrics = retrofit(cfg=small_cfg(steps=20, lr=1e-2, rollout=3, init_module=str(tmp_path / "m1")), base=base,
                          tokenizer=tok, rcfg=RecycleConfig(), files=[path], out_dir=tmp_path / "m2",
                          base_ref="tiny-base")
    first, last = first_and_last_val(metrics)
    # it starts where the first run ended (same module, same validation data), and the rolled-out depths improve
    assert first["val_rec"] == pytest.approx(first_and_last_val(before)[1]["val_rec"], rel=1e-5)
    assert last["val_roll"] < first["val_roll"]
    with pytest.raises(FileNotFoundError, match="init-module"):
        retrofit(cfg=small_cfg(steps=4, init_module=str(tmp_path / "nope")), base=base, tokenizer=tok,
                 rcfg=RecycleConfig(), files=[path], out_dir=tmp_path / "m3", base_ref="tiny-base")
    with pytest.raises(ConfigError, match="rollout"):
        TrainConfig(rollout=0)


def test_chunked_head_kl_equals_the_plain_kl_and_its_gradient():
    """head_kl (the frozen head's KL, chunk by chunk, gradient kept from the forward) gives the loss, the argmaxes
    and the gradient of the plain computation over whole logits, for chunks that do and do not divide the rows."""
    from recyclegpt.training.objectives import head_kl

    torch.manual_seed(0)
    cfg = PRESETS["tiny"]
    base = Transformer(cfg).requires_grad_(False)
    student, teacher = torch.randn(11, cfg.d_model, requires_grad=True), torch.randn(11, cfg.d_model)
    q = base.head(student).log_softmax(-1)
    p = base.head(teacher).log_softmax(-1)
    want = (p.exp() * (p - q)).sum(-1).mean()
    (want_grad,) = torch.autograd.grad(want, student)
    for chunk in (4, 11, 64):
        loss, s_arg, t_arg = head_kl(base, student, teacher, chunk=chunk)
        torch.testing.assert_close(loss, want)
        (grad,) = torch.autograd.grad(2 * loss, student)
        torch.testing.assert_close(grad, 2 * want_grad)
        assert torch.equal(s_arg, q.argmax(-1)) and torch.equal(t_arg, p.argmax(-1))
    with torch.no_grad():  # evaluation: the same loss, no gradient kept
        torch.testing.assert_close(head_kl(base, student, teacher, chunk=4)[0], want)


@pytest.mark.parametrize("rollout", [1, 3])
def test_frozen_distillation_takes_the_chunked_path_with_the_same_loss(rollout):
    """A frozen base distilling (the retrofit and online regimes) gets the loss, metrics and module gradients that
    the same objective gives with the V-wide logits kept (the joint regime's path, its base's gradient aside)."""
    torch.manual_seed(0)
    cfg = PRESETS["tiny"]
    model = RecycleModel.build(cfg, RecycleConfig())
    idx = torch.randint(0, cfg.vocab_size, (3, 12))
    mask = torch.zeros(3, 12, dtype=torch.bool)
    mask[:, 4:] = True
    mask[1, 9:] = False
    kw = dict(lam=1.0, loss_mask=mask, target="distill", rollout=rollout)
    joint = recycle_losses(model, idx, train_base=True, detach_hidden=True, **kw)
    model.module.zero_grad()
    joint["loss"].backward()  # L_lm + L_rec: the module's gradient is L_rec's alone (detach_hidden)
    want = [p.grad.clone() for p in model.module.parameters()]
    model.base.requires_grad_(False)
    model.module.zero_grad()
    frozen = recycle_losses(model, idx, train_base=False, **kw)
    frozen["loss"].backward()
    for key in ("rec", "lm", "lm_acc", "rec_acc", "rec_agree") + (("roll", "roll_agree") if rollout > 1 else ()):
        torch.testing.assert_close(frozen[key], joint[key], msg=key)
    for g, w in zip((p.grad for p in model.module.parameters()), want):
        torch.testing.assert_close(g, w)
