"""WER and accuracy with confidence intervals, checked against jiwer on hand-made cases."""

from __future__ import annotations

import jiwer
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from esc_ao.metrics import accuracy, normalize_english, wer

CASES = [
    (["the cat sat on the mat"], ["the cat sat on the mat"], 0.0),
    (["the cat sat on the mat"], ["the cat sat on mat"], 1 / 6),  # one deletion
    (["the cat sat"], ["a cat sat down"], 2 / 3),  # substitution + insertion
    (["turn the lights off", "play music"], ["turn lights of", "play the music"], 3 / 6),
    (["one two three"], [""], 1.0),  # everything deleted
]


@pytest.mark.parametrize(("refs", "hyps", "expected"), CASES)
def test_wer_equals_jiwer_and_the_hand_count(refs: list[str], hyps: list[str], expected: float) -> None:
    est = wer(refs, hyps, normalize=False)
    assert est.value == pytest.approx(expected) == pytest.approx(jiwer.wer(refs, hyps))
    assert est.low <= est.value <= est.high and est.n == len(refs)


def test_normalisation_ignores_case_and_punctuation_and_spells_out_titles() -> None:
    assert normalize_english("Hello, Mr. Smith!") == "hello mister smith"
    assert wer(["Hello, Mr. Smith!"], ["hello mister smith"]).value == 0.0
    assert wer(["Hello, Mr. Smith!"], ["hello mister smith"], normalize=False).value > 0


def test_wer_interval_is_seeded_and_shrinks_with_more_utterances() -> None:
    refs = ["a b c d", "e f g h", "i j k l", "m n o p"] * 5
    hyps = ["a b c x", "e f g h", "i x k l", "m n o p"] * 5
    small, again = wer(refs[:4], hyps[:4], seed=3), wer(refs[:4], hyps[:4], seed=3)
    assert small == again
    large = wer(refs, hyps, seed=3)
    assert small.value == large.value == pytest.approx(2 / 16)
    assert large.high - large.low < small.high - small.low


def test_bad_input_names_the_problem() -> None:
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        wer(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="every reference is empty"):
        wer(["", "  "], ["a", "b"])
    with pytest.raises(ValueError, match="zero predictions"):
        accuracy([])


@settings(max_examples=50, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=300))
def test_accuracy_interval_contains_the_estimate_and_stays_in_0_1(correct: list[bool]) -> None:
    est = accuracy(correct)
    assert est.value == sum(correct) / len(correct)
    assert 0.0 <= est.low <= est.value <= est.high <= 1.0


@pytest.mark.parametrize(
    ("correct", "n", "low", "high"),
    [
        # closed forms at the edges: 0/n -> [0, z^2 / (n + z^2)], n/n -> [n / (n + z^2), 1]
        (0, 10, 0.0, 1.959963984540054**2 / (10 + 1.959963984540054**2)),
        (10, 10, 10 / (10 + 1.959963984540054**2), 1.0),
        # 8 of 10: the Wilson interval as statistics packages give it (0.4902, 0.9433)
        (8, 10, 0.4901625, 0.9433178),
    ],
)
def test_accuracy_interval_is_wilsons(correct: int, n: int, low: float, high: float) -> None:
    est = accuracy([True] * correct + [False] * (n - correct))
    assert est.low == pytest.approx(low, abs=1e-6) and est.high == pytest.approx(high, abs=1e-6)


def test_wer_records_its_error_counts() -> None:
    est = wer(["turn the light off", "seven two"], ["turn a light off now", "seven"], normalize=False)
    assert est.details == {"substitutions": 1, "deletions": 1, "insertions": 1, "reference_words": 6}
    assert est.value == 3 / 6
