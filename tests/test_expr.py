"""The expression language (native/expr.py): syntax, types, exact error messages, every
operator and function as the derive kernels evaluate it, and topo_order."""

from __future__ import annotations

import math
import struct
from types import ModuleType

import pytest

from native import derive_py
from native.batch import Batch
from native.derive import DerivedSpec, DeriveEngine
from native.expr import ExprError, compile_expr, topo_order
from tests.helpers import load_kernels

INF = math.inf
CANONICAL_NAN = struct.pack("<d", math.nan)
assert bytes.fromhex("000000000000f87f") == CANONICAL_NAN


@pytest.fixture(params=["cython", "python"])
def mod(request: pytest.FixtureRequest) -> ModuleType:
    return load_kernels(request.param, "derive")


def evaluate(
    text: str, mod: ModuleType = derive_py, want: str = "number", **inputs: float
) -> float:
    """``text`` evaluated once, its inputs read at ts 1000 (all GOOD)."""
    names = tuple(inputs) or ("x",)
    program = compile_expr(text, names, want)
    ids = {name: k + 1 for k, name in enumerate(names)}
    pids = tuple(ids[n] for n in program.inputs)
    if not pids:  # a constant expression: give it an input so that it runs
        program = compile_expr(f"if(x == x, {text}, {text})", ("x",), want)
        pids, inputs = (1,), {"x": 0.0}
    engine = DeriveEngine([DerivedSpec(program, pids, 100)], kernels=mod)
    out, _ = engine.process(Batch.at(1000, [ids.get(n, 1) for n in inputs], list(inputs.values())))
    assert len(out) == 1
    return out.values[0]


def same(a: float, b: float) -> bool:
    return struct.pack("<d", a) == struct.pack("<d", b)


# -- syntax and precedence ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1 + 2 * 3", 7.0),
        ("(1 + 2) * 3", 9.0),
        ("10 - 2 - 3", 5.0),
        ("8 / 2 / 2", 2.0),
        ("-2 * 3", -6.0),
        ("- (2 + 3)", -5.0),
        ("--2", 2.0),
        ("1e-3 * 1000", 1.0),
        (".5 + 0.25", 0.75),
        ("2.", 2.0),
        ("1E2", 100.0),
        ("x * 2", 6.0),
        ("if(1 + 1 == 2, 1, 0)", 1.0),
        ("if(x > 2 and x < 4 or false, 1, 0)", 1.0),
    ],
)
def test_arithmetic_and_precedence(text: str, value: float) -> None:
    assert evaluate(text, x=3.0) == value


