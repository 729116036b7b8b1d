"""The per-method comparison: strengths and early-stopping points on records, each method's own front, the
fine-tuned point, the dominated area (hypervolume), the summary, its table, the report's section and the plot."""

from __future__ import annotations

import json
import re

import pytest
from conftest import point

from hf_specgen.eval import plots
from hf_specgen.eval.markdown import markdown_table, method_table
from hf_specgen.eval.pareto import finetuned_point, hypervolume, method_fronts, method_summary
from hf_specgen.eval.plots import FAINT
from hf_specgen.eval.records import ResultRecord
from hf_specgen.eval.report import write_report


EARLY = {"fraction": 0.25, "step": 60, "steps": 240}


def l2(s: float, g: float, strength: float, **kwargs) -> ResultRecord:
    return point("l2", s, g, hyperparameter="l2_lambda", value=strength, strengths={"l2_lambda": strength}, **kwargs)


@pytest.fixture
def sweep() -> dict[str, ResultRecord]:
    """pre (0.2, 0.8) and fine-tuned (0.6, 0.4): scaled, speciality x = (s - 0.2) / 0.4,
    generality y = (g - 0.4) / 0.4."""
    return {
        "pre": point("pre-trained", 0.2, 0.8),
        "full_half": point("full", 0.5, 0.7, alpha=0.5),  # (0.75, 0.75)
        "full_end": point("full", 0.6, 0.4, alpha=1.0),  # (1, 0)
        "l2_half": l2(0.45, 0.75, 0.1, alpha=0.5),  # (0.625, 0.875)
        "l2_end": l2(0.55, 0.6, 0.1, alpha=1.0),  # (0.875, 0.5)
        "l2_strong": l2(0.4, 0.7, 1.0, alpha=1.0),  # dominated by l2_half
        "l2_early": l2(0.5, 0.72, 0.1, checkpoint=EARLY),  # (0.75, 0.8)
        "kd": point(
            "kd",
            0.58,
            0.5,
            alpha=1.0,
            hyperparameter="kd_lambda",
            value=1.0,
            strengths={"kd_lambda": 1.0, "l2_lambda": 0.1},
        ),  # (0.95, 0.25)
        "l2_auto": l2(0.52, 0.7, 0.1, alpha=0.7, selection={"rule": "auto", "keep": 0.95}),  # (0.8, 0.75)
    }


@pytest.fixture
def records(sweep) -> list[ResultRecord]:
    return list(sweep.values())


# hypervolume, on pre (0.2, 0.8) and fine-tuned (0.6, 0.4)
PRE, FT = point("pre-trained", 0.2, 0.8), point("full", 0.6, 0.4, alpha=1.0)


def test_hypervolume_of_one_point_is_its_scaled_rectangle():
    assert hypervolume([point("a", 0.5, 0.7)], PRE, FT) == pytest.approx(0.75 * 0.75)


def test_hypervolume_of_overlapping_rectangles_counts_the_overlap_once():
    # (0.4, 0.7) -> (0.5, 0.75), (0.5, 0.6) -> (0.75, 0.5): 0.5 * 0.75 + 0.75 * 0.5 - 0.5 * 0.5 = 0.5
    assert hypervolume([point("a", 0.4, 0.7), point("b", 0.5, 0.6)], PRE, FT) == pytest.approx(0.5)
    assert hypervolume([point("b", 0.5, 0.6), point("a", 0.4, 0.7), point("c", 0.3, 0.5)], PRE, FT) == pytest.approx(
        0.5
    )


def test_hypervolume_ignores_points_below_the_corner_and_does_not_clip_beyond_one():
    below = [point("less special", 0.1, 0.9), point("less general", 0.5, 0.3), point("on the corner", 0.2, 0.4)]
    assert hypervolume(below, PRE, FT) == 0.0
    assert hypervolume([*below, point("a", 0.5, 0.7)], PRE, FT) == pytest.approx(0.5625)
    assert hypervolume([point("beyond", 0.7, 0.5)], PRE, FT) == pytest.approx(1.25 * 0.25)  # x = 1.25
    assert hypervolume([PRE, FT], PRE, FT) == 0.0
    assert hypervolume([], PRE, FT) == 0.0


