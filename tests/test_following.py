"""Preference-following metrics on fronts worked out by hand; degenerate responses; the sampling warper."""

import doctest

import pytest
import torch

from meal.evaluation.front import preference_following, preference_grid
from meal.policy.sampling import SamplingWarper, degenerate_mask, is_degenerate, select_valid_best

GRID = preference_grid(2, points=5)  # w1 = 0, .25, .5, .75, 1


def test_a_monotone_front_follows_its_preferences():
    """objective 1 rises with w1 (0..4), objective 2 falls: rank correlation 1 for both, ranges 4 and 4,
    all five points on the front."""
    pts = [[i, 4 - i] for i in range(5)]
    out = preference_following(GRID, pts)
    assert out["spearman"] == pytest.approx([1.0, 1.0])
    assert out["ranges"] == pytest.approx([4.0, 4.0])
    assert out["nondominated"] == 5


def test_a_flat_front_is_one_point():
    out = preference_following(GRID, [[1.0, 2.0]] * 5)
    assert out["spearman"] == [None, None] and out["ranges"] == [0.0, 0.0] and out["nondominated"] == 1


def test_a_reversed_front_has_negative_correlation_and_range():
    """Objective 1 falls as w1 rises: rho = -1, range = reward at w1 = 1 minus at w1 = 0 = 0 - 4 = -4."""
    pts = [[4 - i, i] for i in range(5)]
    out = preference_following(GRID, pts)
    assert out["spearman"] == pytest.approx([-1.0, -1.0]) and out["ranges"] == pytest.approx([-4.0, -4.0])


def test_ranges_on_the_three_objective_grid_average_tied_extremes():
    """K = 3: the smallest w_1 = 0 is held by two grid points; the range averages their rewards."""
    grid = preference_grid(3)
    pts = [[w[0] * 10, 0.0, 0.0] for w in grid]
    out = preference_following(grid, pts)
    assert out["ranges"][0] == pytest.approx(10.0) and out["spearman"][0] == pytest.approx(1.0)


def test_degenerate_responses_and_valid_selection():
    assert is_degenerate("", True) and is_degenerate("   ", False)
    assert is_degenerate("go go go go go go go go go", False)
    assert not is_degenerate("go go go go go go go go go", True)
    assert not is_degenerate("Use a plunger, then hot water and baking soda.", False)
    # issue 24: the conditioning text echoed back is no answer (the demo's evaluation had such responses)
    for echo in ["Boil the water first. (Preference weights: helpful 0.50, concise 0.50)",
                 "Premise: Prefrence weight: helpful", "Set-up: Easy-to-use 1.00, concise 0.00."]:
        assert is_degenerate(echo, True), echo
    assert not is_degenerate("Mix 2 cups of flour with 1.50 cups of water; bake 30 minutes.", True)
    assert degenerate_mask([["(Preference weights: helpful 0.10, concise 0.90) Sure.", "Sure."]],
                           [[True, True]]).tolist() == [[True, False]]  # never kept in training, counted in fronts
    mask = degenerate_mask([["", "fine answer here"], ["", ""]], [[True, True], [True, True]])
    assert mask.tolist() == [[True, False], [True, True]]
    keep, ok = select_valid_best(torch.tensor([[5.0, 1.0], [2.0, 3.0]]), ~mask)
    assert keep[0, 0] == 1 and ok.flatten().tolist() == [True, False]


def test_sampling_warper_keeps_the_nucleus_hugging_face_keeps():
    """Same kept set as temperature -> top-k -> top-p of transformers, except where the mass above the
    boundary token equals top_p to float precision (the sums run in another order)."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    for trial in range(60):
        x = torch.randn(6, 3000) * (0.3 + 5 * torch.rand(1).item())
        t, k, p = [1.0, 0.7][trial % 2], [0, 40][trial % 3 == 0], [0.9, 0.5, 0.99][trial % 3]
        ref = TopPLogitsWarper(p)(None, TopKLogitsWarper(k)(None, TemperatureLogitsWarper(t)(None, x.clone()))
                                  if k else TemperatureLogitsWarper(t)(None, x.clone()))
        mine = SamplingWarper(t, k, p, candidates=32)(None, x.clone())
        for row in range(6):
            a, b = torch.isfinite(ref[row]), torch.isfinite(mine[row])
            if not torch.equal(a, b):
                probs = torch.softmax((x[row] / t), -1).sort(descending=True).values
                edge = probs[:min(a.sum(), b.sum())].sum().item()
                assert abs(edge - p) < 1e-5, (trial, row)
            torch.testing.assert_close(ref[row][a & b], mine[row][a & b])


@pytest.mark.parametrize("module", ["meal.policy.sampling", "meal.rewards.embedded", "meal.rewards.base",
                                    "meal.policy.templates", "meal.harness.budget"])
def test_doctests(module):
    import importlib

    result = doctest.testmod(importlib.import_module(module))
    assert result.failed == 0 and result.attempted > 0
