"""report.json's models (loadgen/schema.py) against docs/report-schema.json and docs/report-schema.md, and
what load() accepts: reports of older and newer minor versions; a malformed one is a one-line error."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, get_args

import pytest
from pydantic import BaseModel, ValidationError

from loadgen.analysis import analyse
from loadgen.cli import main
from loadgen.report import ReportError, build, dumps, load, write_json
from loadgen.schema import SCHEMA_COMMAND, SCHEMA_VERSION, Report, json_schema, schema_json
from tests.unit.loadgen.test_analysis import _fleet
from tests.unit.loadgen.test_report import _report

ROOT = Path(__file__).resolve().parents[3]
DOC = ROOT / "docs" / "report-schema.md"
# the sections of docs/report-schema.md with a table of fields: "Top level" is the report itself, the others
# are paths from it ("[]": the items of an array; a dict's values for `accuracy`)
SECTIONS = ("Top level", "config", "accuracy", "levels[]", "crossovers[]", "indices[]", "energy",
            "energy.devices[]", "schedules[]", "schedules[].windows[]", "schedules[].totals", "context",
            "context.backends[]", "context.gpus[]", "context.meter", "checks", "warnings[]")  # fmt: skip


def test_exported_json_schema_is_the_models() -> None:
    committed = (ROOT / "docs" / "report-schema.json").read_text()
    assert committed == schema_json(), (
        f"docs/report-schema.json is not the models' schema: run `{SCHEMA_COMMAND}`"
    )


def test_schema_subcommand_prints_it(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema"]) == 0
    assert json.loads(capsys.readouterr().out) == json_schema()


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The models an annotation holds: X, list[X], dict[str, X], X | None, ..."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for a in get_args(annotation) for m in _models_in(a)]


def _model_at(section: str) -> type[BaseModel]:
    model: type[BaseModel] = Report
    if section == "Top level":
        return model
    for part in section.split("."):
        [model] = _models_in(model.model_fields[part.removesuffix("[]")].annotation)
    return model


def _tables(markdown: str) -> dict[str, list[tuple[list[str], str]]]:
    """{section: [(the backticked names of a row's first column, the rest of the row)]}; a section is the
    backticked name of the latest heading, else the heading's text."""
    out: dict[str, list[tuple[list[str], str]]] = {}
    section = ""
    for line in markdown.splitlines():
        if line.startswith("#"):
            name = re.search(r"`([^`]+)`", line)
            section = name.group(1) if name else line.lstrip("#").strip()
        elif line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if cells[0] == "field" or not cells[0].strip("-: "):
                continue  # the header and its rule
            names = [n.removesuffix("[]") for n in re.findall(r"`([^`]+)`", cells[0])]
            out.setdefault(section, []).append((names, " | ".join(cells[1:])))
    return out


def test_docs_tables_name_every_field_of_the_models_and_no_other() -> None:
    text = DOC.read_text()
    assert f"(schema {SCHEMA_VERSION})" in text.splitlines()[0]
    tables = _tables(text)
    assert sorted(tables) == sorted(SECTIONS), "docs/report-schema.md: one table per section"
    tabled = {_model_at(s) for s in SECTIONS}
    for section, rows in tables.items():
        model = _model_at(section)
        documented = [n for names, _ in rows for n in names]
        assert len(documented) == len(set(documented)), f"{section}: a field named twice"
        missing = sorted(set(model.model_fields) - set(documented))
        unknown = sorted(set(documented) - set(model.model_fields))
        assert not missing, f"docs/report-schema.md's {section} table lacks {missing} ({model.__name__})"
        assert not unknown, (
            f"docs/report-schema.md's {section} table names {unknown}, not in {model.__name__}"
        )
        # an object without a table of its own (levels[].ci, indices[].weights, ...): its fields in the row
        for names, rest in rows:
            named = set(re.findall(r"`([^`]+)`", rest))
            for name in names:
                for sub in _models_in(model.model_fields[name].annotation):
                    if sub not in tabled:
                        lacking = sorted(set(sub.model_fields) - named)
                        assert not lacking, f"docs/report-schema.md: {section}.{name} does not name {lacking}"
    [version_row] = [rest for names, rest in tables["Top level"] if names == ["schema_version"]]
    assert f'`"{SCHEMA_VERSION}"`' in version_row


def test_json_schema_accepts_written_reports() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(json_schema())
    validator.check_schema(json_schema())
    docs = [json.loads(dumps(_report(scored))) for scored in (True, False)]
    docs += [json.loads(p.read_text()) for p in sorted((ROOT / "docs" / "results").rglob("*report.json"))]
    for doc in docs:
        assert [e.message for e in validator.iter_errors(doc)] == []


def test_build_rejects_a_figure_without_a_field() -> None:
    a = analyse(_fleet(4), bootstrap=20, seed=0)
    a.levels[0]["j_per_watt"] = 1.0
    with pytest.raises(ValidationError, match="j_per_watt"):
        build({}, a, partial=False, started_unix_s=0.0, duration_s=1.0)
    del a.levels[0]["j_per_watt"]
    a.levels[0]["energy_j"], a.levels[0]["energy_null_reason"] = None, None
    with pytest.raises(ValidationError, match="without energy_null_reason"):  # unknown energy has a reason
        build({}, a, partial=False, started_unix_s=0.0, duration_s=1.0)


def test_written_report_reads_back_to_the_same_bytes(tmp_path: Path) -> None:
    path = write_json(_report(scored=True), tmp_path / "report.json")
    assert dumps(load(path)) == path.read_text()


def _doc(**top: Any) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(dumps(_report(scored=True)))
    doc.update(top)
    return doc


def test_load_reads_older_and_newer_minor_versions(tmp_path: Path) -> None:
    old = _doc(schema_version="1.0")  # before 1.1's fields
    for key in ("accuracy_measured", "accuracy_null_reason", "energy", "schedules"):
        del old[key]
    for lv in old["levels"]:
        for key in ("chains_ok", "windows_monotonic_s", "energy_by_hop", "accuracy_null_reason"):
            del lv[key]
    for acc in old["accuracy"].values():
        del acc["null_reason"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    rep = load(tmp_path / "old.json")
    assert (
        rep.accuracy_measured is True
        and rep.energy.devices == []
        and rep.energy.null_reason == "not recorded"
    )
    assert rep.levels[0].chains_ok is None and rep.levels[0].energy_by_hop == {}
    v12 = _doc(schema_version="1.2")  # before 1.3's context, checks, warnings, tails and spread
    for key in ("context", "checks", "warnings"):
        del v12[key]
    for lv in v12["levels"]:
        for key in ("requests_per_s", "repeat_spread"):
            del lv[key]
        for key in ("bootstrap", "widened"):
            del lv["ci"][key]
        for p in ("ttft_s", "itl_s", "e2e_s"):
            del lv[p]["mean"]
    for cx in v12["crossovers"]:
        for key in ("status", "b_star_point", "undetermined_reason"):
            del cx[key]
    (tmp_path / "v12.json").write_text(json.dumps(v12))
    rep = load(tmp_path / "v12.json")
    assert rep.context is None and rep.warnings == [] and rep.levels[0].ci.widened == []
    assert rep.levels[0].ttft_s.mean is None and rep.crossovers[0].status is None
    newer = _doc(schema_version=f"{SCHEMA_VERSION.split('.')[0]}.99", added_later={"x": 1})
    newer["levels"][0]["j_per_watt"] = 2.0
    (tmp_path / "newer.json").write_text(json.dumps(newer))
    rep = load(tmp_path / "newer.json")
    assert rep.schema_version.endswith(".99") and "j_per_watt" not in rep.levels[0].model_dump()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["levels"][1].update(typo=1), r"levels\[1\]\.typo: Extra inputs are not permitted$"),
        (
            lambda d: d["crossovers"][0].update(b_star="eight"),
            r"crossovers\[0\]\.b_star: Value error, Input should be a number$",
        ),
        (lambda d: d["energy"].pop("devices"), r"energy\.devices: Field required$"),
        (lambda d: d.update(partial="maybe"), r"partial: Input should be a valid boolean"),
    ],
)
def test_malformed_report_is_one_line(tmp_path: Path, change: Any, message: str) -> None:
    doc = _doc()
    change(doc)
    path = tmp_path / "report.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ReportError) as e:
        load(path)
    line = str(e.value)
    assert "\n" not in line and line.startswith(f"{path} is not a valid schema {SCHEMA_VERSION} report: ")
    assert re.search(message, line), line