def test_hypervolume_is_the_same_whichever_end_is_higher():
    assert hypervolume([point("a", 0.5, 0.7)], FT, PRE) == pytest.approx(0.5625)


def test_hypervolume_refuses_an_axis_without_span():
    with pytest.raises(ValueError, match=r"the same generality \(0\.8\), so the generality axis has no span"):
        hypervolume([point("a", 0.5, 0.7)], PRE, point("full", 0.6, 0.8, alpha=1.0))
    with pytest.raises(ValueError, match=r"the same speciality \(0\.2\)"):
        hypervolume([point("a", 0.5, 0.7)], PRE, point("full", 0.2, 0.4, alpha=1.0))


def test_method_fronts_are_each_methods_own_front_from_the_pre_trained_point(sweep, records):
    fronts = method_fronts(records)
    assert list(fronts) == ["full", "kd", "l2"]
    assert fronts["full"] == [sweep["pre"], sweep["full_half"], sweep["full_end"]]
    assert fronts["kd"] == [sweep["pre"], sweep["kd"]]
    assert fronts["l2"] == [sweep["pre"], sweep["l2_half"], sweep["l2_early"], sweep["l2_auto"], sweep["l2_end"]]
    assert method_fronts([sweep["pre"]]) == {}


def test_finetuned_point_is_full_at_alpha_one(sweep, records):
    assert finetuned_point(records) is sweep["full_end"]
    with_strengths = point("full", 0.7, 0.3, alpha=1.0, strengths={"lora_r": 16})
    first, second = point("full", 0.6, 0.4), point("full", 0.65, 0.35, alpha=1.0)  # unmerged counts as alpha 1
    assert finetuned_point([with_strengths, first, second]) is first
    assert finetuned_point([PRE, with_strengths]) is with_strengths


def test_finetuned_point_without_full_is_the_most_special_training_end(sweep):
    others = [
        sweep["pre"],
        sweep["l2_end"],
        sweep["kd"],
        sweep["l2_half"],
        l2(0.9, 0.1, 0.1, checkpoint=EARLY),
        point("full", 0.9, 0.1, alpha=1.0, merge={"kind": "groups", "group_alphas": [0.5, 1.5]}),
    ]
    assert finetuned_point(others) is sweep["kd"]


def test_finetuned_point_refuses_records_without_a_training_end(sweep):
    message = r"no fine-tuned point: no record of a method \(not pre-trained or zero-shot or sft\) at alpha 1"
    with pytest.raises(ValueError, match=message):
        finetuned_point([sweep["pre"], sweep["l2_half"], sweep["l2_early"], sweep["l2_auto"]])


def test_method_summary(records):
    full, kd, l2_row = method_summary(records)
    assert full == {
        "method": "full",
        "points": 2,
        "trainings": 1,
        "best_generality": {0.9: 0.4, 0.95: 0.4, 1.0: 0.4},
        "best_point": {0.9: "full (alpha=1)", 0.95: "full (alpha=1)", 1.0: "full (alpha=1)"},
        "hypervolume": pytest.approx(0.5625),
    }
    kd_label = "kd (kd_lambda=1, l2_lambda=0.1, alpha=1)"
    assert kd == {
        "method": "kd",
        "points": 1,
        "trainings": 1,
        "best_generality": {0.9: 0.5, 0.95: 0.5, 1.0: None},
        "best_point": {0.9: kd_label, 0.95: kd_label, 1.0: None},
        "hypervolume": pytest.approx(0.95 * 0.25),
    }
    # l2's front, by x descending: 0.875 * 0.5 + 0.8 * 0.25 + 0.75 * 0.05 + 0.625 * 0.075
    assert l2_row == {
        "method": "l2",
        "points": 5,
        "trainings": 2,
        "best_generality": {0.9: 0.6, 0.95: None, 1.0: None},
        "best_point": {0.9: "l2 (l2_lambda=0.1, alpha=1)", 0.95: None, 1.0: None},
        "hypervolume": pytest.approx(0.721875),
    }
    (row,) = [r for r in method_summary(records, keeps=(0.8,)) if r["method"] == "l2"]  # 0.48: the early stop
    assert row["best_generality"] == {0.8: 0.72} and row["best_point"] == {
        0.8: "l2 (l2_lambda=0.1, step 60 of 240 (25%))"
    }