def test_not_binds_looser_than_comparisons_and_tighter_than_and() -> None:
    # as in Python: `not x > 2` is `not (x > 2)`; `not a and b` is `(not a) and b`
    assert evaluate("if(not x > 2, 1, 0)", x=3.0) == 0.0
    assert evaluate("if(not x + 1 > 5, 1, 0)", x=3.0) == 1.0
    with pytest.raises(ExprError, match=r"^'not' needs a boolean, got a number at column 4$"):
        compile_expr("if(not x, 1, 0)", ("x",))
    assert evaluate("if(not (x > 2), 1, 0)", x=3.0) == 0.0
    assert evaluate("if(not false and false, 1, 0)", x=0.0) == 0.0
    assert evaluate("if(true or false and false, 1, 0)", x=0.0) == 1.0
    assert evaluate("if(false and false or true, 1, 0)", x=0.0) == 1.0
    assert evaluate("(x > 2) == true", derive_py, "bool", x=3.0) == 1.0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("levl > 0.8", "unknown input 'levl' at column 1; inputs: h, q"),
        ("h + 1 and q > 0", "'and' needs booleans, got a number at column 7"),
        ("h > 1 or q", "'or' needs booleans, got a number at column 7"),
        ("min(h, q", "expected ')' at column 9"),
        ("interp(h, [0, 1, 1], [0, 1, 2])", "interp's xs must increase at column 18"),
        ("interp(h, [1, 0], [0, 1])", "interp's xs must increase at column 15"),
        (
            "interp(h, [0, 1], [0, 1, 2])",
            "interp's xs and ys differ in length (2 and 3) at column 19",
        ),
        ("interp(h, [0], [0])", "interp needs at least 2 points at column 11"),
        ("interp(h, [0, q], [0, 1])", "interp's xs must be number constants at column 15"),
        (
            "interp(h, 1, [0, 1])",
            "interp's xs must be a list of numbers such as [0, 1] at column 11",
        ),
        ("interp(h, [0, 1])", "'interp' takes 3 arguments, got 2 at column 1"),
        ("h < q < 1", "comparisons do not chain; join them with 'and' at column 7"),
        ("h == q != true", "comparisons do not chain; join them with 'and' at column 8"),
        ("", "empty expression at column 1"),
        ("   ", "empty expression at column 1"),
        ("h +", "unexpected end of expression at column 4"),
        ("h q", "unexpected 'q' at column 3"),
        ("h + )", "unexpected ')' at column 5"),
        ("(h + q", "expected ')' at column 7"),
        ("h = 1", "unexpected character '=' at column 3; did you mean '=='?"),
        ("h $ 1", "unexpected character '$' at column 3"),
        ("12abc", "bad number '12abc' at column 1"),
        ("1.5s", "bad number '1.5s' at column 1"),
        ("1e999", "number '1e999' out of range at column 1"),
        (
            "h + 10s",
            "a duration (10s) is only allowed as the window of a *_over function at column 5",
        ),
        ("[1, 2]", "a list is only allowed in interp at column 1"),
        (
            "foo(h)",
            "unknown function 'foo' at column 1; functions: abs, age, clamp, count_over, "
            "delta_over, exp, if, interp, ln, log10, max, max_over, mean_over, min, min_over, pow, "
            "sqrt, sum_over",
        ),
        ("abs(h, q)", "'abs' takes 1 argument, got 2 at column 1"),
        ("min(h)", "'min' takes 2 or more arguments, got 1 at column 1"),
        ("max()", "'max' takes 2 or more arguments, got 0 at column 1"),
        ("sqrt(h > 1)", "'sqrt' needs a number, got a boolean at column 6"),
        ("h + true", "'+' needs numbers, got a boolean at column 3"),
        ("(h > 1) < 2", "'<' needs numbers, got a boolean at column 9"),
        (
            "h == true",
            "'==' needs two numbers or two booleans, got a number and a boolean at column 3",
        ),
        ("-(h > 1)", "'-' needs a number, got a boolean at column 1"),
        ("not h", "'not' needs a boolean, got a number at column 1"),
        ("if(h, 1, 2)", "'if' needs a boolean condition, got a number at column 4"),
        ("if(h > 1, 1, false)", "'if' branches differ: a number and a boolean at column 14"),
        ("age(h + 1)", "'age' needs an input name at column 5"),
        ("age(x)", "unknown input 'x' at column 5; inputs: h, q"),
        ("mean_over(h)", "'mean_over' takes 2 arguments, got 1 at column 1"),
        (
            "mean_over(h, 10)",
            "'mean_over' needs a duration such as 10m as its 2nd argument at column 14",
        ),
        ("sum_over(2 * h, 1m)", "'sum_over' needs an input name at column 10"),
        (
            "min_over(h, 0s)",
            "'min_over' needs a window of 1ms to 2147483647ms, got 0s at column 13",
        ),
        ("h > 1", "the expression gives a boolean, a number is needed at column 1"),
        ("true and", "unexpected end of expression at column 9"),
        ("h and", "unexpected end of expression at column 6"),
        ("or h", "unexpected 'or' at column 1"),
    ],
)
def test_errors_say_what_and_where(text: str, message: str) -> None:
    with pytest.raises(ExprError) as info:
        compile_expr(text, ("h", "q"), "number")
    assert str(info.value) == message
    assert isinstance(info.value, ValueError)


def test_result_type_is_checked() -> None:
    with pytest.raises(ExprError, match=r"^the expression gives a number, a boolean is needed"):
        compile_expr("h + 1", ("h",), "bool")
    assert compile_expr("h > 1", ("h",), "bool").type == "bool"
    assert compile_expr("if(h > 1, h, 0)", ("h",), "number").type == "number"
    with pytest.raises(ValueError, match="want must be"):
        compile_expr("h", ("h",), "int")


@pytest.mark.parametrize("name", ["and", "not", "true", "1x", "a-b", ""])
def test_bad_input_names_are_refused(name: str) -> None:
    with pytest.raises(ExprError, match="cannot be an input name"):
        compile_expr("1", (name,))


def test_unknown_input_with_no_inputs() -> None:
    with pytest.raises(ExprError, match=r"^unknown input 'h' at column 1; inputs: \(none\)$"):
        compile_expr("h", ())


