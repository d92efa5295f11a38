"""Objectives: each is zero (or minimal) at the reference and agrees with its library."""

from __future__ import annotations

import math

import jiwer
import pytest
import torch
import torch.nn.functional as F

from esc_ao.search.objectives import Accuracy, CrossEntropy, CTCLoss, DecodedWER, LogitKL, OutputMSE, objective_by_name


def test_output_mse_is_noise_to_signal() -> None:
    ref = [torch.ones(2, 3), torch.full((2, 3), 2.0)]
    out = [torch.ones(2, 3) * 1.1, torch.full((2, 3), 2.0)]
    assert OutputMSE()(ref, ref) == 0.0
    assert OutputMSE()(out, ref) == pytest.approx((6 * 0.01) / (6 * 1 + 6 * 4))


def test_logit_kl_is_zero_at_the_reference_and_positive_elsewhere() -> None:
    ref = [torch.randn(4, 10)]
    assert LogitKL()(ref, ref) == pytest.approx(0.0, abs=1e-7)
    assert LogitKL()([ref[0] + torch.randn(4, 10)], ref) > 0


def test_ctc_loss_matches_torch() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 20, 6)
    targets, lengths = torch.tensor([[1, 2, 3], [4, 5, 0]]), torch.tensor([3, 2])
    expected = F.ctc_loss(F.log_softmax(logits, -1).transpose(0, 1), targets, torch.tensor([20, 20]), lengths)
    assert CTCLoss([targets], [lengths])([logits], [None]) == pytest.approx(float(expected), rel=1e-5)


def test_cross_entropy_and_accuracy() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 0.0]])
    labels = torch.tensor([0, 1, 1])
    assert CrossEntropy([labels])([logits], [None]) == pytest.approx(float(F.cross_entropy(logits, labels)))
    assert Accuracy([labels])([logits], [None]) == pytest.approx(1 - 2 / 3)


@pytest.mark.parametrize(
    "refs,hyps",
    [
        (["the cat sat"], ["the cat sat"]),
        (["the cat sat on the mat"], ["the cat sit on mat"]),
        (["one two", "three four five"], ["one", "three for five six"]),
    ],
)
def test_decoded_wer_matches_jiwer(refs, hyps) -> None:
    obj = DecodedWER(decode=lambda out: out, transcripts=[refs])
    assert obj([hyps], [None]) == pytest.approx(jiwer.wer(refs, hyps))


def test_hand_counted_wer() -> None:
    # 1 substitution (sat->sit) + 1 deletion (the) over 6 reference words.
    obj = DecodedWER(decode=lambda out: out, transcripts=[["the cat sat on the mat"]])
    assert obj([["the cat sit on mat"]], [None]) == pytest.approx(2 / 6)


def test_unknown_objective_name_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="mse, kl"):
        objective_by_name("wer")
    assert math.isclose(objective_by_name("mse")([torch.ones(1)], [torch.ones(1)]), 0.0)