def test_trainings_count_distinct_strengths_and_old_records_by_their_hyperparameter(sweep):
    old_style = [point("l2", 0.5, 0.5, alpha=a, hyperparameter="l2_lambda", value=0.1) for a in (0.5, 1.0)]
    mixed = [
        *old_style,
        l2(0.4, 0.6, 0.1, alpha=0.25),
        l2(0.3, 0.7, 1.0),
        point("l2", 0.35, 0.65),
        point("l2", 0.36, 0.64),
    ]
    (row,) = method_summary([sweep["pre"], sweep["full_end"], *mixed[2:]])[1:]
    assert row["trainings"] == 3  # 0.1, 1, and once for the two without any strength
    (row,) = method_summary([sweep["pre"], sweep["full_end"], *mixed])[1:]
    assert (row["points"], row["trainings"]) == (6, 3)  # hyperparameter l2_lambda=0.1 is strengths {"l2_lambda": 0.1}


def test_method_summary_needs_a_pre_trained_and_a_fine_tuned_point(sweep):
    with pytest.raises(ValueError, match="no pre-trained point to compare methods from"):
        method_summary([sweep["full_half"], sweep["full_end"]])
    with pytest.raises(ValueError, match="no fine-tuned point"):
        method_summary([sweep["pre"], sweep["full_half"]])
    alpha_zero = point("full", 0.2, 0.8, alpha=0.0)  # without a pre-trained record, alpha 0 is the pre-trained model
    assert method_summary([alpha_zero, sweep["full_half"], sweep["full_end"]])[0]["hypervolume"] == pytest.approx(
        0.5625
    )


def test_method_table(records):
    assert method_table(records).splitlines() == [
        "| method | trainings | points | best generality at speciality >= 0.540 (90%)"
        " | best generality at speciality >= 0.570 (95%)"
        " | best generality at speciality >= 0.600 (100%) | hypervolume |",
        "|---|---:|---:|---:|---:|---:|---:|",
        "| full | 1 | 2 | 0.400 (alpha=1) | 0.400 (alpha=1) | 0.400 (alpha=1) | 0.562 |",
        "| kd | 1 | 1 | 0.500 (kd_lambda=1, l2_lambda=0.1, alpha=1) "
        "| 0.500 (kd_lambda=1, l2_lambda=0.1, alpha=1) | - | 0.237 |",
        "| l2 | 2 | 5 | 0.600 (l2_lambda=0.1, alpha=1) | - | - | 0.722 |",
        "",
        "Largest dominated area: l2 (0.722), 0.159 more than full (0.562).",
    ]
    assert method_table(records, keeps=(0.5,)).splitlines()[0] == (
        "| method | trainings | points | best generality at speciality >= 0.300 (50%) | hypervolume |"
    )


def test_method_table_of_one_method(sweep):
    table = method_table([sweep["pre"], sweep["full_half"], point("full", 0.6, 0.4)])
    assert table.splitlines()[2] == "| full | 1 | 2 | 0.400 | 0.400 | 0.400 | 0.562 |"  # unmerged: no setting
    assert table.splitlines()[-1] == "Largest dominated area: full (0.562), the only method."