def test_program_inputs_windows_and_consts() -> None:
    p = compile_expr(
        "mean_over(b, 10m) + a + age(c) + mean_over(b, 600s) + max_over(a, 500ms)",
        ("a", "b", "c", "unused"),
    )
    assert p.inputs == ("b", "a", "c")  # first use, not the order given
    assert p.windows == ((0, "mean_over", 600_000), (1, "max_over", 500))  # the same one once
    assert p.type == "number"
    assert p.code.typecode == "i" and p.consts.typecode == "d"
    q = compile_expr("interp(x, [0, 0.5, 1.0], [0, 1.2, 4.0])", ("x",))
    assert list(q.consts) == [0.0, 0.5, 1.0, 0.0, 1.2, 4.0]  # xs then ys
    assert q.text == "interp(x, [0, 0.5, 1.0], [0, 1.2, 4.0])"
    d = compile_expr("sum_over(x, 2h)", ("x",))
    assert d.windows == ((0, "sum_over", 7_200_000),)


# -- operators and functions ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "inputs", "expected"),
    [
        ("a / b", {"a": 1.0, "b": 0.0}, INF),
        ("a / b", {"a": -1.0, "b": 0.0}, -INF),
        ("a / -b", {"a": 1.0, "b": 0.0}, -INF),
        ("a / b", {"a": 0.0, "b": 0.0}, math.nan),
        ("a / b", {"a": INF, "b": INF}, math.nan),
        ("a * b", {"a": INF, "b": 0.0}, math.nan),
        ("a - b", {"a": INF, "b": INF}, math.nan),
        ("a * b", {"a": 1e308, "b": 10.0}, INF),
        ("ln(a)", {"a": 0.0}, -INF),
        ("ln(-a)", {"a": 0.0}, -INF),
        ("ln(a)", {"a": -1.0}, math.nan),
        ("ln(a)", {"a": math.e}, 1.0),
        ("log10(a)", {"a": 1000.0}, 3.0),
        ("log10(a)", {"a": 0.0}, -INF),
        ("log10(a)", {"a": -5.0}, math.nan),
        ("sqrt(a)", {"a": -1.0}, math.nan),
        ("sqrt(a)", {"a": 9.0}, 3.0),
        ("sqrt(-a)", {"a": 0.0}, -0.0),
        ("exp(a)", {"a": 1000.0}, INF),
        ("exp(a)", {"a": -INF}, 0.0),
        ("exp(a)", {"a": 0.0}, 1.0),
        ("pow(a, b)", {"a": 2.0, "b": 10.0}, 1024.0),
        ("pow(a, b)", {"a": 10.0, "b": 309.0}, INF),
        ("pow(a, b)", {"a": -10.0, "b": 309.0}, -INF),
        ("pow(a, b)", {"a": -10.0, "b": 310.0}, INF),
        ("pow(a, b)", {"a": -8.0, "b": 1.0 / 3.0}, math.nan),
        ("pow(a, b)", {"a": 0.0, "b": -1.0}, INF),
        ("pow(-a, b)", {"a": 0.0, "b": -1.0}, -INF),
        ("pow(-a, b)", {"a": 0.0, "b": -2.0}, INF),
        ("pow(a, b)", {"a": math.nan, "b": 0.0}, 1.0),
        ("pow(a, b)", {"a": 1.0, "b": math.nan}, 1.0),
        ("pow(a, b)", {"a": 0.5, "b": 2000.0}, 0.0),
        ("abs(a)", {"a": -2.5}, 2.5),
        ("abs(a)", {"a": -math.nan}, math.nan),
        ("-a", {"a": math.nan}, math.nan),  # the sign of a NaN never shows
        ("min(a, b)", {"a": 1.0, "b": -2.0}, -2.0),
        ("min(a, b, 0.5)", {"a": 1.0, "b": 2.0}, 0.5),
        ("max(a, b, 0.5)", {"a": 1.0, "b": 2.0}, 2.0),
        ("min(a, b)", {"a": math.nan, "b": 1.0}, math.nan),
        ("max(a, b)", {"a": 1.0, "b": math.nan}, math.nan),
        ("clamp(a, 0, 10)", {"a": 12.0}, 10.0),
        ("clamp(a, 0, 10)", {"a": -1.0}, 0.0),
        ("clamp(a, 0, 10)", {"a": 5.0}, 5.0),
        ("clamp(a, b, 10)", {"a": 5.0, "b": math.nan}, math.nan),
        ("clamp(a, 0, 10)", {"a": math.nan}, math.nan),
        ("if(a > 0, a, b)", {"a": 1.0, "b": 7.0}, 1.0),
        ("if(a > 0, a, b)", {"a": -1.0, "b": 7.0}, 7.0),
        ("if(a > 0, a, b)", {"a": math.nan, "b": 7.0}, 7.0),  # NaN compares false
    ],
)
def test_ieee_semantics(
    mod: ModuleType, text: str, inputs: dict[str, float], expected: float
) -> None:
    got = evaluate(text, mod, "number", **inputs)
    if math.isnan(expected):
        assert struct.pack("<d", got) == CANONICAL_NAN
    else:
        assert same(got, expected), (got, expected)


