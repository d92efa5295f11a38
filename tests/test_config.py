"""QuantConfig validation: each bad value raises with the value and the fix."""

import pytest

from esc_ao import METHODS, QuantConfig


@pytest.mark.parametrize("field", ["weight_bits", "act_bits"])
@pytest.mark.parametrize("bits", [2, 3, 6, 16, True])
def test_bits_other_than_4_or_8_are_refused(field: str, bits: int) -> None:
    with pytest.raises(ValueError, match=rf"{field}={bits!r}.*use 8 or 4"):
        QuantConfig(**{field: bits})


def test_unknown_method_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError) as err:
        QuantConfig(method="minmax")
    for method in METHODS:
        assert method in str(err.value)


@pytest.mark.parametrize("bins", [0, 100, 32])
def test_histogram_bins_must_be_power_of_two(bins: int) -> None:
    with pytest.raises(ValueError, match="power of two"):
        QuantConfig(histogram_bins=bins)


def test_percentile_range() -> None:
    with pytest.raises(ValueError, match="percentile"):
        QuantConfig(percentile=101.0)


def test_config_is_frozen_and_labelled() -> None:
    cfg = QuantConfig(weight_bits=4, act_bits=8, method="mse")
    assert cfg.label == "w4a8"
    with pytest.raises(AttributeError):
        cfg.method = "max"  # type: ignore[misc]


def test_from_label_reads_the_bit_widths_and_refuses_other_text() -> None:
    import pytest

    from esc_ao.config import QuantConfig

    config = QuantConfig.from_label("w4a8", method="mse")
    assert (config.weight_bits, config.act_bits, config.method, config.label) == (4, 8, "mse", "w4a8")
    for bad in ("w4", "fp32", "w4a8x", 48):
        with pytest.raises(ValueError, match="not of the form 'w<bits>a<bits>'"):
            QuantConfig.from_label(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="weight_bits=3"):
        QuantConfig.from_label("w3a8")
