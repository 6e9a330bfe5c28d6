"""The comparison: statuses, the store that differs, the consistency maths, the window, the table."""

from __future__ import annotations

from datetime import date

import pytest

from services.reconcile.compare import Figures, Window, cells_from_rows, compare, render_table, revenues_equal

D1, D2 = date(2026, 11, 2), date(2026, 11, 3)


def three(ch: dict, ice: dict, sf: dict, **kwargs) -> object:
    return compare({"clickhouse": ch, "iceberg": ice, "snowflake": sf}, **kwargs)


def same() -> dict:
    return {(D1, "purchase"): Figures(10, 250.5), (D1, "page_view"): Figures(990, 0.0), (D2, "login"): Figures(5, 0)}


def test_identical_stores_agree_fully():
    report = three(same(), same(), same())
    assert report.agrees and report.consistency == 1.0
    assert [c.status for c in report.cells] == ["ok", "ok", "ok"]
    assert [(c.day, c.event_type) for c in report.cells] == [(D1, "page_view"), (D1, "purchase"), (D2, "login")]
    assert not report.differing
    assert report.totals()["iceberg"] == Figures(1005, 250.5)


def test_a_cell_missing_in_one_store_names_it_and_counts_as_zero_there():
    sf = same()
    del sf[(D2, "login")]
    report = three(same(), same(), sf)
    (cell,) = report.differing
    assert (cell.day, cell.event_type, cell.status, cell.stores) == (D2, "login", "missing", ("snowflake",))
    assert cell.detail == "missing in snowflake (clickhouse=5, iceberg=5 events)"
    assert report.events_consistency == pytest.approx(1000 / 1005)
    assert not report.agrees  # 99.5 % < 99.9 %


def test_a_count_mismatch_names_the_store_off_the_majority():
    ch = same()
    ch[(D1, "page_view")] = Figures(989, 0.0)
    report = three(ch, same(), same())
    (cell,) = report.differing
    assert cell.status == "events" and cell.stores == ("clickhouse",)
    assert cell.detail == "events clickhouse=989 vs 990 in iceberg, snowflake"
    assert report.events_consistency == pytest.approx(1004 / 1005)
    assert report.consistency == report.events_consistency
    assert report.agrees  # 99.9005 % >= 99.9 %: one event in a thousand is the seed's tolerance
    assert not three(ch, same(), same(), min_consistency=1.0).agrees


def test_with_two_stores_there_is_no_majority_and_both_are_named():
    ch = same()
    ch[(D1, "purchase")] = Figures(9, 240.5)
    report = compare({"clickhouse": ch, "iceberg": same()})
    (cell,) = report.differing
    assert cell.status == "events" and cell.stores == ("clickhouse", "iceberg")


def test_revenue_within_tolerance_agrees_and_outside_it_names_the_store():
    within = same()
    within[(D1, "purchase")] = Figures(10, 250.5 + 0.004)  # float vs NUMBER(18,2) rounding: under a cent
    assert three(same(), same(), within).consistency == 1.0
    relative = {k: Figures(v.events, v.revenue * 1000) for k, v in same().items()}
    drift = dict(relative)
    drift[(D1, "purchase")] = Figures(10, 250_500 * (1 + 5e-7))  # 0.125 apart, but within 1e-6 relative
    assert three(relative, relative, drift).differing == []
    off = same()
    off[(D1, "purchase")] = Figures(10, 260.5)
    report = three(same(), same(), off)
    (cell,) = report.differing
    assert cell.status == "revenue" and cell.stores == ("snowflake",)
    assert cell.detail == "revenue snowflake=260.50 vs 250.50 in clickhouse, iceberg"
    assert report.events_consistency == 1.0
    assert report.revenue_consistency == pytest.approx(250.5 / 260.5)
    assert report.consistency == report.revenue_consistency and not report.agrees
    assert not revenues_equal(250.5, 250.52, 1e-6) and revenues_equal(250.5, 250.51, 1e-6)


def test_the_minimum_consistency_is_the_threshold():
    ch = same()
    ch[(D1, "page_view")] = Figures(985, 0.0)  # 1000 of 1005 agree: 99.50 %
    assert not three(ch, same(), same()).agrees
    loose = three(ch, same(), same(), min_consistency=0.995)
    assert loose.agrees and loose.consistency == pytest.approx(1000 / 1005)
    assert len(loose.differing) == 1  # agreeing overall still shows the cell that differs
    assert "verdict: AGREE" in loose.verdict() and "1 differing" in loose.verdict()


def test_consistency_is_summed_over_cells_not_averaged():
    big = {(D1, "page_view"): Figures(10_000, 0.0), (D1, "login"): Figures(2, 0.0)}
    small = {(D1, "page_view"): Figures(10_000, 0.0), (D1, "login"): Figures(1, 0.0)}
    report = compare({"a": big, "b": small})
    assert report.events_consistency == pytest.approx(10_001 / 10_002)  # not (1 + 0.5) / 2


