"""The verdict rule: registry, positive controls, the five verdicts, Holm over the scorecard."""

import math

import pytest

from reflow_core import scorecard
from reflow_core.scorecard import (INCONCLUSIVE, MET, MISSED, NOT_REPRODUCED, NOT_TESTABLE, NOT_YET, REPRODUCED,
                                   STRADDLES, Control, Row, against, decide)

PASSED = Control("a control that passed", True, "planted effect found")
FAILED = Control("a control that failed", False, "val loss 7.3 vs unigram 7.4")


def row(verdict=REPRODUCED, control=PASSED, claim_id="sae.kl", **kw) -> Row:
    return Row(claim_id=claim_id, ours="-40%", verdict=verdict, why="w", scale="test", checkpoint="c",
               control=control, **kw)


def test_rows_take_the_paper_side_from_the_registry(tmp_path):
    r = row()
    assert (r.source, r.paper) == ("SAE+NFM", "−51.6%")
    scorecard.save_rows(tmp_path, "x", [r])
    table = scorecard.scorecard_table(tmp_path)
    assert table.set_index("claim_id").loc["sae.kl", "ours"] == "-40%"
    assert (table["verdict"] == NOT_YET).sum() == len(table) - 1  # every other claim shows as unmeasured
    with pytest.raises(ValueError, match="'sae.typo' is not in assets/claims.json"):
        row(claim_id="sae.typo")
    with pytest.raises(ValueError, match="verdict must be one of"):
        row(verdict="held")


def test_not_reproduced_is_refused_without_a_passed_control():
    with pytest.raises(ValueError, match="needs a positive control that passed"):
        row(verdict=NOT_REPRODUCED, control=FAILED)
    assert row(verdict=NOT_REPRODUCED, control=PASSED).verdict == NOT_REPRODUCED
    assert row(verdict=NOT_TESTABLE, control=FAILED).verdict == NOT_TESTABLE
    with pytest.raises(TypeError, match="control must be a Control"):
        row(control="looks fine")


def test_stored_rows_keep_their_control(tmp_path):
    scorecard.save_rows(tmp_path, "x", [row(verdict=NOT_TESTABLE, control=FAILED)])
    back = scorecard.collect_rows(tmp_path).iloc[0]
    assert back["control"] == FAILED and back["verdict"] == NOT_TESTABLE


def test_every_claim_has_a_criterion():
    for claim_id in scorecard.load_claims()["claim_id"]:
        c = scorecard.criterion(claim_id)
        assert {"statistic", "threshold", "direction", "tolerance"} <= set(c), claim_id


@pytest.mark.parametrize("lo, hi, threshold, direction, expected", [
    (0.6, 0.8, 0.5, ">=", MET), (0.1, 0.4, 0.5, ">=", MISSED), (0.4, 0.6, 0.5, ">=", STRADDLES),
    (0.2, 0.2, 0.5, ">=", MISSED), (0.5, 0.5, 0.5, ">=", MET),
    (0.2, 0.8, 1.5, "<=", MET), (2.0, 3.0, 1.5, "<=", MISSED), (1.0, 2.0, 1.5, "<=", STRADDLES),
])
def test_against(lo, hi, threshold, direction, expected):
    assert against(lo, hi, threshold, direction) == expected


def test_decide_is_the_one_rule():
    assert decide(MET, FAILED) == REPRODUCED  # seen is seen
    assert decide(MISSED, PASSED) == NOT_REPRODUCED
    assert decide(MISSED, FAILED) == NOT_TESTABLE  # the test could not have seen it
    assert decide(STRADDLES, PASSED) == INCONCLUSIVE
    assert decide(MET, PASSED, null_meets_paper=True) == INCONCLUSIVE  # the null alone meets the figure
    assert decide(MISSED, PASSED, null_meets_paper=True) == NOT_REPRODUCED  # missing it is still informative
    with pytest.raises(ValueError):
        decide("maybe", PASSED)


def test_holm_turns_a_lone_significance_into_inconclusive(tmp_path):
    rows = [row(claim_id="galaxy.silhouette", p_value=0.03), row(claim_id="typo.resilience", p_value=0.04),
            row(claim_id="sae.factorial", p_value=0.0001)]
    scorecard.save_rows(tmp_path, "x", rows)
    table = scorecard.scorecard_table(tmp_path).set_index("claim_id")
    assert table.loc["sae.factorial", "verdict"] == REPRODUCED  # 0.0003 after Holm
    for claim in ("galaxy.silhouette", "typo.resilience"):  # 0.06 and 0.06 after Holm
        assert table.loc[claim, "verdict"] == INCONCLUSIVE
        assert "after Holm over the scorecard's 3 p-values" in table.loc[claim, "why"]
    assert math.isnan(table.loc["arch.params", "p_holm"])


def test_holm_leaves_verdicts_without_p_values_alone(tmp_path):
    scorecard.save_rows(tmp_path, "x", [row(claim_id="arch.params")])
    table = scorecard.scorecard_table(tmp_path).set_index("claim_id")
    assert table.loc["arch.params", "verdict"] == REPRODUCED


def test_the_scorecard_chapter_reads_a_repository_relative_results_dir(tmp_path, monkeypatch):
    """The book runner injects ``results_dir = "results/<scale>"`` and runs each notebook from notebooks/: the
    chapter must read the rows the other chapters stored there, not an empty folder relative to its working
    directory (every claim read "not yet measured" in the first smoke build with relative paths)."""
    import shutil

    from reflow_core.chapters import scorecard as chapter
    from reflow_core.experiments import controls
    from reflow_core.scales import REPO_ROOT

    relative = "results/test/relative-results-dir-check"  # results/test/ is git-ignored
    shutil.rmtree(REPO_ROOT / relative, ignore_errors=True)
    try:
        scorecard.save_rows(REPO_ROOT / relative, "posthoc", [row(REPRODUCED)])
        fake = controls.ModelControls("x@final", {n: Control(n, True, "") for n in controls.MODEL_CONTROLS})
        monkeypatch.setattr(controls, "training_controls", lambda *a, **k: [fake])
        monkeypatch.chdir(tmp_path)  # like a notebook's working directory: not the repository root
        result = chapter.run("test", relative)
        verdicts = dict(zip(result.table["claim_id"], result.table["verdict"]))
        assert verdicts["sae.kl"] == REPRODUCED
    finally:
        shutil.rmtree(REPO_ROOT / relative, ignore_errors=True)


def test_controls_of_snapshots_an_earlier_run_left_are_dropped(tmp_path):
    """A 700-step record rebuilt at 1,100 steps kept 'reflow-seed1337@step-000700.json' beside the new snapshots'
    controls: the record must hold only checkpoints that exist."""
    from reflow_core.experiments import controls

    names = ["reflow-seed1337@step-000700.json", "reflow-seed1337@step-000800.json", "reflow-seed1337@final.json",
             "gpt2-new-seed1337@step-000700.json"]
    for name in names:
        (tmp_path / name).write_text("{}")
    gone = controls.drop_stale_snapshot_controls(tmp_path, "reflow-seed1337", ["step-000800", "step-001100"])
    assert [p.name for p in gone] == ["reflow-seed1337@step-000700.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[1:])  # other runs and @final untouched
