"""The speciality-vs-generality report on hand-made records whose front, table and pick are known."""

from __future__ import annotations

import json

import matplotlib.image
import pytest
from conftest import point

from hf_specgen.eval import report
from hf_specgen.eval.markdown import markdown_table
from hf_specgen.eval.pareto import best_generality, pareto_front
from hf_specgen.eval.records import ResultRecord, load_records
from hf_specgen.eval.report import write_report


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def table_records() -> list[ResultRecord]:
    """Out of order, with metrics only some records have, one dominated point (l2 at lambda 1)."""
    return [
        ResultRecord(
            method="l2",
            hyperparameter="l2_lambda",
            value=0.1,
            speciality={"med": 0.8, "med_val": 0.75},
            generality={"arith": 0.3},
        ),
        ResultRecord(method="full", speciality={"med": 0.8567}, generality={"arith": 0.2, "facts": 0.1}),
        ResultRecord(method="pre-trained", speciality={"med": 0.25}, generality={"arith": 0.86, "facts": 0.9}),
        ResultRecord(
            method="l2",
            hyperparameter="l2_lambda",
            value=1,
            speciality={"med": 0.45, "med_val": 0.45},
            generality={"arith": 0.5},
        ),
        ResultRecord(method="full", alpha=0.5, speciality={"med": 0.5}, generality={"arith": 0.6, "facts": 0.7}),
    ]


def test_pareto_front_drops_dominated_keeps_ties_and_single_axis_bests():
    best_generality_only = point("a", 0.2, 0.9)
    middle, tie = point("b", 0.5, 0.6), point("c", 0.5, 0.6)
    dominated = point("d", 0.4, 0.5)
    same_speciality_less_generality = point("f", 0.5, 0.55)
    same_generality_less_speciality = point("h", 0.1, 0.9)
    best_speciality_only = point("e", 0.9, 0.1)
    records = [
        best_speciality_only,
        middle,
        dominated,
        same_speciality_less_generality,
        tie,
        best_generality_only,
        same_generality_less_speciality,
    ]
    front = pareto_front(records)
    assert [r.method for r in front] == ["a", "b", "c", "e"]  # by speciality; the tie in input order
    assert front[1] is middle and front[2] is tie
    assert pareto_front([dominated]) == [dominated]
    assert pareto_front([]) == []


def test_means_and_setting():
    record = ResultRecord(
        method="l2",
        alpha=0.5,
        hyperparameter="l2_lambda",
        value=0.1,
        speciality={"a": 0.5, "b": 1.0},
        generality={"c": 0.1, "d": 0.2, "e": 0.6},
    )
    assert record.speciality_score == pytest.approx(0.75)
    assert record.generality_score == pytest.approx(0.3)
    assert record.setting == "l2_lambda=0.1, alpha=0.5"
    assert point("pre-trained", 0.1, 0.2).setting == ""


def test_a_heterogeneous_merge_is_labelled_by_its_schedule_and_survives_a_round_trip(tmp_path):
    groups = {"kind": "groups", "group_alphas": [0.25, 0.5, 0.75], "outside_alpha": 0.5, "mean_alpha": 0.5}
    record = point("full", 0.5, 0.5, alpha=0.5, merge=groups)
    assert record.setting == "alpha=0.5 (groups 0.25/0.5/0.75)"
    rules = {
        "kind": "rules",
        "rules": [["mlp", 0.3], ["attn", 0.6]],
        "default_alpha": 0.5,
        "linear_only": True,
        "non_linear_alpha": 1.0,
        "mean_alpha": 0.5,
    }
    assert point("full", 0.5, 0.5, alpha=0.5, merge=rules).setting == "alpha=0.5 (2 rules, linear only)"
    assert ResultRecord.load(record.save(tmp_path / "r.json")) == record
    assert "alpha=0.5 (groups 0.25/0.5/0.75)" in markdown_table([record])


def test_markdown_table(table_records):
    assert markdown_table(table_records) == "\n".join(
        [
            "| method | setting | med | med_val | arith | facts | speciality | generality | Pareto |",
            "|---|---|---:|---:|---:|---:|---:|---:|:---:|",
            "| full | alpha=0.5 | 0.500 |  | 0.600 | 0.700 | 0.500 | 0.650 | * |",
            "| full |  | 0.857 |  | 0.200 | 0.100 | 0.857 | 0.150 | * |",
            "| l2 | l2_lambda=0.1 | 0.800 | 0.750 | 0.300 |  | 0.775 | 0.300 | * |",
            "| l2 | l2_lambda=1 | 0.450 | 0.450 | 0.500 |  | 0.450 | 0.500 |  |",
            "| pre-trained |  | 0.250 |  | 0.860 | 0.900 | 0.250 | 0.880 | * |",
        ]
    )