def test_an_empty_window_is_consistent_and_says_so():
    report = three({}, {}, {})
    assert report.agrees and report.consistency == 1.0
    assert "no events in the window" in report.verdict()
    assert "(no events in the window)" in report.render()


def test_the_window_keeps_whole_days_inclusive():
    cells = {(date(2026, 11, d), "login"): Figures(1, 0.0) for d in (1, 2, 3, 4)}
    report = compare({"a": cells, "b": {}}, Window(D1, D2))
    assert [c.day for c in report.cells] == [D1, D2]
    assert Window(None, None).describe() == "all days" and Window(D1, None).describe() == "2026-11-02 .. ..."
    with pytest.raises(ValueError, match="empty"):
        Window(D2, D1)


def test_rows_table_and_json_show_every_store_and_absent_cells():
    sf = same()
    del sf[(D2, "login")]
    report = three(same(), same(), sf)
    assert report.columns() == [
        "day", "event_type", "clickhouse events", "clickhouse rows", "clickhouse revenue", "iceberg events",
        "iceberg rows", "iceberg revenue", "snowflake events", "snowflake rows", "snowflake revenue", "status",
    ]  # fmt: skip
    assert report.rows(only_differences=True) == [
        [
            "2026-11-03",
            "login",
            5,
            5,
            0.0,
            5,
            5,
            0.0,
            None,
            None,
            None,
            "missing in snowflake (clickhouse=5, iceberg=5 events)",
        ]
    ]
    text = report.render()
    lines = text.splitlines()
    assert lines[0].startswith("day         event_type  clickhouse events")
    assert "2026-11-02  purchase" in text and "250.50" in text
    assert lines[-1].startswith("verdict: DISAGREE: consistency 99.5025%")
    assert "rows 99.5025%" in lines[-1] and "duplicate rows" not in lines[-1]
    login = next(line for line in lines if "login" in line)
    assert " - " in login  # absent in snowflake
    body = report.as_dict()
    assert body["agrees"] is False and body["since"] is None
    assert body["cells"][2] == {
        "day": "2026-11-03",
        "event_type": "login",
        "events": {"clickhouse": 5, "iceberg": 5, "snowflake": None},
        "rows": {"clickhouse": 5, "iceberg": 5, "snowflake": None},
        "revenue": {"clickhouse": 0.0, "iceberg": 0.0, "snowflake": None},
        "status": "missing",
        "stores": ["snowflake"],
        "detail": "missing in snowflake (clickhouse=5, iceberg=5 events)",
    }
    lines = report.summary_lines()
    assert lines[0] == "  reconcile clickhouse  1005 events, 1005 rows, revenue 250.50"
    assert "verdict: DISAGREE" in lines[3] and "2026-11-03 login: missing in snowflake" in lines[4]


def test_rows_from_stores_take_text_or_dates_and_null_revenue():
    cells = cells_from_rows([("2026-11-02", "login", 3, None), (D1, "purchase", 2, "12.50"), (D1, "login", 1, None)])
    assert cells == {(D1, "login"): Figures(4, 0.0), (D1, "purchase"): Figures(2, 12.5)}


def test_render_table_aligns_numbers_right():
    text = render_table(["a", "n"], [["x", 5], ["long", 12345]])
    assert text.splitlines() == ["a     n", "----  -----", "x         5", "long  12345"]


def test_a_duplicate_row_in_one_store_disagrees_whatever_the_consistency():
    exact = three(same(), same(), same(), min_consistency=0.5)
    assert exact.agrees and exact.rows_consistency == 1.0 and exact.duplicate_rows == dict.fromkeys(exact.stores, 0)
    doubled = same()
    doubled[(D1, "page_view")] = Figures(990, 0.0, rows=991)  # one event stored twice: distinct ids still agree
    report = three(same(), doubled, same(), min_consistency=0.5)
    assert report.events_consistency == 1.0 and report.rows_consistency < 1.0
    assert report.consistency >= 0.5 and not report.agrees  # any duplicate row is DISAGREE
    assert report.duplicate_rows == {"clickhouse": 0, "iceberg": 1, "snowflake": 0}
    (cell,) = report.differing
    assert (cell.status, cell.stores) == ("duplicates", ("iceberg",))
    assert cell.detail == "duplicate rows iceberg=991 rows of 990 events"
    assert "DISAGREE" in report.verdict() and "duplicate rows: iceberg 1" in report.verdict()
    body = report.as_dict()
    assert body["totals"]["iceberg"] == {"events": 1005, "rows": 1006, "revenue": 250.5}
    assert body["duplicate_rows"]["iceberg"] == 1
    assert any("differs" in line and "duplicate rows" in line for line in report.summary_lines())


def test_cells_from_rows_take_rows_and_distinct_events():
    cells = cells_from_rows([("2026-11-02", "login", 5, 4, None), ("2026-11-02", "login", 1, 1, 0)])
    assert cells == {(D1, "login"): Figures(5, 0.0, rows=6)}
