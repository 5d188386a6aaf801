"""The OPs profiler and the ``s2bnn profile`` command."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from s2bnn.errors import ModelError
from s2bnn.models import build_model
from s2bnn.models.profile import format_profile, profile_model
from s2bnn.nn import QuantConv2d, QuantLinear

KEYS = {
    "real_params", "binary_params", "flops", "bops", "ops", "size_float32_bytes",
    "size_packed_bytes",
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class _Toy(nn.Module):
    """Known layers: real stem, binary conv, step-1 conv, binary linear, real fc."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, 2, 1, bias=False)  # 8x8 -> 4x4
        self.bconv = QuantConv2d(
            4, 6, 3, 1, 1, input_quantizer="react_sign", weight_quantizer="scaled_sign"
        )
        self.step1 = QuantConv2d(6, 6, 1, input_quantizer="react_sign")
        self.blin = QuantLinear(6, 5, input_quantizer="ste_sign", weight_quantizer="scaled_sign")
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.step1(self.bconv(self.stem(x))).mean((2, 3))
        return self.fc(self.blin(y))


def test_counts_follow_the_formulas_on_a_known_model() -> None:
    model = _Toy().train()
    prof = profile_model(model, image_size=8, in_chans=1)
    assert KEYS <= set(prof)
    assert model.training  # mode restored
    binary_params = 6 * 4 * 9 + 5 * 6
    real_params = 4 * 9 + 6 * 6 + 5 + 5 * 3 + 3  # stem, step-1 conv, blin bias, fc
    assert prof["binary_params"] == binary_params
    assert prof["real_params"] == real_params
    assert prof["bops"] == 16 * 6 * 4 * 9 + 6 * 5
    assert prof["flops"] == 16 * 4 * 9 + 16 * 6 * 6 + 5 * 3
    assert prof["ops"] == pytest.approx(prof["bops"] / 64 + prof["flops"])
    assert prof["size_float32_bytes"] == 4 * (real_params + binary_params)
    assert prof["size_packed_bytes"] == 4 * real_params + (binary_params + 7) // 8


def test_reactnet_a_matches_the_paper() -> None:
    prof = profile_model(build_model("reactnet_a", num_classes=1000), 224, 3)
    # ReActNet paper: 0.12 x 10^8 FLOPs, 0.87 x 10^8 OPs (two significant digits).
    assert prof["flops"] == pytest.approx(0.12e8, rel=0.05)
    assert prof["ops"] == pytest.approx(0.87e8, rel=0.01)
    assert prof["binary_params"] > 25 * prof["real_params"]


def test_step1_and_real_counterpart_have_no_bops() -> None:
    for kwargs in ({"binary_weight": False}, {"binary_act": False, "binary_weight": False}):
        model = build_model("reactnet_small", width_mult=0.125, **kwargs)
        prof = profile_model(model, image_size=28, in_chans=1)
        assert prof["bops"] == 0 and prof["binary_params"] == 0
        assert prof["flops"] > 0 and prof["ops"] == prof["flops"]


def test_bad_sizes_and_channels() -> None:
    model = build_model("reactnet_small", width_mult=0.125)
    with pytest.raises(ModelError, match="positive"):
        profile_model(model, image_size=0, in_chans=1)
    with pytest.raises(ModelError, match="1-channel"):
        profile_model(model, image_size=28, in_chans=3)

    class Unpadded(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x)

    with pytest.raises(ModelError, match="cannot take 1x3x3 images"):
        profile_model(Unpadded(), image_size=3, in_chans=1)


def test_cli_profile_json_and_table(capsys: pytest.CaptureFixture[str]) -> None:
    from s2bnn.cli import main

    argv = ["profile", "reactnet_small", "width_mult=0.125", "--image-size", "28",
            "--in-chans", "1", "--num-classes", "0"]
    assert main(argv + ["--json"]) == 0
    prof = json.loads(capsys.readouterr().out)
    assert KEYS <= set(prof) and prof["bops"] > 0
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "OPs" in table and "reactnet_small" in table
    assert format_profile("x", prof).count("\n") == 8
    assert main(["profile", "no_such_model"]) == 2
    assert "known models" in capsys.readouterr().err