def test_markdown_table_escapes_pipes():
    assert (
        markdown_table([point("a|b", 0.5, 0.5)]).splitlines()[2] == "| a\\|b |  | 0.500 | 0.500 | 0.500 | 0.500 | * |"
    )


def test_best_generality_keeps_95_percent_of_the_best_speciality():
    records = [point("a", 1.0, 0.1), point("b", 0.96, 0.3), point("c", 0.95, 0.5), point("d", 0.94, 0.9)]
    assert best_generality(records) is records[2]
    assert best_generality(records, keep=0.9) is records[3]


def test_json_round_trip_of_files_lists_and_directories(tmp_path):
    full = ResultRecord(
        method="l2",
        alpha=0.25,
        hyperparameter="l2_lambda",
        value=0.1,
        speciality={"med": 0.8},
        generality={"arith": 0.3, "facts": 0.4},
        cost={"train_s": 12.5},
        model="runs/l2",
    )
    single = full.save(tmp_path / "single.json")
    assert ResultRecord.load(single) == full
    assert ResultRecord.from_dict(json.loads(single.read_text())) == full
    many = [point("full", 0.9, 0.1, alpha=a) for a in (0.0, 0.5, 1.0)]
    (tmp_path / "many.json").write_text(json.dumps([r.to_dict() for r in many]))
    nested = tmp_path / "sweep" / "deeper"
    nested.mkdir(parents=True)
    point("zero-shot", 0.2, 0.9).save(nested / "b.json")
    point("full", 0.7, 0.2).save(tmp_path / "sweep" / "a.json")
    (tmp_path / "sweep" / "notes.txt").write_text("not a record")
    loaded = load_records([single, tmp_path / "many.json", tmp_path / "sweep"])
    assert loaded == [full, *many, point("full", 0.7, 0.2), point("zero-shot", 0.2, 0.9)]
    assert load_records(str(single)) == [full]
    integers = tmp_path / "int.json"
    integers.write_text(json.dumps({"method": "full", "speciality": {"a": 1}, "generality": {"b": 0}}))
    (record,) = load_records([integers])
    assert record.speciality == {"a": 1.0} and isinstance(record.speciality["a"], float)


GOOD = {"method": "full", "speciality": {"med": 0.8}, "generality": {"arith": 0.3}}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"generality": None}, "missing field 'generality'"),
        ({"method": None}, "missing field 'method'"),
        ({"speciality": {}}, "speciality is empty"),
        ({"generality": {"arith": "high"}}, "generality['arith'] must be a finite number, got 'high'"),
        ({"speciality": {"med": True}}, "speciality['med'] must be a finite number"),
        ({"speciality": [0.8]}, "speciality must be a mapping"),
        ({"alpha": "0.5"}, "alpha must be a finite number"),
        ({"value": 0.1}, "hyperparameter and value go together"),
        ({"lambda": 0.1}, "unknown field 'lambda'"),
        ({"alpha": 0.5, "merge": [0.1, 0.9]}, "merge must be a merge schedule"),
        ({"alpha": 0.5, "merge": {"group_alphas": [0.1]}}, "merge must be a merge schedule"),
        ({"merge": {"kind": "groups"}}, "it needs the merge's (mean) alpha"),
    ],
)
def test_bad_record_names_file_and_problem(tmp_path, change, message):
    data = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="bad.json") as error:
        load_records([path])
    assert message in str(error.value)
    with pytest.raises(ValueError, match="bad.json"):
        ResultRecord.load(path)


