"""Every parser of user text: any string gives a value in range or one ``ConvscopeError`` line.

The property tests feed each parser arbitrary text (and text built to look like numbers: signs,
digits of other scripts, underscores, ``nan``/``inf``, thousands of digits) and check that it
either returns a value of the promised kind and range or raises a ``ConvscopeError`` whose message
is one line, never another exception.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from convscope.errors import BadArgument, BadTarget, ConvscopeError
from convscope.methods.registry import _REGISTRY, FILL_NAMES, Param
from convscope.parsing import MAX_DIGITS, parse_class_index, parse_float, parse_int

PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Pieces a person (or a fuzzer) types into a number field: ASCII digits, digits of other scripts
# (Arabic-Indic, superscripts, fullwidth), signs, dots, exponents, underscores, words Python's
# float() knows, and white space.
PIECES = ["0", "1", "7", "9", "12", "٣", "١٢", "²", "０", "-", "+", "--", ".", "e", "E", "e-", "_", "1_000",
          "nan", "NaN", "inf", "-inf", "Infinity", "0x10", " ", "\n", "\t", "\x00", "1e308", "1e999", "٫"]
NUMBERISH = st.one_of(
    st.lists(st.sampled_from(PIECES), max_size=8).map("".join),
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(min_value=1, max_value=6000).map(lambda n: "9" * n),
    st.integers(min_value=1, max_value=6000).map(lambda n: "-" + "1" * n),
)
TEXT = st.one_of(st.text(max_size=40), NUMBERISH)


def one_line_error(call: Callable[[], Any]) -> Any:
    """``call()``'s value, or ``None`` when it raised a one-line ``ConvscopeError``."""
    try:
        return call()
    except ConvscopeError as exc:
        message = str(exc)
        assert message and "\n" not in message and "\r" not in message, repr(message)
        assert len(message) < 400, message
        return None


# ---------------------------------------------------------------- convscope.parsing


@PROPERTY
@given(TEXT)
def test_parse_class_index_gives_an_index_a_label_or_one_line(text: str) -> None:
    value = one_line_error(lambda: parse_class_index(text, subject="--target"))
    if isinstance(value, int):
        assert 0 <= value < 10**MAX_DIGITS and text.strip().isascii() and text.strip().isdigit()
    elif value is not None:
        assert isinstance(value, str) and value == text.strip() and value


@PROPERTY
@given(TEXT, st.integers(-5, 5), st.integers(5, 1000))
def test_parse_int_gives_a_whole_number_in_range_or_one_line(text: str, low: int, high: int) -> None:
    value = one_line_error(lambda: parse_int(text, subject="--n", minimum=low, maximum=high))
    if value is not None:
        assert type(value) is int and low <= value <= high


@PROPERTY
@given(TEXT, st.floats(-1e6, 0), st.floats(0, 1e6))
def test_parse_float_gives_a_finite_number_in_range_or_one_line(text: str, low: float, high: float) -> None:
    value = one_line_error(lambda: parse_float(text, subject="--x", minimum=low, maximum=high))
    if value is not None:
        assert type(value) is float and math.isfinite(value) and low <= value <= high


@pytest.mark.parametrize("text", ["²", "١٢", "０", "-5", "--5", "+3", " - 1", "1٣", ""])
def test_class_index_refuses_what_is_not_ascii_digits(text: str) -> None:
    with pytest.raises(BadTarget, match=r"^--target .*: (is not a class index|is empty)"):
        parse_class_index(text, subject="--target")


def test_class_index_refuses_a_5000_digit_number_before_converting() -> None:
    with pytest.raises(BadTarget, match=r"^--target 1{39}…: is out of range: a class index has at most 18 digits$"):
        parse_class_index("1" * 5000, subject="--target")


# ---------------------------------------------------------------- Param.parse, every registry row


def _params() -> list[tuple[str, Param]]:
    return [(f"{spec.name}.{p.name}", p) for spec in _REGISTRY.values() for p in spec.params]


def _check_value(param: Param, value: Any) -> None:
    """A parsed value is of the parameter's type and inside its bounds and choices."""
    values = value if param.multiple and isinstance(value, list) else [value]
    for item in values:
        if item is None:
            assert param.optional or param.default is None
            continue
        if param.type == "int":
            assert type(item) is int
        elif param.type == "float":
            assert type(item) is float and math.isfinite(item)
        elif param.type == "bool":
            assert type(item) is bool
        elif param.type == "fill":
            assert item in FILL_NAMES or (type(item) is float and math.isfinite(item))
        else:
            assert isinstance(item, str)
            assert param.choices is None or item in param.choices
        if param.type in ("int", "float") and item != param.default:
            assert param.minimum is None or item >= param.minimum
            assert param.maximum is None or item <= param.maximum


