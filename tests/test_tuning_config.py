"""Architecture search: config, search space, Pareto front, time budget (no training)."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest

from qn_keras.presets import preset_kwargs
from qn_keras.training.config import ConfigError
from qn_keras.tuning.config import load_tune_config, parse_duration
from qn_keras.tuning.leaderboard import pareto_front, rank_rows
from qn_keras.tuning.search_space import architecture, round_channels

REPO = Path(__file__).resolve().parent.parent


def _values(**kw):
    base = dict(blocks=5, repeats=5, groups=1, width=1.0, kernel_factor=1.0, dropout=0.0)
    return {**base, "learning_rate": 0.01, **kw}


def test_default_yaml_documents_the_built_in_defaults():
    from_file = load_tune_config(REPO / "configs" / "tune_default.yaml").to_dict()
    assert from_file == load_tune_config().to_dict()
    space = from_file["space"]
    assert space["blocks"] == [5, 10, 15]
    assert space["repeats"] == [3, 5]
    assert space["groups"] == [1, 2, 4]


@pytest.mark.parametrize(
    ("blocks", "groups", "preset"),
    [(5, 1, "quartznet_5x5"), (10, 2, "quartznet_10x5_g2"), (15, 4, "quartznet_15x5_g4")],
)
def test_architecture_at_full_width_is_the_preset(blocks, groups, preset):
    space = load_tune_config().space
    kwargs = architecture(_values(blocks=blocks, groups=groups), space)
    assert kwargs.pop("kernel_size_factor") == 1.0
    assert kwargs == preset_kwargs(preset)


def test_architecture_scales_width_repeats_dropout():
    space = load_tune_config().space
    kw = architecture(_values(blocks=10, repeats=3, groups=4, width=0.3, dropout=0.1), space)
    base = preset_kwargs("quartznet_10x5")
    n = len(base["stackwise_filters"])
    assert len(kw["stackwise_filters"]) == n == 13
    # B-blocks get R and the groups; C1, C2, C3 keep one repeat and dense pointwise convs.
    assert kw["stackwise_repeats"] == [1] + [3] * 10 + [1, 1]
    assert kw["stackwise_groups"] == [1] + [4] * 10 + [1, 1]
    assert kw["stackwise_dropout"] == [0.1] * n
    for f, f0, g in zip(
        kw["stackwise_filters"], base["stackwise_filters"], kw["stackwise_groups"], strict=True
    ):
        assert f % 8 == 0 and f % g == 0
        assert abs(f - 0.3 * f0) <= 4  # nearest multiple of 8
    assert kw["stackwise_kernel_sizes"] == base["stackwise_kernel_sizes"]


def test_round_channels():
    assert round_channels(76.8, 8) == 80
    assert round_channels(3, 8) == 8
    assert round_channels(100, 24) == 96


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("2h", 7200),
        ("45m", 2700),
        ("1h30m", 5400),
        ("90s", 90),
        ("120", 120),
        (30, 30),
        ("1.5h", 5400),
    ],
)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["2 hours", "h", "-5", "0", "1x", "2h30"])
def test_parse_duration_rejects(text):
    with pytest.raises(ConfigError, match="duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"space": {"blocks": [5, 12]}}, "multiples of 5"),
        ({"space": {"width": []}}, "empty list"),
        ({"space": {"depth": [1]}}, "Unknown key.*depth"),
        ({"space": {"dropout": {"min": 0.3, "max": 0.1}}}, "min must be < max"),
        ({"space": {"learning_rate": {"min": 0.0, "max": 0.1, "sampling": "log"}}}, "min > 0"),
        ({"space": {"repeats": [1.5]}}, "integer"),
        ({"search": {"tuner": "grid"}}, "search.tuner"),
        ({"search": {"objective": "val_cer"}}, "search.objective"),
        ({"search": {"time_budget": "soon"}}, "duration"),
        ({"search": {"colour": 1}}, "Unknown key.*colour"),
        ({"search": {"tuner": "random", "max_trials": None}}, "never ends"),
        ({"constraints": {"max_params": 0}}, "max_params"),
        ({"train": {"model": {"preset": "quartznet_5x5"}}}, "train.model"),
        ({"train": {"optimizer": {"learning_rate": -1}}}, "learning_rate"),
        ({"tuning": {}}, "Unknown section"),
        ({"optimizer": {}, "training": {}}, "qn train. config: put its sections"),
    ],
)
def test_bad_config_names_the_problem(data, match):
    from qn_keras.tuning.config import TuneConfig

    with pytest.raises(ConfigError, match=match):
        TuneConfig.from_dict(data)


def test_cli_overrides_win_over_the_file(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("search: {tuner: bayesian, max_trials: 5}\nspace: {groups: 2}\n")
    config = load_tune_config(path, {"search": {"max_trials": 7, "time_budget": "30m"}})
    assert config.search.tuner == "bayesian"
    assert config.search.max_trials == 7
    assert config.search.time_budget_seconds == 1800
    assert config.space.params["groups"].kind == "fixed"
    with pytest.raises(ConfigError, match=str(path)):
        load_tune_config(path, {"constraints": {"min_speed": -1.0}})


def test_pareto_front_matches_brute_force():
    rng = random.Random(0)
    points = [(rng.randint(1, 20), rng.randint(1, 20)) for _ in range(40)] + [(float("nan"), 1)]
    front = pareto_front(points)
    for (x, y), on in zip(points, front, strict=True):
        beaten = any(
            (qx <= x and qy <= y and (qx, qy) != (x, y))
            for qx, qy in points
            if qx == qx  # skip NaN
        )
        assert on == (x == x and not beaten)
    assert pareto_front([(1, 3), (2, 2), (3, 1), (3, 3)]) == [True, True, True, False]


def test_rank_rows_orders_by_objective_and_flags_fronts():
    rows = [
        {"trial_id": "0", "status": "completed", "val_wer": 0.5, "params": 10, "latency_ms": 5.0},
        {"trial_id": "1", "status": "infeasible", "params": 1000},
        {"trial_id": "2", "status": "completed", "val_wer": 0.3, "params": 50, "latency_ms": 9.0},
        {"trial_id": "3", "status": "completed", "val_wer": 0.6, "params": 60, "latency_ms": 1.0},
        {"trial_id": "4", "status": "failed"},
    ]
    ranked = rank_rows(rows, "val_wer")
    assert [r["trial_id"] for r in ranked] == ["2", "0", "3", "1", "4"]
    assert [r["rank"] for r in ranked] == [1, 2, 3, None, None]
    by_id = {r["trial_id"]: r for r in ranked}
    assert by_id["2"]["pareto_params"] and by_id["0"]["pareto_params"]
    assert not by_id["3"]["pareto_params"]  # trial 0 is smaller and better
    assert by_id["3"]["pareto_latency"] and by_id["2"]["pareto_latency"]
    assert by_id["0"]["pareto_latency"]
    assert not by_id["1"]["pareto_params"]


def test_time_budget_stops_new_trials_and_survives_reload(tmp_path):
    """On a clock the test controls: no real time passes, so a busy machine changes nothing."""
    import keras_tuner as kt

    from qn_keras.tuning.tuner import RandomSearchOracle

    now = [100.0]

    def oracle(budget):
        o = RandomSearchOracle(
            objective=kt.Objective("val_wer", "min"),
            max_trials=10,
            seed=0,
            time_budget=budget,
            clock=lambda: now[0],
        )
        o._set_project_dir(str(tmp_path), "p")
        hp = o.get_space()
        hp.Float("x", 0.0, 1.0)
        o.update_space(hp)
        return o

    first = oracle(60.0)
    assert first.create_trial("t").status == "RUNNING"
    first.end_trial(_completed(first, "t"))
    now[0] += 59.0
    assert first.create_trial("t").status == "RUNNING"  # 59 s of 60: one more trial starts
    first.end_trial(_completed(first, "t"))
    now[0] += 2.0
    assert first.create_trial("t").status == "STOPPED"
    assert first.budget_exhausted
    first.save()
    # A resumed search keeps the time already spent (61 s) and continues from there.
    now[0] += 1000.0  # time between the kill and the restart is not counted
    resumed = oracle(90.0)
    resumed.reload()
    assert resumed.elapsed_seconds() == 61.0
    assert resumed.create_trial("t").status == "RUNNING"
    resumed.end_trial(_completed(resumed, "t"))
    now[0] += 30.0
    assert resumed.create_trial("t").status == "STOPPED"


def test_soften_penalties_keeps_trained_scores_apart():
    from qn_keras.tuning.tuner import soften_penalties

    scores = [1.0, 100.0, 0.83, 100.0, 0.97]
    soft = soften_penalties(scores, 100.0)
    assert list(soft) == pytest.approx([1.0, 1.17, 0.83, 1.17, 0.97])
    # Nothing trained yet, or nothing pruned: unchanged.
    assert list(soften_penalties([100.0, 100.0], 100.0)) == [100.0, 100.0]
    assert list(soften_penalties([0.5, 0.7], 100.0)) == [0.5, 0.7]
    # One trained score: the penalty sits 10% above it.
    assert list(soften_penalties([2.0, 1e6], 1e6)) == pytest.approx([2.0, 2.2])


def test_bayesian_process_is_fitted_on_softened_penalties(tmp_path):
    """The Bayesian oracle's (x, y) for its Gaussian process: trained trials keep their
    scores, pruned ones (scored with the penalty) sit just above the worst trained one."""
    from qn_keras.tuning.config import TuneConfig
    from qn_keras.tuning.tuner import make_oracle

    config = TuneConfig.from_dict(
        {"space": {"width": [0.25, 0.5]}, "search": {"tuner": "bayesian", "max_trials": 10}}
    )
    oracle = make_oracle(config)
    assert oracle.penalty == config.search.penalty == 100.0
    oracle._set_project_dir(str(tmp_path), "p")
    hp = oracle.get_space()
    hp.Float("x", 0.0, 1.0)
    oracle.update_space(hp)
    for score in (0.9, 100.0, 0.6, 100.0):
        oracle.create_trial("t")
        oracle.end_trial(_completed(oracle, "t", score))
    _, y = oracle._vectorize_trials()
    assert sorted(y) == pytest.approx([0.6, 0.9, 1.2, 1.2])
    assert oracle.create_trial("t").status == "RUNNING"  # the process fits and proposes


def _completed(oracle, tuner_id, score=0.5):
    trial = oracle.ongoing_trials[tuner_id]
    oracle.update_trial(trial.trial_id, {"val_wer": score})
    trial.status = "COMPLETED"
    return trial


def test_choices_are_all_reachable():
    import keras_tuner as kt

    from qn_keras.tuning.search_space import declare_hyperparameters

    space = load_tune_config().space
    hp = declare_hyperparameters(kt.HyperParameters(), space)
    names = {p.name for p in hp.space}
    assert names == set(space.params)
    blocks = next(p for p in hp.space if p.name == "blocks")
    assert list(blocks.values) == [5, 10, 15]
    lr = next(p for p in hp.space if p.name == "learning_rate")
    assert (lr.min_value, lr.max_value, lr.sampling) == (0.002, 0.05, "log")
    # Every combination of the discrete choices gives a valid block list.
    choices = [space.params[n].candidates for n in ("blocks", "repeats", "groups", "width")]
    for b, r, g, w in itertools.product(*choices):
        kw = architecture(_values(blocks=b, repeats=r, groups=g, width=w), space)
        assert all(
            f % gg == 0
            for f, gg in zip(kw["stackwise_filters"], kw["stackwise_groups"], strict=True)
        )