def test_bad_inputs_in_lists_directories_and_json(tmp_path):
    (tmp_path / "list.json").write_text(json.dumps([GOOD, {**GOOD, "speciality": {}}]))
    with pytest.raises(ValueError, match=r"list\.json, record 1: speciality is empty"):
        load_records([tmp_path / "list.json"])
    with pytest.raises(ValueError, match="not one; use load_records"):
        ResultRecord.load(tmp_path / "list.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match=r"broken\.json: not valid JSON"):
        load_records([tmp_path / "broken.json"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no"):
        load_records([tmp_path / "empty"])
    (tmp_path / "scalar.json").write_text("3")
    with pytest.raises(ValueError, match=r"scalar\.json: a record must be a JSON object"):
        load_records([tmp_path / "scalar.json"])
    with pytest.raises(ValueError, match="speciality is empty"):
        ResultRecord(method="full", speciality={}, generality={"a": 1.0})


def test_write_report_writes_json_markdown_and_png(tmp_path, table_records):
    records = [*table_records, point("full", 0.8567 * 0.95, 0.2, alpha=0.9)]  # just keeps 95% of the best
    output = tmp_path / "results" / "report"
    output.mkdir(parents=True)
    (output / "keep.txt").write_text("other files stay")
    paths = write_report(records, output, title="Tiny LM")
    assert paths == {"json": output / "report.json", "markdown": output / "report.md", "plot": output / "report.png"}
    assert sorted(p.name for p in output.iterdir()) == ["keep.txt", "report.json", "report.md", "report.png"]
    assert sorted(p.name for p in output.parent.iterdir()) == ["report"]  # no temporary directory left

    data = json.loads(paths["json"].read_text())
    assert [ResultRecord.from_dict(r) for r in data["records"]] == records
    assert data["pareto_front"] == [2, 4, 0, 5, 1]  # pre-trained, alpha 0.5, l2 0.1, alpha 0.9, full
    assert data["best_generality"] == 5
    assert data["means"][0] == {"speciality": pytest.approx(0.775), "generality": pytest.approx(0.3)}

    markdown = paths["markdown"].read_text()
    assert markdown.startswith("# Tiny LM\n\n" + markdown_table(records) + "\n\n")
    assert "the most general point is full (alpha=0.9): speciality 0.814, generality 0.200." in markdown
    assert "5 of 6 points are on the Pareto front" in markdown

    png = paths["plot"].read_bytes()
    assert png.startswith(PNG_SIGNATURE)
    height, width, _ = matplotlib.image.imread(paths["plot"]).shape
    assert height > 100 and width > 100


def test_failed_write_leaves_no_output(tmp_path, table_records, monkeypatch):
    def broken_plot(*args, **kwargs):
        raise RuntimeError("plot failed")

    monkeypatch.setattr(report, "plot", broken_plot)
    with pytest.raises(RuntimeError, match="plot failed"):
        write_report(table_records, tmp_path / "new")
    assert list(tmp_path.iterdir()) == []

    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "report.md").write_text("old report")
    with pytest.raises(RuntimeError, match="plot failed"):
        write_report(table_records, existing)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]
    assert [p.name for p in existing.iterdir()] == ["report.md"] and (
        existing / "report.md"
    ).read_text() == "old report"


def test_write_report_refuses_no_records(tmp_path):
    with pytest.raises(ValueError, match="no records"):
        write_report([], tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_keep_share_moves_the_pick(tmp_path, table_records):
    strict = json.loads(write_report(table_records, tmp_path / "strict", keep=1.0)["json"].read_text())
    loose = json.loads(write_report(table_records, tmp_path / "loose", keep=0.5)["json"].read_text())
    assert table_records[strict["best_generality"]] == max(table_records, key=lambda r: r.speciality_score)
    assert table_records[loose["best_generality"]] == best_generality(table_records, 0.5)
    assert strict["keep_speciality"] == 1.0 and "at least 50% of it" in (tmp_path / "loose" / "report.md").read_text()


def test_combine_reports_one_section_per_report_with_its_own_plot(tmp_path, table_records):
    write_report(table_records, tmp_path / "demo" / "lm", title="LM recipe")
    write_report(table_records[:2], tmp_path / "demo" / "clip", title="CLIP recipe")
    paths = report.combine_reports([tmp_path / "demo" / "lm", tmp_path / "demo" / "clip"], tmp_path / "demo")
    assert set(paths) == {"json", "markdown"}
    markdown = paths["markdown"].read_text()
    assert markdown.index("## LM recipe") < markdown.index("## CLIP recipe")
    assert "](lm/report.png)" in markdown and "](clip/report.png)" in markdown and "](report.png)" not in markdown
    combined = json.loads(paths["json"].read_text())["reports"]
    assert [len(combined[name]["records"]) for name in ("lm", "clip")] == [len(table_records), 2]
    with pytest.raises(ValueError, match="holds no report.json"):
        report.combine_reports([tmp_path / "demo" / "lm", tmp_path / "missing"], tmp_path / "other")
    assert not (tmp_path / "other").exists()


def test_directories_skip_reports_and_model_directories(tmp_path, table_records):
    run = tmp_path / "runs" / "full"
    (run / "finetuned").mkdir(parents=True)
    (run / "finetuned" / "config.json").write_text('{"model_type": "opt"}')
    (run / "finetuned" / "tokenizer_config.json").write_text("{}")
    table_records[0].save(run / "records" / "alpha-1.json")
    write_report(table_records, tmp_path / "runs")
    assert load_records(tmp_path / "runs") == [table_records[0]]
