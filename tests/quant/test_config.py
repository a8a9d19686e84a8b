from __future__ import annotations

import pytest

from tmpq.errors import TmpqError
from tmpq.quant import QuantConfig, QuantSpec


def test_quant_config_json_round_trip_and_hashable():
    c = QuantConfig.from_mapping({"b.conv": (4, 8), "a.lin": (8, 6), "attn.qk": (None, 8), "fp": (None, None)})
    again = QuantConfig.from_json(c.to_json())
    assert again == c and hash(again) == hash(c)
    assert c["b.conv"] == (4, 8) and c["fp"] == (None, None)
    assert [n for n, _, _ in c.bits] == sorted(["b.conv", "a.lin", "attn.qk", "fp"])
    assert len({c, again}) == 1


def test_quant_config_errors():
    with pytest.raises(TmpqError, match="twice"):
        QuantConfig((("a", 4, 4), ("a", 8, 8)))
    with pytest.raises(TmpqError, match="not valid JSON"):
        QuantConfig.from_json('{"version": 1, "bits": {')
    with pytest.raises(TmpqError, match="version"):
        QuantConfig.from_json('{"bits": {}}')


def test_quant_spec_validates_and_round_trips():
    spec = QuantSpec(w_bits=[8, 4, 4], pin={"*conv_in": (8, 8)})
    assert spec.w_bits == (4, 8) and spec.pin == (("*conv_in", 8, 8),)
    assert QuantSpec.from_dict(spec.to_dict()) == spec
    assert spec.pinned("unet.conv_in") == (8, 8) and spec.pinned("unet.conv_out") is None
    for bad in ({"w_bits": ()}, {"a_bits": (0,)}, {"w_bits": (9,)}, {"pin": {"x": (16, 8)}}, {"act_method": "p99"}):
        with pytest.raises(TmpqError):
            QuantSpec(**bad)


def test_a_narrowed_spec_is_covered_by_the_wider_one_and_old_specs_read_as_range_only():
    """A one-precision search calibrates one width (`narrowed`); a super-network calibrated at more widths under the
    same settings serves it (`covers`), one under other settings or lacking the width does not."""
    wide = QuantSpec(w_bits=(4, 6, 8), a_bits=(6, 8))
    one = wide.narrowed((6,), (8,))
    assert (one.w_bits, one.a_bits) == ((6,), (8,)) and one.pin == wide.pin
    assert wide.covers(one) and one.covers(one) and not one.covers(wide)
    assert not wide.covers(QuantSpec(w_bits=(6,), a_bits=(8,), reconstruction=None))  # other settings
    assert not wide.covers(wide.narrowed((5, 6), (8,)))
    assert QuantSpec().reconstruction == "brecq"  # the default, measured in docs/results.md
    old = {k: v for k, v in wide.to_dict().items() if k != "reconstruction"}  # saved before reconstruction existed
    assert QuantSpec.from_dict(old).reconstruction is None


def test_include_exclude_patterns():
    spec = QuantSpec(include=("unet.*",), exclude=("*attentions*",))
    assert spec.selects("unet.conv_in")
    assert not spec.selects("unet.mid_block.attentions.0.to_q")
    assert not spec.selects("other.conv")


def test_pins_may_keep_full_precision():
    spec = QuantSpec(pin={"*conv_in": (8, None), "*head": (None, None)})
    assert spec.pinned("unet.conv_in") == (8, None) and spec.pinned("x.head") == (None, None)
    assert QuantSpec.from_dict(spec.to_dict()) == spec
