"""Evaluation: hypervolume and Pareto filtering by hand, the grids, meal-eval and meal-compare."""

import json
import os

import numpy as np
import pytest
import torch

from tests.conftest import tiny_config

from meal.cli.compare import CompareError, compare
from meal.evaluation.front import Front, hypervolume, pareto_mask, preference_grid
from meal.harness.saved_run import EvalOptions, evaluate_run
from meal.methods import train


def test_hypervolume_2d_by_hand():
    """Points (1, 3), (2, 2), (3, 1) over reference (0, 0): a staircase of area 3 + 2 + 1 = 6.
    Adding a dominated point (1, 1), a duplicate (2, 2) and a point beyond the reference (-1, 5)
    changes nothing."""
    pts = np.array([[1, 3], [2, 2], [3, 1]], dtype=float)
    assert hypervolume(pts, [0, 0]) == pytest.approx(6.0)
    more = np.vstack([pts, [[1, 1], [2, 2], [-1, 5]]])
    assert hypervolume(more, [0, 0]) == pytest.approx(6.0)
    assert hypervolume(np.array([[-1.0, -1.0]]), [0, 0]) == 0.0
    # reference (-1, -1): every box grows: (2*4) + (1*3) + (1*2) = 8 + 3 + 2 = 13
    assert hypervolume(pts, [-1, -1]) == pytest.approx(13.0)


def test_hypervolume_3d_by_hand():
    """(1,1,1) alone: a unit cube. (2,1,1) and (1,2,1): union of two 2x1x1 boxes overlapping in a unit cube = 3.
    (3,3,3) over reference (1,1,1) dominates them all: 2^3 = 8 (the others lie on its boundary)."""
    assert hypervolume(np.array([[1.0, 1.0, 1.0]]), [0, 0, 0]) == pytest.approx(1.0)
    assert hypervolume(np.array([[2, 1, 1], [1, 2, 1]], dtype=float), [0, 0, 0]) == pytest.approx(3.0)
    assert hypervolume(np.array([[3, 3, 3], [2, 1, 1], [1, 1, 1]], dtype=float), [1, 1, 1]) == pytest.approx(8.0)


def test_pareto_mask_by_hand():
    pts = np.array([[1, 3], [2, 2], [1, 1], [2, 2], [0, 3], [3, 1]], dtype=float)
    # (1,1) dominated by (2,2); (0,3) dominated by (1,3); the duplicate (2,2) is kept
    assert pareto_mask(pts).tolist() == [True, True, False, True, False, True]
    pts3 = np.array([[1, 0, 0], [0, 1, 0], [0.5, 0.5, 0.0], [0.4, 0.4, 0.0]])
    assert pareto_mask(pts3).tolist() == [True, True, True, False]


def test_preference_grids():
    g2 = preference_grid(2)
    assert len(g2) == 11 and g2[0] == [0.0, 1.0] and g2[-1] == [1.0, 0.0] and g2[3] == [0.3, 0.7]
    g3 = preference_grid(3)
    assert len(g3) == 13 and all(abs(sum(w) - 1) < 1e-2 for w in g3)
    assert [1.0, 0.0, 0.0] in g3 and [0.2, 0.4, 0.4] in g3
    assert preference_grid(2, points=3) == [[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]]
    with pytest.raises(ValueError, match="K = 4"):
        preference_grid(4)


def test_meal_eval_on_a_tiny_run_and_compare_two_fronts(tiny_llama, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(tiny_llama, str(run), **{"trainer.final_eval_prompts": 3}))
    out = evaluate_run(str(run))  # as many test prompts as the run's own final evaluation
    front = Front.load(out["front_json"])
    assert len(front.points) == 11 and len(front.preferences) == 11 and front.num_prompts == 3
    # the hypervolume, recomputed without meal: the area the points dominate above the reference, by a sweep
    ref, area, top = front.hv_ref, 0.0, front.hv_ref[1]
    for x, y in sorted((p for p in front.points if p[0] > ref[0] and p[1] > ref[1]), reverse=True):
        if y > top:
            area, top = area + (x - ref[0]) * (y - top), y
    assert front.hypervolume == pytest.approx(area)
    assert os.path.getsize(out["front_png"]) > 1000
    # issue 25: the same checkpoint evaluated in batches of 3 (not 32): the same responses, the same front
    again = Front.load(evaluate_run(str(run), EvalOptions(batch_size=3, out_dir=str(tmp_path / "bs3")))["front_json"])
    assert again.points == front.points and again.extra["generation"] == front.extra["generation"]
    assert front.extra["generation"]["seeding"] == "row" and "batch_size" not in front.extra["generation"]
    base = evaluate_run(str(run), EvalOptions(untrained=True))
    assert Front.load(base["front_json"]).label == "meal (base)" and Front.load(base["front_json"]).num_prompts == 3
    result = compare([str(run / "eval"), base["front_json"]], str(tmp_path / "cmp"))
    assert [r["method"] for r in result["methods"]] == ["meal", "meal (base)"]
    assert os.path.exists(tmp_path / "cmp" / "compare.png")
    assert "| meal |" in (tmp_path / "cmp" / "compare.md").read_text()