@pytest.mark.parametrize(("name", "param"), _params(), ids=[name for name, _ in _params()])
def test_every_registry_param_parses_any_text_to_a_value_or_one_line(name: str, param: Param) -> None:
    @PROPERTY
    @given(TEXT)
    def check(text: str) -> None:
        value = one_line_error(lambda: param.parse(text))
        if value is not None or param.optional:
            _check_value(param, value)

    check()


@pytest.mark.parametrize(("name", "param"), [(n, p) for n, p in _params() if p.type in ("int", "float", "fill")],
                         ids=[n for n, p in _params() if p.type in ("int", "float", "fill")])
def test_every_number_param_parses_any_json_value_to_a_value_or_one_line(name: str, param: Param) -> None:
    json_values = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(10**400), max_value=10**400),
                            st.floats(allow_nan=True, allow_infinity=True), TEXT)

    @PROPERTY
    @given(json_values)
    def check(raw: Any) -> None:
        value = one_line_error(lambda: param.parse(raw))
        if value is not None:
            _check_value(param, value)

    check()


@pytest.mark.parametrize("text", ["١٢", "1_000", "²", "12\u0660", "0x10", "1.5"])
def test_registry_int_params_take_ascii_digits_only(text: str) -> None:
    window = Param("window", "int", 16, "Side.", minimum=1, flag="--window", unit="pixels")
    with pytest.raises(BadArgument, match=r"^--window \S+: must be a whole number of pixels, at least 1$"):
        window.parse(text)
    topk = Param("topk", "int", 5, "k.", minimum=1, maximum=1000, flag="--topk")
    with pytest.raises(BadArgument, match=r"^--topk \S+: must be a whole number$"):
        topk.parse(text)


@pytest.mark.parametrize("text", ["١٢", "1_0.5", "²", "0x1p3", "1e5_0"])
def test_registry_float_and_fill_params_take_ascii_numbers_only(text: str) -> None:
    scale = Param("scale", "float", 1.0, "Scale.", minimum=0.0, flag="--scale")
    with pytest.raises(BadArgument, match=r"^--scale \S+: must be a number$"):
        scale.parse(text)
    fill = Param("fill", "fill", "grey", "Fill.", choices=FILL_NAMES, flag="--fill")
    with pytest.raises(BadArgument, match=r"^--fill \S+: is not grey, black, white or a number$"):
        fill.parse(text)


def test_registry_ints_of_5000_digits_name_the_bound_in_a_short_line() -> None:
    # int() of 5000 digits raised the interpreter's digit-limit ValueError; the message showed all of them.
    topk = Param("topk", "int", 5, "k.", minimum=1, maximum=1000, flag="--topk")
    with pytest.raises(BadArgument) as caught:
        topk.parse("9" * 5000)
    assert str(caught.value) == "--topk " + "9" * 39 + "…: must be at most 1000"
    window = Param("window", "int", 16, "Side.", minimum=1, flag="--window", unit="pixels")
    with pytest.raises(BadArgument) as caught:
        window.parse("9" * 5000)
    assert str(caught.value) == "--window " + "9" * 39 + "…: is out of range: at most 18 digits"
    with pytest.raises(BadArgument) as caught:
        window.parse("-" + "9" * 5000)
    assert str(caught.value) == "--window -" + "9" * 38 + "…: must be a whole number of pixels, at least 1"
    with pytest.raises(BadArgument, match=r"^--fill \S+: is not grey, black, white or a number$"):
        Param("fill", "fill", "grey", "Fill.", choices=FILL_NAMES, flag="--fill").parse("x" * 5000)


# ---------------------------------------------------------------- the analysis commands' parsers


@PROPERTY
@given(st.one_of(TEXT, st.lists(NUMBERISH, min_size=1, max_size=4).map(",".join),
                 st.lists(NUMBERISH, min_size=3, max_size=3).map(":".join),
                 st.tuples(st.floats(-1e6, 1e6), st.floats(-1e6, 1e6), st.floats(-1e3, 1e3))
                 .map(lambda t: f"{t[0]!r}:{t[1]!r}:{t[2]!r}")))
