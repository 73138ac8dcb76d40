"""The expression language of derived points and rule conditions, and its compiler.

A small grammar of our own (never Python's ``eval``): numbers, ``true``/``false``, the
input names the config gives, unary ``-``, ``* /``, ``+ -``, comparisons (which do not
chain), ``not`` (below comparisons, as in Python), ``and``, ``or``, parentheses, and a
fixed set of functions (``FUNCTIONS``).
Values are float64 (booleans 1.0/0.0) with two static types, number and bool, checked at
compile time so that a config error shows at load, with its column, not at run time.

``compile_expr`` turns a text into a ``Program``: bytecode for the stack VM both derive
kernels run (``derive_py.py`` documents the opcodes), its constants (interp tables
included), the inputs it uses in first-use order and its window functions.
"""

from __future__ import annotations

import math
import re
from array import array
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from native.derive_py import (
    OP_ABS,
    OP_ADD,
    OP_AGE,
    OP_AND,
    OP_CLAMP,
    OP_CONST,
    OP_DIV,
    OP_EQ,
    OP_EXP,
    OP_GE,
    OP_GT,
    OP_IF,
    OP_INTERP,
    OP_LE,
    OP_LN,
    OP_LOAD,
    OP_LOG10,
    OP_LT,
    OP_MAX,
    OP_MIN,
    OP_MUL,
    OP_NE,
    OP_NEG,
    OP_NOT,
    OP_OR,
    OP_POW,
    OP_SQRT,
    OP_SUB,
    OP_WIN,
    WINDOW_FUNCTIONS,
)

NUMBER = "number"
BOOL = "bool"

#: the plain functions: name -> (opcode, argument count; -1: 2 or more)
_PLAIN = {
    "abs": (OP_ABS, 1),
    "sqrt": (OP_SQRT, 1),
    "exp": (OP_EXP, 1),
    "ln": (OP_LN, 1),
    "log10": (OP_LOG10, 1),
    "pow": (OP_POW, 2),
    "clamp": (OP_CLAMP, 3),
    "min": (OP_MIN, -1),
    "max": (OP_MAX, -1),
}
FUNCTIONS = (*sorted([*_PLAIN, "if", "interp", "age", *WINDOW_FUNCTIONS]),)
KEYWORDS = frozenset({"and", "or", "not", "true", "false"})

_ARITH = {"+": OP_ADD, "-": OP_SUB, "*": OP_MUL, "/": OP_DIV}
_ORDER = {"<": OP_LT, "<=": OP_LE, ">": OP_GT, ">=": OP_GE}
_EQUALITY = {"==": OP_EQ, "!=": OP_NE}
_LOGIC = {"and": OP_AND, "or": OP_OR}
#: binding power of the binary operators (all left-associative)
_BP = {"or": 1, "and": 2, **dict.fromkeys([*_ORDER, *_EQUALITY], 3)}
_BP.update({"+": 4, "-": 4, "*": 5, "/": 5})
_COMPARE_BP = 3
_UNARY_BP = 6
#: `not` takes what lies between it and the next `and`/`or`, as in Python:
#: `not x > 2` is `not (x > 2)`
_NOT_BP = 2

_UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000}
#: windows beyond this many ms are refused (a ring holds 4096 readings anyway)
MAX_WINDOW_MS = 2**31 - 1
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NUMBER = re.compile(r"(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_OPERATORS = ("<=", ">=", "==", "!=", "<", ">", "+", "-", "*", "/", "(", ")", "[", "]", ",")


class ExprError(ValueError):
    """An expression that does not compile; the message says what and at which column."""


@dataclass(frozen=True, slots=True)
class Program:
    """A compiled expression (see the module docstring and ``derive_py``)."""

    code: array[int]  # 'i': opcodes with their inline operands
    consts: array[float]  # 'd'
    inputs: tuple[str, ...]  # input names in first-use order: input k of the program
    windows: tuple[tuple[int, str, int], ...]  # (input index, function, window ms)
    type: str  # "number" | "bool"
    text: str
    depth: int = field(default=1, compare=False)  # the VM stack it needs


# -- tokens ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Tok:
    kind: str  # "num" | "dur" | "name" | "op" | "end"
    text: str
    col: int
    value: float = 0.0


def _tokens(text: str) -> list[_Tok]:
    out: list[_Tok] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
            continue
        col = i + 1
        if c.isdigit() or (c == "." and i + 1 < n and text[i + 1].isdigit()):
            m = _NUMBER.match(text, i)
            assert m is not None
            end = m.end()
            suffix = _NAME.match(text, end)
            if suffix:
                unit = suffix.group()
                if unit not in _UNITS_MS or not m.group().isdigit():
                    raise ExprError(f"bad number {text[i : suffix.end()]!r} at column {col}")
                out.append(
                    _Tok("dur", text[i : suffix.end()], col, int(m.group()) * _UNITS_MS[unit])
                )
                i = suffix.end()
                continue
            value = float(m.group())
            if not math.isfinite(value):
                raise ExprError(f"number {m.group()!r} out of range at column {col}")
            out.append(_Tok("num", m.group(), col, value))
            i = end
            continue
        m = _NAME.match(text, i)
        if m:
            out.append(_Tok("name", m.group(), col))
            i = m.end()
            continue
        op = next((o for o in _OPERATORS if text.startswith(o, i)), None)
        if op is None:
            hint = "; did you mean '=='?" if c == "=" else ""
            raise ExprError(f"unexpected character {c!r} at column {col}{hint}")
        out.append(_Tok("op", op, col))
        i += len(op)
    out.append(_Tok("end", "", n + 1))
    return out


# -- syntax tree ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Node:
    kind: str  # num bool dur name unary binary call list
    col: int
    text: str = ""  # operator, function or input name
    value: float = 0.0
    args: tuple[_Node, ...] = ()


class _Parser:
    def __init__(self, text: str) -> None:
        self.toks = _tokens(text)
        self.at = 0

    def peek(self) -> _Tok:
        return self.toks[self.at]

    def next(self) -> _Tok:
        tok = self.toks[self.at]
        self.at += 1
        return tok

    def expect(self, op: str) -> _Tok:
        tok = self.peek()
        if tok.kind != "op" or tok.text != op:
            raise ExprError(f"expected {op!r} at column {tok.col}")
        return self.next()

    def parse(self) -> _Node:
        if self.peek().kind == "end":
            raise ExprError("empty expression at column 1")
        node = self.expr(0)
        tok = self.peek()
        if tok.kind != "end":
            raise ExprError(f"unexpected {tok.text!r} at column {tok.col}")
        return node

    def expr(self, min_bp: int) -> _Node:
        left = self.prefix()
        while True:
            tok = self.peek()
            bp = _BP.get(tok.text) if tok.kind in ("op", "name") else None
            if bp is None or bp <= min_bp:
                return left
            self.next()
            right = self.expr(bp)
            left = _Node("binary", tok.col, tok.text, args=(left, right))
            after = self.peek()
            if bp == _COMPARE_BP and _BP.get(after.text) == _COMPARE_BP and after.kind == "op":
                raise ExprError(
                    f"comparisons do not chain; join them with 'and' at column {after.col}"
                )

    def prefix(self) -> _Node:
        tok = self.next()
        if tok.kind == "num":
            return _Node("num", tok.col, tok.text, tok.value)
        if tok.kind == "dur":
            return _Node("dur", tok.col, tok.text, tok.value)
        if tok.kind == "name":
            if tok.text in ("true", "false"):
                return _Node("bool", tok.col, tok.text, 1.0 if tok.text == "true" else 0.0)
            if tok.text == "not":
                return _Node("unary", tok.col, "not", args=(self.expr(_NOT_BP),))
            if tok.text in KEYWORDS:
                raise ExprError(f"unexpected {tok.text!r} at column {tok.col}")
            if self.peek().text == "(" and self.peek().kind == "op":
                return self.call(tok)
            return _Node("name", tok.col, tok.text)
        if tok.kind == "op":
            if tok.text == "-":
                return _Node("unary", tok.col, "-", args=(self.expr(_UNARY_BP),))
            if tok.text == "(":
                inner = self.expr(0)
                self.expect(")")
                return inner
            if tok.text == "[":
                return self.listing(tok)
        if tok.kind == "end":
            raise ExprError(f"unexpected end of expression at column {tok.col}")
        raise ExprError(f"unexpected {tok.text!r} at column {tok.col}")

    def call(self, name: _Tok) -> _Node:
        self.expect("(")
        args: list[_Node] = []
        if self.peek().text != ")" or self.peek().kind != "op":
            args.append(self.expr(0))
            while self.peek().text == "," and self.peek().kind == "op":
                self.next()
                args.append(self.expr(0))
        self.expect(")")
        return _Node("call", name.col, name.text, args=tuple(args))

    def listing(self, open_: _Tok) -> _Node:
        items: list[_Node] = []
        if self.peek().text != "]" or self.peek().kind != "op":
            items.append(self.expr(0))
            while self.peek().text == "," and self.peek().kind == "op":
                self.next()
                items.append(self.expr(0))
        self.expect("]")
        return _Node("list", open_.col, args=tuple(items))


# -- types and code -------------------------------------------------------------------------


def _start(node: _Node) -> int:
    """The column where ``node``'s text starts (a binary node's own is its operator's)."""
    while node.kind == "binary":
        node = node.args[0]
    return node.col


def _a(t: str) -> str:
    return "a number" if t == NUMBER else "a boolean"


class _Compiler:
    def __init__(self, names: Sequence[str]) -> None:
        self.names = tuple(names)
        self.code = array("i")
        self.consts = array("d")
        self.inputs: list[str] = []
        self.windows: list[tuple[int, str, int]] = []
        self.depth = 0
        self.max_depth = 0

    def emit(self, pushes: int, *words: int) -> None:
        """``words``: an opcode and its operands; ``pushes``: its net effect on the stack."""
        self.code.extend(words)
        self.depth += pushes
        self.max_depth = max(self.max_depth, self.depth)

    def const(self, value: float) -> None:
        self.consts.append(value)
        self.emit(1, OP_CONST, len(self.consts) - 1)

    def input_index(self, node: _Node) -> int:
        if node.text not in self.names:
            known = ", ".join(self.names) if self.names else "(none)"
            raise ExprError(f"unknown input {node.text!r} at column {node.col}; inputs: {known}")
        if node.text not in self.inputs:
            self.inputs.append(node.text)
        return self.inputs.index(node.text)

    def number(self, node: _Node, what: str) -> None:
        t = self.gen(node)
        if t != NUMBER:
            raise ExprError(f"{what} needs a number, got {_a(t)} at column {_start(node)}")

    def gen(self, node: _Node) -> str:
        kind = node.kind
        if kind == "num":
            self.const(node.value)
            return NUMBER
        if kind == "bool":
            self.const(node.value)
            return BOOL
        if kind == "name":
            self.emit(1, OP_LOAD, self.input_index(node))
            return NUMBER
        if kind == "dur":
            raise ExprError(
                f"a duration ({node.text}) is only allowed as the window of a *_over function "
                f"at column {node.col}"
            )
        if kind == "list":
            raise ExprError(f"a list is only allowed in interp at column {node.col}")
        if kind == "unary":
            return self.unary(node)
        if kind == "binary":
            return self.binary(node)
        return self.call(node)

    def unary(self, node: _Node) -> str:
        (arg,) = node.args
        if node.text == "-":
            if arg.kind == "num":  # a negative literal is one constant
                self.const(-arg.value)
                return NUMBER
            t = self.gen(arg)
            if t != NUMBER:
                raise ExprError(f"'-' needs a number, got {_a(t)} at column {node.col}")
            self.emit(0, OP_NEG)
            return NUMBER
        t = self.gen(arg)
        if t != BOOL:
            raise ExprError(f"'not' needs a boolean, got {_a(t)} at column {node.col}")
        self.emit(0, OP_NOT)
        return BOOL

    def binary(self, node: _Node) -> str:
        op, (left, right) = node.text, node.args
        lt, rt = self.gen(left), self.gen(right)
        where = f"at column {node.col}"
        if op in _ARITH or op in _ORDER:
            bad = lt if lt != NUMBER else rt
            if bad != NUMBER:
                raise ExprError(f"{op!r} needs numbers, got {_a(bad)} {where}")
            self.emit(-1, (_ARITH | _ORDER)[op])
            return NUMBER if op in _ARITH else BOOL
        if op in _EQUALITY:
            if lt != rt:
                raise ExprError(
                    f"{op!r} needs two numbers or two booleans, got {_a(lt)} and {_a(rt)} {where}"
                )
            self.emit(-1, _EQUALITY[op])
            return BOOL
        bad = lt if lt != BOOL else rt
        if bad != BOOL:
            raise ExprError(f"{op!r} needs booleans, got {_a(bad)} {where}")
        self.emit(-1, _LOGIC[op])
        return BOOL

    def arity(self, node: _Node, n: int) -> None:
        if len(node.args) != n:
            s = "" if n == 1 else "s"
            raise ExprError(
                f"{node.text!r} takes {n} argument{s}, got {len(node.args)} at column {node.col}"
            )

    def call(self, node: _Node) -> str:
        name, args = node.text, node.args
        if name in _PLAIN:
            op, n = _PLAIN[name]
            if n < 0:
                if len(args) < 2:
                    raise ExprError(
                        f"{name!r} takes 2 or more arguments, got {len(args)} at column {node.col}"
                    )
            else:
                self.arity(node, n)
            for arg in args:
                self.number(arg, repr(name))
            if n < 0:
                self.emit(1 - len(args), op, len(args))
            else:
                self.emit(1 - n, op)
            return NUMBER
        if name == "if":
            self.arity(node, 3)
            ct = self.gen(args[0])
            if ct != BOOL:
                raise ExprError(
                    f"'if' needs a boolean condition, got {_a(ct)} at column {_start(args[0])}"
                )
            at, bt = self.gen(args[1]), self.gen(args[2])
            if at != bt:
                raise ExprError(
                    f"'if' branches differ: {_a(at)} and {_a(bt)} at column {_start(args[2])}"
                )
            self.emit(-2, OP_IF)
            return at
        if name == "interp":
            return self.interp(node)
        if name == "age":
            self.arity(node, 1)
            self.emit(1, OP_AGE, self.input_index(self.input_arg(node)))
            return NUMBER
        if name in WINDOW_FUNCTIONS:
            self.arity(node, 2)
            k = self.input_index(self.input_arg(node))
            dur = args[1]
            if dur.kind != "dur":
                raise ExprError(
                    f"{name!r} needs a duration such as 10m as its 2nd argument at column {dur.col}"
                )
            ms = int(dur.value)
            if not 0 < ms <= MAX_WINDOW_MS:
                raise ExprError(
                    f"{name!r} needs a window of 1ms to {MAX_WINDOW_MS}ms, got {dur.text} "
                    f"at column {dur.col}"
                )
            window = (k, name, ms)
            if window not in self.windows:
                self.windows.append(window)
            self.emit(1, OP_WIN, self.windows.index(window))
            return NUMBER
        raise ExprError(
            f"unknown function {name!r} at column {node.col}; functions: {', '.join(FUNCTIONS)}"
        )

    def input_arg(self, node: _Node) -> _Node:
        arg = node.args[0]
        if arg.kind != "name":
            raise ExprError(f"{node.text!r} needs an input name at column {_start(arg)}")
        return arg

    def interp(self, node: _Node) -> str:
        self.arity(node, 3)
        x, xs_node, ys_node = node.args
        self.number(x, "'interp'")
        xs = self.table(xs_node, "xs")
        ys = self.table(ys_node, "ys")
        if len(xs) != len(ys):
            raise ExprError(
                f"interp's xs and ys differ in length ({len(xs)} and {len(ys)}) "
                f"at column {ys_node.col}"
            )
        if len(xs) < 2:
            raise ExprError(f"interp needs at least 2 points at column {xs_node.col}")
        for k in range(1, len(xs)):
            if not xs[k] > xs[k - 1]:
                raise ExprError(f"interp's xs must increase at column {xs_node.args[k].col}")
        at = len(self.consts)
        self.consts.extend(xs)
        self.consts.extend(ys)
        self.emit(0, OP_INTERP, at, len(xs))
        return NUMBER

    def table(self, node: _Node, what: str) -> list[float]:
        if node.kind != "list":
            raise ExprError(
                f"interp's {what} must be a list of numbers such as [0, 1] at column {node.col}"
            )
        out: list[float] = []
        for item in node.args:
            if item.kind == "num":
                out.append(item.value)
            elif item.kind == "unary" and item.text == "-" and item.args[0].kind == "num":
                out.append(-item.args[0].value)
            else:
                raise ExprError(f"interp's {what} must be number constants at column {item.col}")
        return out


def compile_expr(text: str, names: Iterable[str], want: str = NUMBER) -> Program:
    """The program of ``text`` over the inputs ``names``, whose result must be of type
    ``want`` ("number" or "bool"); ExprError says what is wrong and where."""
    if want not in (NUMBER, BOOL):
        raise ValueError(f"want must be 'number' or 'bool', got {want!r}")
    names = tuple(names)
    for name in names:
        if not _NAME.fullmatch(name) or name in KEYWORDS:
            raise ExprError(
                f"{name!r} cannot be an input name (a letter or _ then letters, "
                "digits or _; not and, or, not, true or false)"
            )
    tree = _Parser(text).parse()
    c = _Compiler(names)
    got = c.gen(tree)
    if got != want:
        raise ExprError(f"the expression gives {_a(got)}, {_a(want)} is needed at column 1")
    return Program(
        code=c.code,
        consts=c.consts,
        inputs=tuple(c.inputs),
        windows=tuple(c.windows),
        type=got,
        text=text,
        depth=max(c.max_depth, 1),
    )


K = TypeVar("K", bound=Hashable)


def topo_order(deps: Mapping[K, Iterable[K]]) -> list[K]:
    """The keys of ``deps`` ordered so that each comes after those it depends on
    (``deps[k]``; keys not in ``deps`` are outside inputs); ties keep the mapping's order.
    ExprError names a cycle, e.g. ``derived points form a cycle: a -> b -> a``."""
    order: list[K] = []
    state: dict[K, int] = {}  # 1: on the current path, 2: placed
    for root in deps:
        if state.get(root) == 2:
            continue
        # iterative DFS, so a long chain of derived points cannot hit the recursion limit
        path: list[K] = [root]
        stack = [iter([d for d in deps[root] if d in deps])]
        state[root] = 1
        while stack:
            dep = next(stack[-1], None)
            if dep is None:
                stack.pop()
                done = path.pop()
                state[done] = 2
                order.append(done)
            elif state.get(dep) == 1:
                cycle = [*path[path.index(dep) :], dep]
                raise ExprError(
                    "derived points form a cycle: " + " -> ".join(str(k) for k in cycle)
                )
            elif state.get(dep) is None:
                state[dep] = 1
                path.append(dep)
                stack.append(iter([d for d in deps[dep] if d in deps]))
    return order