def _front(label, hv_points, seed, norm=None):
    return Front(["a", "b"], [[1.0, 0.0], [0.0, 1.0]], hv_points, hv_points, [True, True],
                 hypervolume(np.array(hv_points), [0, 0]), [0.0, 0.0], 0.5, 4, 0, label,
                 {"train_seed": seed, "normalizer": norm or {"mean": [0, 0]}})


def test_compare_table_mean_and_spread(tmp_path):
    """static: HV 6 and 4 (mean 5, sample std sqrt(2)); meal: HV 9 alone."""
    paths = []
    for i, (label, pts) in enumerate([("static", [[1, 3], [3, 1], [2, 2]]), ("static", [[2, 2]]),
                                      ("meal", [[3, 3]])]):
        p = str(tmp_path / f"f{i}.json")
        _front(label, pts, i).save(p)
        paths.append(p)
    result = compare(paths, str(tmp_path / "out"))
    rows = {r["method"]: r for r in result["methods"]}
    assert rows["static"]["hypervolume_mean"] == pytest.approx(5.0)
    assert rows["static"]["hypervolume_std"] == pytest.approx(np.sqrt(2))
    assert rows["meal"]["runs"] == 1 and rows["meal"]["hypervolume_mean"] == pytest.approx(9.0)
    assert json.load(open(tmp_path / "out" / "compare.json"))["hv_ref"] == [0.0, 0.0]
    # one meal run: its spread is unknown, so there is no test and no interval, only the difference
    d = rows["meal"]["vs_static"]
    assert d["difference"] == pytest.approx(4.0) and d["bootstrap_95"] is None and d["welch_p"] is None
    assert "one run on a side: no test, no interval" in open(tmp_path / "out" / "compare.md").read()


def test_compare_reports_a_shared_conditioning_stage_once_and_different_ones_per_method(tmp_path):
    def stage(steps, seconds):
        return {"responses": 384, "tokens": 15484, "reward_calls": 768, "steps": steps, "seconds": seconds}

    paths = []
    for label, budget in [("static", stage(150, 600.0)), ("meal", stage(150, 600.0)), ("ric", stage(40, 120.0))]:
        f = _front(label, [[1, 1]], 0)
        f.extra["conditioning_budget"] = budget
        paths.append(str(tmp_path / f"{label}.json"))
        f.save(paths[-1])
    compare(paths[:2], str(tmp_path / "shared"))
    md = (tmp_path / "shared" / "compare.md").read_text()
    assert "Conditioning stage (shared, not in the online cost above): 384 responses, 15,484 tokens, 150 SFT " \
           "steps, 10.0 min." in md
    compare(paths, str(tmp_path / "own"))
    md = (tmp_path / "own" / "compare.md").read_text()
    assert "Conditioning stages (not in the online cost above): static, meal: 384 responses, 15,484 tokens, 150 " \
           "SFT steps, 10.0 min; ric: 384 responses, 15,484 tokens, 40 SFT steps, 2.0 min." in md


def test_compare_gives_a_bootstrap_interval_with_two_runs_a_side():
    from meal.cli.compare import hypervolume_difference

    d = hypervolume_difference([5.0, 7.0], [1.0, 3.0])
    assert d["difference"] == pytest.approx(4.0) and d["welch_p"] is not None
    assert 2.0 <= d["bootstrap_95"][0] <= 4.0 <= d["bootstrap_95"][1] <= 6.0  # resampled means lie in [1, 3] / [5, 7]


