"""The solver diagnostics table: values update in place, columns fit their contents."""

from __future__ import annotations

from monoflow_studio.views.diagnostics import COLUMNS, SolverView


def _diagnostics(mean: float, failed: int, blocks: int = 3) -> list[dict]:
    return [
        {
            "block": i,
            "kind": "MonotoneBlock",
            "solver": "auto",
            "forward": {
                "method": "newton",
                "iterations_mean": mean + i,
                "iterations_max": 7,
                "residual_max": 1e-7,
                "n_failed": failed,
                "tol": 1.19e-6,
            },
        }
        for i in range(blocks)
    ]


def test_table_updates_in_place_and_resizes_to_its_contents(qtbot) -> None:
    view = SolverView()
    qtbot.addWidget(view)
    view.show()
    view.set_diagnostics(_diagnostics(3.0, 0), step=1)
    table = view.table
    assert table.rowCount() == 3 and table.columnCount() == len(COLUMNS)
    first = table.item(1, COLUMNS.index("iters"))
    assert first.text() == "4"
    assert table.item(0, COLUMNS.index("tol")).text() == "1.19e-06"
    assert "epsilon" in table.horizontalHeaderItem(COLUMNS.index("tol")).toolTip()
    width = table.columnWidth(COLUMNS.index("failed"))
    view.set_diagnostics(_diagnostics(3.25, 10**40), step=2)
    # the same item objects, new texts; a wider value widens its column
    assert table.item(1, COLUMNS.index("iters")) is first and first.text() == "4.25"
    assert table.item(2, COLUMNS.index("failed")).text() == str(10**40)
    assert table.columnWidth(COLUMNS.index("failed")) > width
    assert view.failed_total() == 3 * 10**40
    view.set_diagnostics(_diagnostics(3.0, 0, blocks=1), step=3)
    assert table.rowCount() == 1 and view.failed_total() == 0
