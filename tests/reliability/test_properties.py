"""Property-based tests (hypothesis): the prompt loader and the objective on arbitrary input either
give a valid result or raise their own clear error, never anything else.

- `load_prompts` on random JSONL (random fields, types, junk lines): a PROMPTS table or a DatasetError.
- `gopd_advantages`, `policy_loss`, `group_advantages` on random shapes, masks and extreme log-probs
  (-1e4..0, plus NaN/inf): finite outputs, or NonFiniteInputError / ValueError naming the problem.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gopd_core.objectives import (
    AGGREGATIONS,
    NonFiniteInputError,
    gopd_advantages,
    group_advantages,
    policy_loss,
)
from storage.datasets import DatasetError, load_prompts
from storage.schemas import PROMPTS

FAST = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- the prompt loader ---------------------------------------------------------------------------

odd_text = st.one_of(st.text(max_size=12), st.sampled_from(["", "   ", "\ud800", "a\udfffb", "\x00", "1+1?"]))
json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20),
                        st.floats(allow_nan=True, allow_infinity=True), odd_text)
json_value = st.recursive(json_scalar, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(odd_text, inner, max_size=3)), max_leaves=6)
message = st.fixed_dictionaries({}, optional={"role": json_value, "content": json_value})
prompt_value = st.one_of(odd_text, st.lists(st.one_of(message, json_value), max_size=3), json_value)
optional_fields = {"domain": json_value, "id": json_value, "extra_field": json_value}
row = st.one_of(  # mostly rows with both required fields, so that the type checks are what is probed
    st.fixed_dictionaries({"prompt": prompt_value, "answer": json_value}, optional=optional_fields),
    st.fixed_dictionaries({}, optional={"prompt": prompt_value, "answer": json_value, **optional_fields}))
line = st.one_of(row.map(json.dumps), row.map(json.dumps), row.map(json.dumps), json_value.map(json.dumps),
                 st.sampled_from(["", "   ", "{not json", "[1, 2", "\"just text\""]))


@FAST
@given(lines=st.lists(line, max_size=6))
@example(lines=['{"prompt": "a\\ud800b", "answer": "1"}'])  # a lone surrogate once escaped a DatasetError
def test_jsonl_loader_returns_prompts_or_a_dataset_error(lines):
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "prompts.jsonl"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        try:
            table = load_prompts(path)
        except DatasetError as err:
            assert str(path) in str(err)  # says which file
            return
    assert isinstance(table, pa.Table) and table.schema.equals(PROMPTS)
    assert table.num_rows == sum(1 for text in lines if text.strip())
    assert len(set(table.column("prompt_id").to_pylist())) == table.num_rows
    for messages in table.column("messages").to_pylist():
        assert messages and any(m["content"].strip() for m in messages)


def test_the_loader_property_can_fail():
    """Positive control: rows the property accepts really load (so the property is not vacuous)."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "ok.jsonl"
        path.write_text('{"prompt": "1+1?", "answer": 2}\n{"prompt": [{"role": "user", "content": "x"}], "answer": null}\n')
        assert load_prompts(path).num_rows == 2


# -- the objective -------------------------------------------------------------------------------

SPECIAL = [float("nan"), float("inf"), float("-inf")]


@st.composite
def logprob_tensors(draw, count: int):
    """`count` (B, T) log-prob tensors in [-1e4, 0] (extremes favoured); now and then one holds a NaN or inf."""
    batch, tokens = draw(st.integers(1, 5)), draw(st.integers(1, 7))
    element = st.one_of(st.floats(-1e4, 0.0, width=32), st.sampled_from([-1e4, -5e3, -100.0, 0.0, -1e-30]))
    tensors = [torch.tensor(draw(st.lists(st.lists(element, min_size=tokens, max_size=tokens),
                                          min_size=batch, max_size=batch)), dtype=torch.float32)
               for _ in range(count)]
    if draw(st.integers(0, 4)) == 0:  # one example in five: a single NaN/inf somewhere
        tensor = tensors[draw(st.integers(0, count - 1))]
        tensor[draw(st.integers(0, batch - 1)), draw(st.integers(0, tokens - 1))] = draw(st.sampled_from(SPECIAL))
    return tensors


def _finite(*tensors) -> bool:
    return all(t is None or bool(torch.isfinite(t).all()) for t in tensors)


lams = st.one_of(st.floats(1e-6, 100.0), st.sampled_from([1.0, 0.0, -1.0, float("nan"), float("inf"), 1e300]))


