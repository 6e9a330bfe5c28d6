"""The `daily` live query (the reconciliation's ClickHouse input) on a real chDB with the sink's migrations.

chDB allows one data folder per process and test_sink.py keeps one open for the whole session, so the query
runs in a child process on a folder of its own.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from services.stores import clickhouse_queries as queries

REPO_ROOT = Path(__file__).resolve().parents[3]

SCRIPT = """
import json, sys
from pathlib import Path
from services.stores import clickhouse_queries as queries
from services.stores.clickhouse import ChdbClient
from services.clickhouse_sink.migrations import apply_migrations

client = ChdbClient(Path(sys.argv[1]))
apply_migrations(client.execute, client.rows, "lp")
columns = "(event_id, event_type, event_time, user_id, amount, event_date, kafka_offset)"
def insert(rows):
    client.execute(f"INSERT INTO lp.user_events_realtime {columns} VALUES " + ", ".join(rows))
a, b, c, d = ("00000000-0000-0000-0000-00000000000" + n for n in "abcd")
u = "00000000-0000-0000-0000-000000000001"
insert([
    f"('{a}', 'purchase', '2026-11-02 23:59:59.999', '{u}', 10.25, '2026-11-02', 1)",
    f"('{b}', 'purchase', '2026-11-02 08:00:00', '{u}', 5.5, '2026-11-02', 2)",
    f"('{c}', 'page_view', '2026-11-02 08:00:01', '{u}', NULL, '2026-11-02', 3)",
    f"('{d}', 'purchase', '2026-11-03 00:00:00', '{u}', 1.0, '2026-11-03', 4)",
])
# A replay left a second copy of a and b in another part (another insert, not yet merged).
insert([
    f"('{a}', 'purchase', '2026-11-02 23:59:59.999', '{u}', 10.25, '2026-11-02', 11)",
    f"('{b}', 'purchase', '2026-11-02 08:00:00', '{u}', 5.5, '2026-11-02', 12)",
])
((rows,),) = client.rows("SELECT count() FROM lp.user_events_realtime")
print(json.dumps({"stored": rows, "daily": queries.run("daily", client.rows, "lp").as_dict()}))
client.close()
"""


def test_daily_counts_rows_and_each_event_once_per_utc_day_and_type(tmp_path: Path):
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "chdb")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["stored"] == 6  # the duplicates are really there ...
    daily = result["daily"]
    assert daily["columns"] == ["day", "event_type", "rows", "events", "revenue"]
    assert daily["rows"] == [  # ... shown as rows, the events counted once, their amount summed once
        ["2026-11-02", "page_view", 1, 1, 0.0],
        ["2026-11-02", "purchase", 4, 2, 15.75],
        ["2026-11-03", "purchase", 1, 1, 1.0],
    ]


def test_daily_is_a_named_query_and_renders():
    def rows(sql: str) -> list[tuple]:
        if "user_activity_summary" in sql:  # the view counted a copy the base table has merged away since
            return [("2026-11-02", "purchase", 3), ("2026-11-02", "login", 1)]
        if "FINAL" in sql:
            return [("2026-11-02", "purchase", 15.75), ("2026-11-02", "login", None)]
        return [("2026-11-02", "purchase", 2, 2), ("2026-11-02", "login", 1, 1)]

    result = queries.run("daily", rows, "lp")
    assert "daily" in queries.QUERIES
    assert result.rows == [["2026-11-02", "login", 1, 1, 0.0], ["2026-11-02", "purchase", 3, 2, 15.75]]
    assert "Rows, events and revenue per day" in queries.render_text(result)
