"""Bad input gets a clear exception naming the value and the fix."""

from __future__ import annotations

import pytest
import torch
import torchaudio

from esc_ao import (
    CalibrationDataError,
    EscQuantizer,
    ExportError,
    NonFiniteActivationError,
    QuantConfig,
    export_model,
    observe,
    prepare,
)


def small_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 8)).eval()


def test_unexportable_conformer_points_to_the_helper() -> None:
    model = torchaudio.models.Conformer(
        input_dim=16, num_heads=2, ffn_dim=32, num_layers=1, depthwise_conv_kernel_size=3
    )
    with pytest.raises(ExportError, match="ExportableConformer") as err:
        export_model(model, (torch.randn(1, 10, 16), torch.tensor([10])))
    assert "Conformer" in str(err.value)


def test_no_calibration_batches() -> None:
    prepared = prepare(export_model(small_mlp(), (torch.randn(2, 8),)), EscQuantizer(QuantConfig()))
    with pytest.raises(CalibrationDataError, match="no calibration batches"):
        observe(prepared, [])


def test_nan_in_calibration_data_names_the_node() -> None:
    prepared = prepare(export_model(small_mlp(), (torch.randn(2, 8),)), EscQuantizer(QuantConfig()))
    bad = torch.randn(2, 8)
    bad[0, 3] = float("nan")
    with pytest.raises(NonFiniteActivationError, match=r"NaN at linear input"):
        observe(prepared, [(bad,)])


def test_observing_a_float_model_is_refused() -> None:
    gm = export_model(small_mlp(), (torch.randn(2, 8),))
    with pytest.raises(CalibrationDataError, match="prepare_pt2e"):
        observe(gm, [(torch.randn(2, 8),)])


def test_prepare_refuses_an_eager_module() -> None:
    with pytest.raises(TypeError, match="export_model"):
        prepare(small_mlp(), EscQuantizer())  # type: ignore[arg-type]


def test_constant_activation_gets_a_finite_scale() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 8)).eval()
    torch.nn.init.zeros_(model[0].weight)
    torch.nn.init.zeros_(model[0].bias)
    prepared = prepare(export_model(model, (torch.randn(2, 8),)), EscQuantizer(QuantConfig(method="entropy")))
    observe(prepared, [(torch.zeros(2, 8),)])
    from esc_ao.pipeline import convert

    out = convert(prepared)(torch.randn(2, 8))
    assert torch.isfinite(out).all()
