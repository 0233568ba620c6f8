"""Tests of the tokenizer, the parser and the AST walks (psnrl/trainer/reward/lexer.py, parse.py,
nodes.py): the AST shapes, and the bounds that reject an answer before anything is computed."""
from __future__ import annotations

from fractions import Fraction as F

import pytest

from psnrl.trainer.reward import DEFAULT_CONFIG, RewardConfig, math_reward
from psnrl.trainer.reward.config import _ParseError, _Reject
from psnrl.trainer.reward.lexer import _num_value, _tokenize
from psnrl.trainer.reward.nodes import _count_pm, _expand_pm, _free_symbols, _name_like
from psnrl.trainer.reward.parse import _Parser

DEEP_SHORT = "(" * 500 + "1" + ")" * 500       # under the length bound, over the depth bound


def parse(s: str, cfg: RewardConfig = DEFAULT_CONFIG):
    return _Parser(s, cfg).parse()


def num(v) -> tuple:
    return ("num", F(v))


@pytest.mark.parametrize("text,ast", [
    (r"\frac{1}{2}", ("div", num(1), num(2))),
    ("1.5e3", num(1500)),
    ("x=5", ("rel", "=", ("sym", "x"), num(5))),
    ("(1,2]", ("tuple", "(", "]", num(1), num(2))),
    (r"\{1,2\}", ("set", num(1), num(2))),
    (r"\sqrt[3]{8}", ("root", num(8), num(3))),
    ("2x", ("mul", num(2), ("sym", "x"))),
    (r"\sin x", ("func", "sin", ("sym", "x"))),
    ("3!", ("func", "factorial", num(3))),
    (r"\log_2 8", ("func", "log", num(8), num(2))),
    (r"\begin{pmatrix}1&2\end{pmatrix}", ("matrix", 2, num(1), num(2))),
    ("a,b", ("list", ("sym", "a"), ("sym", "b"))),
])
def test_parser_ast_shapes(text, ast):
    assert parse(text) == ast


@pytest.mark.parametrize("text", ["x==1", "1<2<3", "(1,2", r"\foo{1}", "1 @ 2", r"\begin{pmatrix}1\end{bmatrix}"])
def test_parser_refuses_what_is_outside_the_subset(text):
    with pytest.raises((_ParseError, _Reject)):
        parse(text)


def test_tokenizer_and_number_literals():
    assert _tokenize("2x+1", DEFAULT_CONFIG) == [("num", "2"), ("word", "x"), ("op", "+"), ("num", "1")]
    assert _num_value("1.5e3") == 1500 and _num_value(".25") == F(1, 4)
    with pytest.raises(_Reject):
        _num_value("1e401")                     # the exponent of a literal is bounded
    with pytest.raises(_Reject):
        _tokenize("1+" * 500, RewardConfig(max_tokens=100))


def test_pm_expansion_and_ast_walks():
    ast = parse(r"1\pm 2")
    assert _count_pm(ast) == 1
    assert _expand_pm(ast, DEFAULT_CONFIG) == ("list", ("add", num(1), num(2)),
                                               ("add", num(1), ("neg", num(2))))
    assert _count_pm(parse(r"1\pm 2 \pm 3")) == 2
    with pytest.raises(_Reject):                # 2**4 expansions: over max_pm
        _expand_pm(parse(r"1\pm 2\pm 3\pm 4\pm 5"), DEFAULT_CONFIG)
    with pytest.raises(_ParseError):            # \pm inside an ordered structure
        _expand_pm(parse(r"(1\pm 2, 3)"), DEFAULT_CONFIG)
    assert _free_symbols(parse("x+y*z")) == {"x", "y", "z"}
    assert _name_like(parse("ab")) and _name_like(parse("x")) and not _name_like(parse("2a"))


def test_bounds_reject_before_computing():
    with pytest.raises(_Reject):
        _Parser(DEEP_SHORT, DEFAULT_CONFIG).parse()
    with pytest.raises(_Reject):
        parse("1+" * 60 + "1", RewardConfig(max_nodes=50))
    with pytest.raises(_Reject):
        parse("1," * 70 + "1")                  # over max_items (64)


def test_the_nesting_bound_is_the_documented_number_of_groups_and_configurable():
    def nested(d: int) -> str:
        return r"\boxed{" + "(" * d + "1" + ")" * d + "}"
    assert DEFAULT_CONFIG.max_depth == 40
    assert math_reward(nested(40), "1") == 1.0 and math_reward(nested(41), "1") == 0.0
    deeper = RewardConfig(max_depth=60)
    assert math_reward(nested(60), "1", config=deeper) == 1.0
    assert math_reward(nested(61), "1", config=deeper) == 0.0
    braces = r"\boxed{" + r"\frac{1}{" * 20 + "1" + "}" * 20 + "}"  # 20 nested arguments
    assert math_reward(braces, "1") == 1.0
