"""The synthetic task domains: deterministic, disjoint splits, demonstrations that verify."""

from __future__ import annotations

import json
import random

import pytest

from gopd_core.tasks import (
    DOMAINS,
    UnknownTaskDomainError,
    arithmetic,
    codegen,
    demonstration_of,
    make_split,
    verify,
    verify_batch,
    write_prompt_datasets,
)
from storage.parquet import read_shards
from storage.schemas import PROMPTS


def test_arithmetic_example_by_hand():
    # ((7+5)*3)-4: the multiplication needs parentheses around 7+5; steps 12, 36, 32
    problem = arithmetic.ArithmeticProblem(operands=(7, 5, 3, 4), operators=("+", "*", "-"))
    assert arithmetic.prompt_text(problem) == "Compute (7+5)*3-4."
    assert arithmetic.demonstration(problem) == "7+5=12\n12*3=36\n36-4=32\n\\boxed{32}"
    assert problem.answer == 32


def test_arithmetic_expression_matches_python_eval():
    rng = random.Random(1)
    for _ in range(200):
        problem = arithmetic.sample_problem(rng)
        assert eval(problem.expression) == problem.answer  # noqa: S307 - our own digits and operators
        assert all(0 <= step[3] <= arithmetic.MAX_VALUE for step in problem.steps)


def test_code_examples_pin_the_function_down():
    rng = random.Random(2)
    for _ in range(50):
        body, visible, hidden = codegen.sample_problem(rng)
        target = codegen.evaluate(body)
        for _, candidate in codegen._CANDIDATES:
            if all(candidate(x) == target(x) for x in visible):
                assert all(candidate(x) == target(x) for x in hidden)


@pytest.mark.parametrize("domain", sorted(DOMAINS))
def test_make_split_is_deterministic_and_fits_the_schema(domain, tmp_path):
    rows = make_split(domain, "train", 20, seed=3)
    assert rows == make_split(domain, "train", 20, seed=3)
    assert rows != make_split(domain, "train", 20, seed=4)
    assert len({row["prompt_id"] for row in rows}) == 20
    assert all(row["domain"] == domain and row["messages"][0]["role"] == "user" for row in rows)
    assert make_split(domain, "train", 5, seed=3) == rows[:5]  # a prefix: n does not reshuffle


@pytest.mark.parametrize("domain", sorted(DOMAINS))
def test_train_and_test_share_no_prompt(domain):
    train = {row["messages"][0]["content"] for row in make_split(domain, "train", 300, seed=0)}
    test = {row["messages"][0]["content"] for row in make_split(domain, "test", 100, seed=0)}
    assert not train & test


def test_write_prompt_datasets(tmp_path):
    written = write_prompt_datasets(tmp_path, n_train=6, n_test=3, seed=0)
    assert sorted(written) == ["code/test", "code/train", "math/test", "math/train"]
    table = read_shards([tmp_path / "math" / "train.parquet"], PROMPTS)
    assert table.num_rows == 6
    assert table.to_pylist() == make_split("math", "train", 6, seed=0)


def test_demonstrations_are_correct_and_wrong_answers_are_not():
    rows = make_split("math", "test", 4, seed=0) + make_split("code", "test", 4, seed=0)
    domains = [row["domain"] for row in rows]
    truths = [row["ground_truth"] for row in rows]
    assert verify_batch(domains, [demonstration_of(row) for row in rows], truths) == [1.0] * 8
    wrong = ["1+1=2\n\\boxed{1000}"] * 4 + ["def f(x): return 1000"] * 4
    assert verify_batch(domains, wrong, truths) == [0.0] * 8


def test_verify_single_and_code_in_a_fence():
    row = make_split("code", "test", 1, seed=0)[0]
    fenced = f"```python\n{demonstration_of(row)}\n```"
    assert verify("code", fenced, row["ground_truth"]) == 1.0
    tests = json.loads(row["ground_truth"])
    assert len(tests) == codegen.VISIBLE_EXAMPLES + codegen.HIDDEN_TESTS
    assert verify("math", "\\boxed{32}", "32") == 1.0
    assert verify("math", "\\boxed{31}", "32") == 0.0


def test_unknown_domain_is_refused():
    with pytest.raises(UnknownTaskDomainError, match="unknown task domain 'poetry'"):
        make_split("poetry", "train", 1)
    with pytest.raises(UnknownTaskDomainError):
        verify("poetry", "x", "y")
    with pytest.raises(ValueError, match="unknown split"):
        make_split("math", "dev", 1)