def test_compare_refuses_fronts_in_different_units_or_over_different_prompts(tmp_path):
    _front("a", [[1, 1]], 0, {"mean": [0, 0]}).save(str(tmp_path / "a.json"))
    _front("b", [[1, 1]], 0, {"mean": [1, 0]}).save(str(tmp_path / "b.json"))
    with pytest.raises(CompareError, match="normalisation differs"):
        compare([str(tmp_path / "a.json"), str(tmp_path / "b.json")], str(tmp_path / "out"))
    c = _front("c", [[1, 1]], 0, {"mean": [0, 0]})
    c.num_prompts = 7  # the same policy's front over other prompts: a different sample, not a better method
    c.save(str(tmp_path / "c.json"))
    with pytest.raises(CompareError, match="evaluated on 7 test prompts with sampling seed 0"):
        compare([str(tmp_path / "a.json"), str(tmp_path / "c.json")], str(tmp_path / "out"))
    with pytest.raises(CompareError, match="no front.json"):
        compare([str(tmp_path)], str(tmp_path / "out"))


def test_responses_are_written_in_rics_csv_layout(tmp_path):
    import csv

    from meal.evaluation.front import write_ric_csv

    path = write_ric_csv(str(tmp_path), [0.3, 0.7], ["q1", "q2"], ["a1", "a2"], torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    assert os.path.basename(path) == "eval_data_pref0.3_0.7.csv"
    rows = list(csv.reader(open(path)))
    assert rows[0] == ["", "prompt", "response", "obtained_score1", "desired_score1", "obtained_score2",
                       "desired_score2"]
    assert rows[2] == ["1", "q2", "a2", "3.0", "", "4.0", ""]
    with_desired = write_ric_csv(str(tmp_path / "ric"), [1.0, 0.0], ["q"], ["a"], torch.tensor([[0.5, 0.5]]),
                                 torch.tensor([4.2, -4.2]))
    assert list(csv.reader(open(with_desired)))[1] == ["0", "q", "a", "0.5", "4.2", "0.5", "-4.2"]


def test_meal_compare_cli_stamps_date_and_machine_unless_given(tmp_path, capsys):
    from meal.cli.compare import main as compare_main

    _front("a", [[1, 1]], 0).save(str(tmp_path / "a.json"))
    compare_main([str(tmp_path / "a.json"), "--out", str(tmp_path / "out"), "--meta", '{"wall_seconds": 5}'])
    meta = json.load(open(tmp_path / "out" / "compare.json"))
    assert meta["wall_seconds"] == 5 and meta["date"] and "torch" in meta["machine"]
    assert "GPU" in meta["machine"]  # "N CPU cores (model, bf16 or not), no GPU" or "<name> GPU"
    compare_main([str(tmp_path / "a.json"), "--out", str(tmp_path / "out"), "--meta", '{"machine": "mine"}'])
    assert json.load(open(tmp_path / "out" / "compare.json"))["machine"] == "mine"
    with pytest.raises(SystemExit):
        compare_main([str(tmp_path / "a.json"), "--out", str(tmp_path / "out"), "--meta", "[1]"])
    assert "--meta must be a JSON object" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compare_main([str(tmp_path / "a.json"), "--out", str(tmp_path / "out"), "--meta", "{bad"])
    assert "--meta is not valid JSON" in capsys.readouterr().err


def test_compare_refuses_fronts_sampled_differently(tmp_path):
    """Issue 25: a front records how it was sampled; an older front (no record, sampled per batch) and a
    row-seeded one, or two fronts of different top_p, do not compare; the batch size is not in the record."""
    from meal.policy.sampling import GenerationSettings

    old, new, new_bs = _front("a", [[1, 1]], 0), _front("a", [[1, 2]], 1), _front("a", [[2, 1]], 2)
    new.extra["generation"] = GenerationSettings(seeding="row", batch_size=8).record()
    new_bs.extra["generation"] = GenerationSettings(seeding="row", batch_size=1).record()
    other = _front("a", [[2, 2]], 3)
    other.extra["generation"] = GenerationSettings(seeding="row", top_p=1.0).record()
    for name, f in (("old", old), ("new", new), ("new_bs", new_bs), ("other", other)):
        f.save(str(tmp_path / f"{name}.json"))
    with pytest.raises(CompareError, match="new.json: sampled with .*seeding=row.*old.json with settings not recorded"):
        compare([str(tmp_path / "old.json"), str(tmp_path / "new.json")], str(tmp_path / "out"))
    with pytest.raises(CompareError, match="top_p=1.0.*top_p=0.9"):
        compare([str(tmp_path / "new.json"), str(tmp_path / "other.json")], str(tmp_path / "out"))
    result = compare([str(tmp_path / "new.json"), str(tmp_path / "new_bs.json")], str(tmp_path / "out"))
    assert result["methods"][0]["runs"] == 2


def test_compare_refuses_fronts_of_different_splits_and_keeps_each_runs_front_and_net(tmp_path):
    """A validation front and a test front are samples of different prompts; compare.json holds every run's
    points and preferences and, for Meal runs, what the net did; the seed-to-seed spreads get Levene's test."""
    a = _front("a", [[1, 1]], 0)
    v = _front("a", [[1, 1]], 1)
    v.extra["split"] = "validation"
    a.save(str(tmp_path / "a.json"))
    v.save(str(tmp_path / "v.json"))
    with pytest.raises(CompareError, match="evaluated on the validation prompts, .* on the test prompts"):
        compare([str(tmp_path / "a.json"), str(tmp_path / "v.json")], str(tmp_path / "out"))
    paths = []
    for i, (label, pts) in enumerate([("static", [[1, 2], [2, 1]]), ("static", [[1, 1]]), ("static", [[1, 3]]),
                                      ("meal", [[2, 2]]), ("meal", [[2, 3]]), ("meal", [[3, 3]])]):
        f = _front(label, pts, i)
        if label == "meal":
            f.extra["meta_learner"] = {"meta/param_distance": 0.2 + i, "meta/w_phi_spread_range": 0.1}
        paths.append(str(tmp_path / f"r{i}.json"))
        f.save(paths[-1])
    from meal.cli.compare import hypervolume_difference

    result = compare(paths, str(tmp_path / "out2"), reference="static")
    assert result["runs"][0]["front_points"] == [[1, 2], [2, 1]] and result["runs"][0]["split"] == "test"
    rows = {r["method"]: r for r in result["methods"]}
    assert rows["meal"]["param_distance_mean"] == pytest.approx(4.2) and rows["static"]["param_distance_mean"] is None
    assert rows["meal"]["vs_static"]["levene_p"] is not None
    md = (tmp_path / "out2" / "compare.md").read_text()
    assert "meal: the net moved 4.200 ± 1.000 from its initialisation" in md and "Levene p =" in md
    assert hypervolume_difference([1.0, 2.0], [1.0, 5.0])["levene_p"] is None  # two runs a side: no test


def test_a_figure_of_several_seeds_draws_each_methods_mean_point_per_preference(tmp_path):
    """Several runs of a method are drawn as the mean point per preference (runs on another grid are left
    out of the mean, not of the hypervolumes); the figure holds an overlay and one panel per method."""
    import matplotlib.image

    from meal.evaluation.plotting import method_fronts, plot_fronts

    fronts = [_front("meal", [[1, 2], [3, 0]], 0), _front("meal", [[3, 2], [1, 0]], 1),
              _front("static", [[2, 2], [2, 1]], 0), _front("static", [[1, 1], [0, 0]], 1)]
    fronts[3].preferences = [[0.5, 0.5], [0.0, 1.0]]  # another grid
    meal, static = method_fronts(fronts)
    assert meal.label == "meal" and meal.mean.tolist() == [[2, 2], [2, 0]] and len(meal.runs) == 2
    assert static.mean.tolist() == [[2, 2], [2, 1]] and len(static.runs) == 1 and len(static.hypervolumes) == 2
    assert "2 runs" in meal.legend and "±" in meal.legend
    wide = matplotlib.image.imread(plot_fronts(fronts, str(tmp_path / "several.png")))
    alone = matplotlib.image.imread(plot_fronts(fronts[:1], str(tmp_path / "one.png")))
    assert wide.shape[1] > 2.5 * alone.shape[1]  # the overlay and a panel per method, side by side


def test_the_meta_learner_summary_tests_pairs_places_single_runs_and_sizes_the_evidence():
    import importlib.util

    spec = importlib.util.spec_from_file_location("summary", os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "meta_learner", "summary.py"))
    summary = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summary)
    compare = {"methods": [{"method": "meal", "hypervolumes": [9.0, 10.0, 11.0]},
                           {"method": "static", "hypervolumes": [8.0, 9.0, 10.0]},
                           {"method": "meal_frozen", "hypervolumes": [10.5]}],
               "runs": [{"method": "meal", "meta_learner": {"meta/param_distance": 0.4}}]}
    out = summary.summarise(compare)
    assert out["pairs"]["static"]["difference"] == pytest.approx(1.0) and out["pairs"]["static"]["welch_p"] > 0.05
    assert out["single_runs"]["meal_frozen"]["learner_runs_below"] == 2
    # sigma 1, delta 1: 2 (1.96 + 0.84)^2 = 15.7 runs a side; 3 runs a side detect 2.29
    assert out["scale"]["seeds_per_side_needed"] == pytest.approx(15.70, abs=0.01)
    assert out["scale"]["detectable_difference_at_these_runs"] == pytest.approx(2.288, abs=0.001)
    assert out["net"]["meta/param_distance"] == [0.4]
