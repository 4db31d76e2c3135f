"""bench.py's verdicts: the audit grid's outcome rows count what they say (the figures themselves are measured, never asserted)."""

import bench


def cell(name: str, value: float, best: float, warned: bool, same_network: float) -> dict:
    return {
        "name": f"eval.py --audit, {name}",
        "value": value,
        "unit": "F1",
        "ratio": value - best,
        "warned": warned,
        "same_network": same_network,
        "spread": (0.96, 0.97),
    }


def test_audit_outcome_counts_cells_at_or_above_cleanlab_or_warned():
    rows = [
        {"name": "cleanlab find_label_issues, 5-fold, best of 7: SVC, pairs A 0.2", "value": 0.97, "ratio": None},
        cell("cce T=300, pairs A 0.2", 0.98, 0.97, False, 0.90),  # above both
        cell("gce T=300, pairs A 0.2", 0.60, 0.97, True, 0.70),  # below both, warned
        cell("elr T=300, pairs A 0.2", 0.965, 0.97, False, 0.90),  # a miss, unwarned
        cell("cce T=1500, pairs A 0.2", 0.75, 0.80, False, 0.70),  # a miss below 0.80, unwarned
    ]
    goal, same = bench.audit_outcome(rows)
    assert (goal["value"], goal["unit"]) == (2, "of 4 cells")
    assert "warned 1; below 0.80 without a warning 1" in goal["note"]
    assert "elr T=300, pairs A 0.2 (-0.005; cleanlab's best over fold seeds 0.960-0.970)" in goal["note"]
    assert "cce T=1500, pairs A 0.2 (-0.050" in goal["note"] and "cce T=300" not in goal["note"]
    assert (same["value"], same["note"]) == (3, "below: gce T=300, pairs A 0.2")
    assert bench.row_figures(goal) == ("2", "")
    assert bench.row_figures(rows[3]) == ("0.965", "-0.005")
