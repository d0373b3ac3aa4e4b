"""The `code` domain: write a one-line Python function `f` from input/output examples.

A hidden function comes from a small family (x+a, x*a+b, a-x, x%a, max(x,a), x*x+a, ...). The
prompt shows `VISIBLE_EXAMPLES` of its input/output pairs:

    Write Python f: f(2)=7, f(5)=16, f(0)=1

The demonstration is `def f(x): return x*3+1`. The ground truth (JSON) holds the visible and
`HIDDEN_TESTS` further cases as [{"input": [x], "output": y}, ...], checked by the sandboxed
verifier. Examples are drawn so that every family member consistent with the visible examples
agrees on the hidden inputs: the task is always well posed.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass

VISIBLE_EXAMPLES = 3
HIDDEN_TESTS = 3
VISIBLE_INPUTS = range(0, 10)
HIDDEN_INPUTS = range(0, 13)


@dataclass(frozen=True)
class Family:
    """A function family: a body template over x and parameters, and the parameter ranges."""

    template: str  # Python expression in x, e.g. "x*{a}+{b}"
    ranges: dict[str, range]

    def body(self, params: dict[str, int]) -> str:
        return self.template.format(**params)


FAMILIES: dict[str, Family] = {
    "add": Family("x+{a}", {"a": range(1, 10)}),
    "mul": Family("x*{a}", {"a": range(2, 10)}),
    "affine": Family("x*{a}+{b}", {"a": range(2, 6), "b": range(1, 10)}),
    "sub_from": Family("{a}-x", {"a": range(1, 10)}),
    "mod": Family("x%{a}", {"a": range(2, 6)}),
    "max": Family("max(x,{a})", {"a": range(2, 9)}),
    "square_add": Family("x*x+{a}", {"a": range(0, 10)}),
}


def evaluate(body: str) -> Callable[[int], int]:
    """The function `lambda x: <body>` for a trusted, generated body (never for model output)."""
    return eval(f"lambda x: {body}", {"max": max})  # noqa: S307 - bodies come from FAMILIES only


def all_bodies() -> list[str]:
    """Every member of every family, as expression text."""
    bodies = []
    for family in FAMILIES.values():
        grids = [{}]
        for name, values in family.ranges.items():
            grids = [{**grid, name: value} for grid in grids for value in values]
        bodies.extend(family.body(params) for params in grids)
    return bodies


_CANDIDATES: list[tuple[str, Callable[[int], int]]] = [(body, evaluate(body)) for body in all_bodies()]


def is_well_posed(visible: list[int], hidden: list[int], target: Callable[[int], int]) -> bool:
    """True when every candidate matching `target` on `visible` also matches it on `hidden`."""
    for _, candidate in _CANDIDATES:
        if all(candidate(x) == target(x) for x in visible) and any(candidate(x) != target(x) for x in hidden):
            return False
    return True


def sample_problem(rng: random.Random) -> tuple[str, list[int], list[int]]:
    """Draw (body, visible inputs, hidden inputs) until the examples pin the function down."""
    while True:
        family = FAMILIES[rng.choice(sorted(FAMILIES))]
        body = family.body({name: rng.choice(values) for name, values in family.ranges.items()})
        target = evaluate(body)
        visible = [0, *rng.sample(list(VISIBLE_INPUTS)[1:], VISIBLE_EXAMPLES - 1)]
        hidden = rng.sample([x for x in HIDDEN_INPUTS if x not in visible], HIDDEN_TESTS)
        if is_well_posed(visible, hidden, target):
            return body, visible, hidden


def demonstration(body: str) -> str:
    return f"def f(x): return {body}"


def make_example(rng: random.Random) -> dict:
    """Prompt text, ground truth (JSON test cases), and demonstration of one fresh problem."""
    body, visible, hidden = sample_problem(rng)
    target = evaluate(body)
    shown = ", ".join(f"f({x})={target(x)}" for x in visible)
    tests = [{"input": [x], "output": target(x)} for x in [*visible, *hidden]]
    prompt = f"Write Python f: {shown}"
    return {"prompt": prompt, "ground_truth": json.dumps(tests), "demonstration": demonstration(body), "key": prompt}