@FAST
@given(tensors=logprob_tensors(3), lam=lams, with_reference=st.booleans())
@example(tensors=[torch.zeros(1, 1), torch.full((1, 1), -1e4), torch.zeros(1, 1)], lam=1e300, with_reference=True)
def test_gopd_advantages_are_finite_or_refused(tensors, lam, with_reference):
    student, teacher, reference = tensors
    reference = reference if with_reference else None
    try:
        advantages = gopd_advantages(student, teacher, reference, reward_scale=lam)
    except NonFiniteInputError as err:
        assert "non-finite" in str(err)
        return
    except ValueError as err:
        assert "reward_scale" in str(err)
        bad_lam = not (math.isfinite(lam) and lam > 0)
        assert bad_lam or (lam != 1 and reference is None), err
        return
    assert math.isfinite(lam) and lam > 0 and _finite(student, teacher)
    assert advantages.shape == student.shape and _finite(advantages)
    if lam == 1:
        assert torch.equal(advantages, teacher - student)  # the reference cancels exactly at lam = 1


@FAST
@given(tensors=logprob_tensors(4), data=st.data())
def test_policy_loss_is_finite_or_refused(tensors, data):
    logprobs, old, rollout, reference = tensors
    shape = logprobs.shape
    advantages = torch.tensor(data.draw(st.lists(st.floats(-1e6, 1e6, width=32), min_size=shape.numel(),
                                                 max_size=shape.numel())), dtype=torch.float32).reshape(shape)
    mask = torch.tensor(data.draw(st.lists(st.booleans(), min_size=shape.numel(), max_size=shape.numel())),
                        dtype=torch.float32).reshape(shape)
    aggregation = data.draw(st.sampled_from(sorted(AGGREGATIONS) + ["sum-of-everything"]))
    use_rollout, use_reference = data.draw(st.booleans()), data.draw(st.booleans())
    logprobs.requires_grad_(True)
    try:
        loss, metrics = policy_loss(logprobs, old, advantages, mask, 0.2, 0.28, rollout if use_rollout else None,
                                    5.0, aggregation, reference if use_reference else None)
    except NonFiniteInputError as err:
        assert "non-finite" in str(err)
        return
    except ValueError as err:
        assert aggregation not in AGGREGATIONS and "unknown aggregation" in str(err)
        return
    assert aggregation in AGGREGATIONS
    assert _finite(logprobs, old, rollout if use_rollout else None, reference if use_reference else None)
    loss.backward()
    assert math.isfinite(loss.item()) and _finite(logprobs.grad)
    assert all(math.isfinite(v) for v in metrics.values()), metrics


group_keys = st.one_of(st.integers(0, 3), st.sampled_from(["a", "b", "c"]))


@FAST
@given(data=st.data())
def test_group_advantages_are_finite_or_refused(data):
    n = data.draw(st.integers(0, 9))
    rewards = data.draw(st.lists(st.one_of(st.floats(-1e12, 1e12), st.sampled_from([0.0, 1.0] + SPECIAL)),
                                 min_size=n, max_size=n))
    groups = data.draw(st.lists(group_keys, min_size=n, max_size=n + data.draw(st.integers(0, 1))))
    as_tensor = data.draw(st.booleans())
    try:
        advantages = group_advantages(torch.tensor(rewards, dtype=torch.float64) if as_tensor else rewards, groups)
    except NonFiniteInputError as err:
        assert not all(math.isfinite(r) for r in rewards) and "rewards" in str(err)
        return
    except ValueError as err:
        assert len(groups) != n and "group ids" in str(err)
        return
    assert all(math.isfinite(r) for r in rewards) and len(groups) == n
    assert advantages.shape == (n,) and _finite(advantages)
    for key in set(groups):  # centred within each group
        members = [i for i, g in enumerate(groups) if g == key]
        assert abs(float(advantages[members].sum())) <= 1e-3 * len(members)


def test_objective_properties_can_fail():
    """Positive controls: extreme but finite inputs stay finite, and a NaN is refused by name."""
    logprobs = torch.tensor([[0.0, -1e4]], requires_grad=True)
    loss, _ = policy_loss(logprobs, torch.tensor([[-1e4, 0.0]]), torch.tensor([[-3.0, 2.0]]), torch.ones(1, 2))
    assert math.isfinite(loss.item())
    with pytest.raises(NonFiniteInputError, match=r"teacher_logprobs holds a non-finite value \(nan\) at position \(0, 1\)"):
        gopd_advantages(torch.zeros(1, 2), torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(NonFiniteInputError, match="advantages at reward_scale=1e"):
        gopd_advantages(torch.zeros(1, 1), torch.full((1, 1), -1e4), torch.zeros(1, 1), reward_scale=1e300)