@pytest.mark.parametrize(
    ("text", "a", "b", "expected"),
    [
        ("a < b", 1.0, 2.0, 1.0),
        ("a <= b", 2.0, 2.0, 1.0),
        ("a > b", 1.0, 2.0, 0.0),
        ("a >= b", 2.0, 2.0, 1.0),
        ("a == b", 2.0, 2.0, 1.0),
        ("a != b", 2.0, 2.0, 0.0),
        ("a == b", math.nan, math.nan, 0.0),
        ("a != b", math.nan, math.nan, 1.0),
        ("a < b", math.nan, 1.0, 0.0),
        ("a >= b", 1.0, math.nan, 0.0),
        ("a > 0 and b > 0", 1.0, 1.0, 1.0),
        ("a > 0 and b > 0", 1.0, -1.0, 0.0),
        ("a > 0 or b > 0", -1.0, 1.0, 1.0),
        ("a > 0 or b > 0", -1.0, -1.0, 0.0),
        ("not (a > 0)", 1.0, 0.0, 0.0),
        ("(a > 0) == (b > 0)", 1.0, 2.0, 1.0),
        ("(a > 0) != true", 1.0, 2.0, 0.0),
        ("false or true", 0.0, 0.0, 1.0),
    ],
)
def test_comparisons_and_logic(
    mod: ModuleType, text: str, a: float, b: float, expected: float
) -> None:
    assert evaluate(text, mod, "bool", a=a, b=b) == expected


@pytest.mark.parametrize(
    ("x", "expected"),
    [
        (-5.0, 0.0),  # constant beyond the ends
        (0.0, 0.0),
        (0.25, 0.6),
        (0.5, 1.2),
        (0.75, 2.6),
        (1.0, 4.0),
        (7.0, 4.0),
        (INF, 4.0),
        (-INF, 0.0),
    ],
)
def test_interp(mod: ModuleType, x: float, expected: float) -> None:
    got = evaluate("interp(h, [0, 0.5, 1.0], [0, 1.2, 4.0])", mod, h=x)
    assert got == pytest.approx(expected, abs=1e-12)


def test_interp_nan_and_negative_constants(mod: ModuleType) -> None:
    assert same(evaluate("interp(h, [-1, 1], [10, -10])", mod, h=math.nan), math.nan)
    assert evaluate("interp(h, [-1, 1], [10, -10])", mod, h=0.5) == -5.0


def test_the_docs_example(mod: ModuleType) -> None:
    text = "interp(h, [0, 0.5, 1.0], [0, 1.2, 4.0]) * if(q > 0, 1, 0)"
    assert evaluate(text, mod, h=0.75, q=1.0) == pytest.approx(2.6)
    assert evaluate(text, mod, h=0.75, q=0.0) == 0.0


# -- topo_order ---------------------------------------------------------------------------


def test_topo_order_puts_inputs_first_and_keeps_ties() -> None:
    deps = {"c": ["b", "raw1"], "a": ["raw2"], "b": ["a"], "d": []}
    assert topo_order(deps) == ["a", "b", "c", "d"]
    assert topo_order({"x": [], "y": []}) == ["x", "y"]
    assert topo_order({}) == []
    assert topo_order({1: [2], 2: [3], 3: []}) == [3, 2, 1]


@pytest.mark.parametrize(
    ("deps", "message"),
    [
        ({"a": ["a"]}, "derived points form a cycle: a -> a"),
        ({"a": ["b"], "b": ["a"]}, "derived points form a cycle: a -> b -> a"),
        (
            {"x": [], "a": ["b"], "b": ["c"], "c": ["a"]},
            "derived points form a cycle: a -> b -> c -> a",
        ),
        ({"a": ["b"], "b": ["c"], "c": ["b"]}, "derived points form a cycle: b -> c -> b"),
    ],
)
def test_topo_order_names_a_cycle(deps: dict[str, list[str]], message: str) -> None:
    with pytest.raises(ExprError) as info:
        topo_order(deps)
    assert str(info.value) == message


def test_topo_order_long_chain() -> None:
    deps = {f"p{k}": [f"p{k + 1}"] for k in range(5000)}
    order = topo_order(deps)
    assert order[0] == "p4999" and order[-1] == "p0"
