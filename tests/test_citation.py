"""Citing: CITATION.cff is valid CFF 1.2.0 and agrees with the package; every figure caption ends with its file."""

import json
import re
import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
SCHEMA = Path(__file__).resolve().parent / "data" / "cff-schema-1.2.0.json"  # NOTICE: where it comes from


def cff() -> dict:
    return yaml.safe_load((REPO / "CITATION.cff").read_text(encoding="utf8"))


def test_citation_cff_validates_against_the_cff_1_2_0_schema():
    import jsonschema  # a test extra (pyproject): never skipped
    schema = json.loads(SCHEMA.read_text(encoding="utf8"))
    assert schema["$id"] == "https://citation-file-format.github.io/1.2.0/schema.json"
    validator = jsonschema.Draft7Validator(schema, format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER)
    errors = sorted(validator.iter_errors(cff()), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors)


def test_the_schema_check_would_catch_a_broken_file():
    import jsonschema  # a test extra (pyproject): never skipped
    validator = jsonschema.Draft7Validator(json.loads(SCHEMA.read_text(encoding="utf8")))
    broken = {**cff(), "license": "not-a-licence"}
    del broken["authors"]
    messages = " ".join(e.message for e in validator.iter_errors(broken))
    assert "'authors' is a required property" in messages and "not-a-licence" in messages


def test_citation_names_the_package_version_licence_and_a_date():
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf8"))["project"]
    data = cff()
    assert data["cff-version"] == "1.2.0"
    assert str(data["version"]) == project["version"]
    assert data["license"] == project["license"]["text"]
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", str(data["date-released"]))
    assert {"reFlow: A Feature-Decoupled Transformer with Native Interpretability"} <= {r["title"] for r in
                                                                                       data["references"]}


def glue_figures() -> list[tuple[str, str, str]]:
    """(notebook, figure name, caption) for every ``{glue:figure}`` in the chapters' markdown."""
    found = []
    for path in sorted((REPO / "notebooks").glob("*.ipynb")):
        for cell in json.loads(path.read_text(encoding="utf8"))["cells"]:
            if cell["cell_type"] != "markdown":
                continue
            for block in re.findall(r"```\{glue:figure\}.*?\n```", "".join(cell["source"]), re.S):
                name = re.match(r"```\{glue:figure\}\s+(\S+)", block).group(1)
                found.append((path.name, name, block))
    return found


def test_every_figure_caption_ends_with_its_file_name():
    figures = glue_figures()
    assert len(figures) >= 25
    for notebook, key, block in figures:
        name = key.replace("_", "-")
        caption = block.rsplit("\n```", 1)[0].rstrip()
        assert re.search(rf"File:\s+`figures/{re.escape(name)}\.png`\.$", caption), (notebook, name, caption[-120:])
        assert f":name: {name}" in block, (notebook, name)


def test_the_introduction_shows_how_to_cite_a_figure():
    intro = (REPO / "book" / "intro.md").read_text(encoding="utf8")
    assert "CITATION.cff" in intro
    assert "figures/fig-training-loss-curves.png" in intro and "@misc{" in intro