def test_write_report_adds_the_per_method_summary_and_table(tmp_path, records):
    paths = write_report(records, tmp_path / "out", title="Sweep")
    data = json.loads(paths["json"].read_text())
    assert data["methods"][2] == {
        "method": "l2",
        "points": 5,
        "trainings": 2,
        "best_generality": {"0.9": 0.6, "0.95": None, "1": None},
        "best_point": {"0.9": "l2 (l2_lambda=0.1, alpha=1)", "0.95": None, "1": None},
        "hypervolume": pytest.approx(0.721875),
    }
    assert [row["method"] for row in data["methods"]] == ["full", "kd", "l2"]
    assert [ResultRecord.from_dict(r) for r in data["records"]] == records
    markdown = paths["markdown"].read_text()
    section = (
        "## Per method\n\nEach method is measured against the fine-tuned model, full (alpha=1), "
        "whose speciality is 0.600: "
        "its most general point keeping each share of that speciality, and the area its own Pareto front dominates, "
        "both axes scaled so that the pre-trained and fine-tuned points span [0, 1] (1: as special as the fine-tuned "
        f"and as general as the pre-trained model).\n\n{method_table(records)}\n\nChosen, not swept:"
    )
    assert section in markdown
    assert (
        markdown.index("points are on the Pareto front") < markdown.index("## Per method") < markdown.index("![Sweep]")
    )


@pytest.mark.parametrize(
    ("which", "methods"),
    [
        (["pre", "l2_half"], None),  # no training's end: no fine-tuned point
        (["full_half", "full_end"], None),  # no pre-trained point
        (["pre"], None),  # no method
        (["pre", "l2_end"], ["l2"]),  # one method, its end the fine-tuned point
    ],
)
def test_write_report_leaves_the_comparison_out_without_its_points(tmp_path, sweep, which, methods):
    paths = write_report([sweep[name] for name in which], tmp_path / "out")
    data, markdown = json.loads(paths["json"].read_text()), paths["markdown"].read_text()
    assert (None if "methods" not in data else [row["method"] for row in data["methods"]]) == methods
    assert ("## Per method" in markdown) == (methods is not None)


def test_write_report_leaves_the_comparison_out_when_an_axis_has_no_span(tmp_path, sweep):
    same_generality = point("full", 0.6, 0.8, alpha=1.0)
    data = json.loads(write_report([sweep["pre"], same_generality], tmp_path / "out")["json"].read_text())
    assert "methods" not in data