def test_amounts_give_a_bounded_list_of_finite_numbers_or_one_line(text: str) -> None:
    from convscope.analysis.limits import MAX_AMOUNT, MAX_AMOUNTS
    from convscope.cli.analysis_cmd import _numbers

    values = one_line_error(lambda: _numbers(text, "--amounts"))
    if values is not None:
        assert 1 <= len(values) <= MAX_AMOUNTS
        assert all(type(v) is float and math.isfinite(v) and abs(v) <= MAX_AMOUNT for v in values)


@PROPERTY
@given(st.one_of(st.none(), TEXT))
def test_target_option_gives_an_index_a_label_or_one_line(text: str | None) -> None:
    from convscope.cli.analysis_cmd import _target

    value = one_line_error(lambda: _target(text))
    assert value is None or (type(value) is int and value >= 0) or (isinstance(value, str) and value)


@PROPERTY
@given(st.one_of(TEXT, st.lists(st.sampled_from(["gradcam", "saliency", ",", " ", "x", "occlusion"]),
                                max_size=5).map("".join)))
def test_quality_name_lists_give_known_names_or_one_line(text: str) -> None:
    from convscope.analysis.quality import METHODS, METRICS
    from convscope.cli.analysis_cmd import _names

    for option, known in (("--methods", METHODS), ("--metrics", METRICS)):
        names = one_line_error(lambda option=option, known=known: _names(text, option, known))  # type: ignore[misc]
        if names is not None:
            assert names and all(n in known for n in names)


def test_a_list_param_takes_one_json_number_as_a_list_of_one() -> None:
    # Param.parse(5) of a multiple option raised TypeError: 'int' object is not iterable (found by the property).
    channel = next(p for spec in _REGISTRY.values() for p in spec.params if p.multiple and p.type == "int")
    assert channel.parse(5) == [5] and channel.parse(0) == [0] and channel.parse([1, "2"]) == [1, 2]
    assert channel.parse(None) is None and channel.parse("") is None


# ---------------------------------------------------------------- patches, train, ablate, serve

RANGES = st.one_of(
    TEXT,
    st.lists(st.one_of(NUMBERISH, st.tuples(NUMBERISH, NUMBERISH).map("-".join)), min_size=1, max_size=4)
    .map(",".join),
)


@PROPERTY
@given(st.one_of(st.none(), RANGES))
def test_channel_ranges_give_bounded_channel_ids_or_one_line(text: str | None) -> None:
    from convscope.cli.patches_cmd import MAX_CHANNELS, parse_channels

    channels = one_line_error(lambda: parse_channels(text))
    if channels is not None:
        assert all(type(c) is int and 0 <= c < MAX_CHANNELS for c in channels)


@PROPERTY
@given(st.one_of(st.none(), RANGES))
def test_snapshot_epochs_give_whole_numbers_or_one_line(text: str | None) -> None:
    from convscope.cli.train_cmd import _epoch_list

    epochs = one_line_error(lambda: _epoch_list(text))
    if epochs is not None:
        assert all(type(e) is int and e >= 0 for e in epochs)


@PROPERTY
@given(st.one_of(TEXT, st.tuples(st.sampled_from(["drop:", "width:", "width:conv2=", "drop:conv", "x:"]),
                                 NUMBERISH).map("".join)))
def test_ablation_variants_parse_or_give_one_line(text: str) -> None:
    from convscope.models.variants import MAX_WIDTH, parse_variant

    variant = one_line_error(lambda: parse_variant(text))
    if variant is not None:
        for operation in variant.operations:
            assert operation.kind in ("drop", "width")
            assert operation.width is None or (type(operation.width) is int and 1 <= operation.width <= MAX_WIDTH)


@PROPERTY
@given(NUMBERISH, NUMBERISH)
def test_serve_numbers_give_a_port_and_a_limit_in_range_or_one_line(port: str, megabytes: str) -> None:
    from convscope.cli.web_cmd import MAX_UPLOAD_MB, serve_numbers

    numbers = one_line_error(lambda: serve_numbers(port, megabytes))
    if numbers is not None:
        assert type(numbers[0]) is int and 0 <= numbers[0] <= 65535
        assert math.isfinite(numbers[1]) and 0.001 <= numbers[1] <= MAX_UPLOAD_MB