def test_plot_draws_one_line_per_method_along_its_front(records):
    ax = plots._figure(records, "Sweep").axes[0]
    lines = [(line.get_label(), list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()]
    assert lines == [
        ("full", [0.2, 0.5, 0.6], [0.8, 0.7, 0.4]),
        ("kd (kd_lambda=1, l2_lambda=0.1)", [0.2, 0.58], [0.8, 0.5]),  # one strength: in the legend
        ("l2", [0.2, 0.45, 0.5, 0.52, 0.55], [0.8, 0.75, 0.72, 0.7, 0.6]),
        ("Pareto front", [0.2, 0.45, 0.5, 0.52, 0.55, 0.58, 0.6], [0.8, 0.75, 0.72, 0.7, 0.6, 0.5, 0.4]),
    ]
    assert ax.get_legend_handles_labels()[1] == [
        "full",
        "kd (kd_lambda=1, l2_lambda=0.1)",
        "l2",
        "auto-alpha pick",
        "early stop",
        "pre-trained",
        "fine-tuned",
        "Pareto front",
    ]
    labelled = {c.get_label(): c.get_offsets().tolist() for c in ax.collections if not c.get_label().startswith("_")}
    assert labelled["pre-trained"] == [[0.2, 0.8]] and labelled["fine-tuned"] == [[0.6, 0.4]]
    assert [c.get_offsets().tolist() for c in ax.collections if c.get_alpha() == FAINT] == [
        [[0.4, 0.7]]
    ]  # off l2's front
    squares = [
        c.get_offsets().tolist()
        for c in ax.collections
        if c.get_label().startswith("_")
        and c.get_paths()
        and len(c.get_paths()[0].vertices) == 5
        and c.get_alpha() == 1.0
    ]
    assert squares == [[[0.5, 0.72]]]  # the early stop, on l2's front
    # full and kd (one strength): every point's alpha; l2 (two): only its front's, "25%" for the early stop
    assert [text.get_text() for text in ax.texts] == ["0.5", "1", "1", "auto 0.7", "0.5", "1", "25%"]


def test_strengths_and_checkpoint_in_the_setting_once_each():
    kd = point(
        "kd", 0.5, 0.5, alpha=0.5, hyperparameter="kd_lambda", value=1, strengths={"kd_lambda": 1, "l2_lambda": 0.1}
    )
    assert kd.setting == "kd_lambda=1, l2_lambda=0.1, alpha=0.5"
    both = point("kd", 0.5, 0.5, hyperparameter="l2_lambda", value=0.1, strengths={"kd_lambda": 1, "l2_lambda": 0.1})
    assert both.setting == "kd_lambda=1, l2_lambda=0.1"  # in strengths' order
    apart = point("x", 0.5, 0.5, hyperparameter="warmup", value=10, strengths={"l2_lambda": 0.1})
    assert apart.setting == "warmup=10, l2_lambda=0.1"
    assert point("lora", 0.5, 0.5, alpha=0.5, strengths={"lora_r": 16}).setting == "lora_r=16, alpha=0.5"
    assert l2(0.5, 0.5, 0.1, checkpoint=EARLY).setting == "l2_lambda=0.1, step 60 of 240 (25%)"
    third = point("full", 0.5, 0.5, checkpoint={"fraction": 1 / 3, "step": 80, "steps": 240})
    assert third.label == "full (step 80 of 240 (33.3%))"


def test_order_groups_a_methods_points_by_strengths_then_early_stops(records):
    settings = [line.split(" | ")[1] for line in markdown_table(records).splitlines()[2:] if line.startswith("| l2 ")]
    assert settings == [
        "l2_lambda=0.1, alpha=0.5",
        "l2_lambda=0.1, alpha=1",
        "l2_lambda=0.1, step 60 of 240 (25%)",
        "l2_lambda=0.1, alpha=0.7 (auto: keeps 95% of the gain, ? evaluations)",
        "l2_lambda=1, alpha=1",
    ]


def test_strengths_and_checkpoint_survive_a_round_trip_and_old_records_load(tmp_path):
    record = l2(0.5, 0.5, 0.1, checkpoint={**EARLY, "loss": 1.5})
    assert ResultRecord.load(record.save(tmp_path / "r.json")) == record
    assert record.to_dict()["checkpoint"] == {"fraction": 0.25, "step": 60, "steps": 240, "loss": 1.5}
    old = ResultRecord.from_dict({"method": "full", "speciality": {"a": 1}, "generality": {"b": 0}})
    assert old.strengths is None and old.checkpoint is None
    integers = ResultRecord.from_dict(
        {"method": "lora", "speciality": {"a": 1}, "generality": {"b": 0}, "strengths": {"lora_r": 16}}
    )
    assert integers.strengths == {"lora_r": 16.0} and isinstance(integers.strengths["lora_r"], float)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"strengths": [0.1]},
            "strengths must be a mapping of strength name to number (e.g. {'l2_lambda': 0.1}), got [0.1]",
        ),
        ({"strengths": {}}, "strengths is empty: give the training's strengths"),
        ({"strengths": {"l2_lambda": "big"}}, "strengths['l2_lambda'] must be a finite number, got 'big'"),
        ({"strengths": {"l2_lambda": float("inf")}}, "strengths['l2_lambda'] must be a finite number, got inf"),
        ({"strengths": {1: 0.1}}, "strengths names must be strings, got 1"),
        (
            {"hyperparameter": "l2_lambda", "value": 0.1, "strengths": {"l2_lambda": 0.2}},
            "value 0.1 disagrees with strengths['l2_lambda'] = 0.2",
        ),
        (
            {"checkpoint": [0.25, 60, 240]},
            "checkpoint must be a mapping with fraction, step, steps, or null, got [0.25, 60, 240]",
        ),
        ({"checkpoint": {"fraction": 0.25, "step": 60}}, "checkpoint must be a mapping with fraction, step, steps"),
        (
            {"checkpoint": {**EARLY, "fraction": 1.0}},
            "checkpoint['fraction'] must lie strictly between 0 and 1, got 1.0",
        ),
        (
            {"checkpoint": {**EARLY, "fraction": 0}},
            "checkpoint['fraction'] must lie strictly between 0 and 1, got 0.0",
        ),
        (
            {"checkpoint": {**EARLY, "fraction": "a quarter"}},
            "checkpoint['fraction'] must be a finite number, got 'a quarter'",
        ),
        ({"checkpoint": {**EARLY, "step": 60.0}}, "checkpoint['step'] must be a positive integer, got 60.0"),
        ({"checkpoint": {**EARLY, "step": True}}, "checkpoint['step'] must be a positive integer, got True"),
        ({"checkpoint": {**EARLY, "steps": 0}}, "checkpoint['steps'] must be a positive integer, got 0"),
        ({"checkpoint": {**EARLY, "step": 300}}, "checkpoint['step'] 300 is past the training's 240 steps"),
        (
            {"checkpoint": EARLY, "alpha": 0.5},
            "checkpoint and alpha exclude each other: an early-stopping point is scored as is, got alpha 0.5",
        ),
    ],
)
def test_bad_strengths_and_checkpoints(change, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        point("l2", 0.5, 0.5, **change)


def test_a_table_where_no_front_dominates_any_area_names_no_winner():
    pre = ResultRecord(method="pre-trained", speciality={"s": 0.2}, generality={"g": 0.8})
    full = ResultRecord(method="full", alpha=1.0, speciality={"s": 0.6}, generality={"g": 0.4})
    below = ResultRecord(
        method="l2", alpha=1.0, strengths={"l2_lambda": 0.1}, speciality={"s": 0.1}, generality={"g": 0.3}
    )
    table = method_table([pre, full, below])
    assert (
        table.splitlines()[-1] == "No method's front dominates any area beyond the pre-trained and fine-tuned points."
    )


NOT_COMPARED = {
    # the same speciality: nothing to scale the areas by
    "tie": (
        (0.25, 0.8),
        (0.25, 0.4),
        "the pre-trained and fine-tuned points have the same speciality, 0.250: nothing to scale the areas by",
    ),
    # a fine-tune less special than the pre-trained model: scaled between the two, the speciality axis would run
    # backwards, the pre-trained point becoming the most special and most general (a front reaching it: area 1)
    "less_special": (
        (0.5, 0.8),
        (0.4, 0.5),
        "the fine-tuned model is less special than the pre-trained one (0.400 < 0.500): no speciality gained to "
        "trade generality for",
    ),
}


@pytest.mark.parametrize("case", NOT_COMPARED)
def test_write_report_says_why_the_methods_are_not_compared(tmp_path, case):
    (pre_s, pre_g), (ft_s, ft_g), reason = NOT_COMPARED[case]
    pre = ResultRecord(method="pre-trained", speciality={"s": pre_s}, generality={"g": pre_g})
    full = ResultRecord(method="full", alpha=1.0, speciality={"s": ft_s}, generality={"g": ft_g})
    near = ResultRecord(method="full", alpha=0.25, speciality={"s": pre_s - 0.01}, generality={"g": pre_g - 0.01})
    write_report([pre, full, near], tmp_path / "out")
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "## Per method" not in markdown
    assert f"Per method: not compared ({reason})." in markdown
    assert "methods" not in json.loads((tmp_path / "out" / "report.json").read_text())
    if case == "less_special":
        assert hypervolume([pre, near], pre, full) == 1.0  # what the table showed before
