"""Statistical and structural tests of the generator's domain model (seeded, so deterministic)."""

from __future__ import annotations

import io
import ipaddress
import json
import math
import random
import uuid
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import fastavro
import pytest
from fastavro.schema import load_schema
from fastavro.validation import validate

from services.generator.model import (
    CATEGORIES,
    COUNTRIES,
    EVENT_TYPE_WEIGHTS,
    TIER_ACTIVITY,
    TIER_SHARES,
    TIERS,
    VALID_STATUS_TRANSITIONS,
    WEEKEND_PURCHASE_FACTOR,
    Event,
    Simulation,
    StatusChange,
    Transaction,
    uuid4_str,
)

SCHEMA_PATH = Path(__file__).resolve().parents[3] / "schemas" / "avro" / "raw_event.avsc"
MONDAY = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
SATURDAY = datetime(2026, 1, 10, 9, 0, tzinfo=UTC)
STEP = timedelta(milliseconds=2)
SAMPLE_EVENTS = 200_000


def within(observed: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    """Binomial count within ``sigmas`` standard deviations of n*p (5 sigma: ~1 in 1.7 million false alarm)."""
    return abs(observed - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


@dataclass
class Run:
    """Aggregates of a long run; events themselves are not kept (memory)."""

    sim: Simulation
    n: int
    types: Counter[str] = field(default_factory=Counter)
    events_by_tier: Counter[str] = field(default_factory=Counter)
    purchases: list[tuple[Event, Transaction]] = field(default_factory=list)
    changes: list[StatusChange] = field(default_factory=list)
    end: datetime = MONDAY


def run(sim: Simulation, start: datetime, n: int, poll_every: int = 50) -> Run:
    result = Run(sim, n)
    now = start
    tier_of = {u.user_id: u.tier for u in sim.users}
    for i in range(n):
        event = sim.next_event(now)
        result.types[event.event_type] += 1
        result.events_by_tier[tier_of[event.user_id]] += 1
        if event.transaction is not None:
            result.purchases.append((event, event.transaction))
        if i % poll_every == 0:
            result.changes.extend(sim.due_status_changes(now))
        now += STEP
    result.end = now
    return result


@pytest.fixture(scope="module")
def weekday_run() -> Run:
    return run(Simulation(seed=1234, n_users=5000, n_products=1000, start_time=MONDAY), MONDAY, SAMPLE_EVENTS)


@pytest.fixture(scope="module")
def weekend_run() -> Run:
    return run(Simulation(seed=1234, n_users=5000, n_products=1000, start_time=SATURDAY), SATURDAY, 100_000)


# --- population ------------------------------------------------------------------------------------------------------
def test_tier_shares_match_targets() -> None:
    sim = Simulation(seed=7, n_users=30_000, n_products=10)
    tiers = Counter(u.tier for u in sim.users)
    for tier, share in TIER_SHARES.items():
        assert within(tiers[tier], len(sim.users), share), (tier, tiers[tier] / len(sim.users))


def test_users_are_plausible() -> None:
    start = datetime(2026, 3, 1, tzinfo=UTC)
    sim = Simulation(seed=3, n_users=2000, n_products=10, start_time=start)
    assert len({u.user_id for u in sim.users}) == 2000
    assert len({u.email for u in sim.users}) == 2000
    for user in sim.users:
        assert uuid.UUID(user.user_id).version == 4
        assert user.tier in TIERS
        assert user.country in COUNTRIES and len(user.country) == 2
        assert user.city in COUNTRIES[user.country][2]
        assert "@" in user.email and " " not in user.email
        assert user.created_at < start and user.registration_date == user.created_at.date()
        assert user.created_at <= user.updated_at <= start
        assert user.created_at.tzinfo is not None
    countries = Counter(u.country for u in sim.users)
    assert countries.most_common(1)[0][0] == "US"


def test_products_have_prices_in_category_range_and_cost_below_price() -> None:
    sim = Simulation(seed=3, n_users=1, n_products=3000)
    assert {p.category for p in sim.products} == set(CATEGORIES)
    for product in sim.products:
        low, high, subcategories, _ = CATEGORIES[product.category]
        assert product.subcategory in subcategories
        assert Decimal(str(low)) - 1 <= product.price <= Decimal(str(high))
        assert 0 < product.cost < product.price
        assert product.price.as_tuple().exponent == -2 and product.cost.as_tuple().exponent == -2
        assert product.brand in product.name


# --- event mix -------------------------------------------------------------------------------------------------------
def test_event_type_mix_on_weekdays(weekday_run: Run) -> None:
    total = sum(EVENT_TYPE_WEIGHTS.values())
    assert sum(weekday_run.types.values()) == weekday_run.n
    for event_type, weight in EVENT_TYPE_WEIGHTS.items():
        assert within(weekday_run.types[event_type], weekday_run.n, weight / total), event_type


def test_weekend_boosts_purchases_by_30_percent_and_renormalises(weekday_run: Run, weekend_run: Run) -> None:
    weights = dict(EVENT_TYPE_WEIGHTS, purchase=EVENT_TYPE_WEIGHTS["purchase"] * WEEKEND_PURCHASE_FACTOR)
    total = sum(weights.values())
    for event_type, weight in weights.items():
        assert within(weekend_run.types[event_type], weekend_run.n, weight / total), event_type
    ratio = (weekend_run.types["purchase"] / weekend_run.n) / (weekday_run.types["purchase"] / weekday_run.n)
    assert ratio == pytest.approx(1.3, abs=0.1)  # the weekend x1.3 on purchases


def test_activity_multipliers_show_in_events_per_user(weekday_run: Run) -> None:
    users_per_tier = Counter(u.tier for u in weekday_run.sim.users)
    per_user = {t: weekday_run.events_by_tier[t] / users_per_tier[t] for t in TIERS}
    relative = {t: per_user[t] / per_user["bronze"] for t in TIERS}
    # Events come in sessions, so the effective sample is the number of sessions: generous bounds.
    assert relative["silver"] == pytest.approx(TIER_ACTIVITY["silver"], rel=0.15)
    assert relative["gold"] == pytest.approx(TIER_ACTIVITY["gold"], rel=0.15)
    assert relative["platinum"] == pytest.approx(TIER_ACTIVITY["platinum"], rel=0.25)
    assert per_user["bronze"] < per_user["silver"] < per_user["gold"] < per_user["platinum"]


def test_higher_tiers_buy_pricier_items_in_bigger_quantities(weekday_run: Run) -> None:
    tier_of = {u.user_id: u.tier for u in weekday_run.sim.users}
    by_tier: dict[str, list[Transaction]] = defaultdict(list)
    for _, tx in weekday_run.purchases:
        by_tier[tier_of[tx.user_id]].append(tx)

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    totals = [mean([float(tx.total) for tx in by_tier[t]]) for t in TIERS]
    unit_prices = [mean([float(tx.unit_price) for tx in by_tier[t]]) for t in TIERS]
    quantities = [mean([tx.quantity for tx in by_tier[t]]) for t in TIERS]
    assert totals == sorted(totals) and totals[-1] > 3 * totals[0]
    assert unit_prices == sorted(unit_prices)
    assert quantities == sorted(quantities)


# --- purchases and transactions -----------------------------------------------------------------------------------
def test_purchase_events_carry_their_transaction_and_totals_add_up(weekday_run: Run) -> None:
    assert len(weekday_run.purchases) == weekday_run.types["purchase"]
    cent = Decimal("0.01")
    for event, tx in weekday_run.purchases:
        expected = (tx.quantity * tx.unit_price - tx.discount + tx.tax).quantize(cent, rounding=ROUND_HALF_UP)
        assert tx.total == expected
        for amount in (tx.unit_price, tx.discount, tx.tax, tx.total):
            assert isinstance(amount, Decimal) and amount.as_tuple().exponent == -2
        assert tx.discount >= 0 and tx.tax >= 0 and tx.total > 0 and tx.quantity >= 1
        assert tx.status == "created" and tx.created_at == tx.updated_at == event.event_time
        assert event.transaction_id == tx.transaction_id
        assert (event.user_id, event.product_id) == (tx.user_id, tx.product_id)
        assert event.quantity == tx.quantity
        assert event.price == float(tx.unit_price) and event.amount == float(tx.total)
    assert len({tx.transaction_id for _, tx in weekday_run.purchases}) == len(weekday_run.purchases)


def test_status_changes_follow_valid_transitions_and_all_finish(weekday_run: Run) -> None:
    sim = weekday_run.sim
    created = {tx.transaction_id: tx.created_at for _, tx in weekday_run.purchases}
    changes = weekday_run.changes + sim.due_status_changes(weekday_run.end + timedelta(hours=1))
    assert sim.pending_transactions == 0
    status = dict.fromkeys(created, "created")
    last_change = dict(created)
    for change in changes:
        assert (change.old_status, change.new_status) in VALID_STATUS_TRANSITIONS
        assert status[change.transaction_id] == change.old_status  # chains are contiguous and in order
        assert change.changed_at > last_change[change.transaction_id]
        status[change.transaction_id] = change.new_status
        last_change[change.transaction_id] = change.changed_at
    final = Counter(status.values())
    assert set(final) == {"delivered", "cancelled"}
    assert 0.05 < final["cancelled"] / len(status) < 0.20
    # Bounded lifecycle: every transaction finishes within three maximum delays of its creation.
    assert max(last_change[t] - created[t] for t in created) <= timedelta(seconds=30)


def test_most_transactions_change_soon_in_a_short_demo() -> None:
    sim = Simulation(seed=5, n_users=200, n_products=100, start_time=MONDAY)
    now = MONDAY
    first_change: dict[str, datetime] = {}
    created: dict[str, datetime] = {}
    for _ in range(20_000):  # 20 s of simulated time at 1k events/s
        event = sim.next_event(now)
        if event.transaction:
            created[event.transaction.transaction_id] = now
        for change in sim.due_status_changes(now):
            first_change.setdefault(change.transaction_id, change.changed_at)
        now += timedelta(milliseconds=1)
    older_than_10s = [t for t, at in created.items() if now - at > timedelta(seconds=10)]
    assert older_than_10s and all(t in first_change for t in older_than_10s)
    assert len(first_change) / len(created) > 0.5


def test_due_status_changes_can_return_a_whole_chain_after_a_pause() -> None:
    sim = Simulation(seed=11, n_users=50, n_products=20)
    now = sim.start_time
    while sim.transactions_created < 20:
        sim.next_event(now)
        now += timedelta(milliseconds=10)
    changes = sim.due_status_changes(now + timedelta(minutes=5))
    assert changes == sorted(changes, key=lambda c: c.changed_at)
    per_tx = Counter(c.transaction_id for c in changes)
    assert max(per_tx.values()) == 3 and len(per_tx) == 20


# --- sessions --------------------------------------------------------------------------------------------------------
def test_sessions_span_events_with_stable_attributes_and_end_at_logout() -> None:
    sim = Simulation(seed=21, n_users=500, n_products=100, start_time=MONDAY)
    events = [sim.next_event(MONDAY + i * STEP) for i in range(30_000)]
    sessions: dict[str, list[Event]] = defaultdict(list)
    for event in events:
        sessions[event.session_id].append(event)
    assert len(sessions) < len(events) / 4
    for session_events in sessions.values():
        first = session_events[0]
        for event in session_events:
            assert (event.user_id, event.device_type, event.ip_address, event.referrer) == (
                first.user_id,
                first.device_type,
                first.ip_address,
                first.referrer,
            )
        logouts = [i for i, e in enumerate(session_events) if e.event_type == "logout"]
        assert logouts in ([], [len(session_events) - 1])
    devices = Counter(e.device_type for e in events)
    assert set(devices) == {"desktop", "mobile", "tablet"}
    for ip in {e.ip_address for e in events}:
        address = ipaddress.IPv4Address(ip)
        assert not address.is_loopback and not address.is_multicast and str(address) == ip


def test_sessions_time_out_after_30_minutes_of_inactivity() -> None:
    sim = Simulation(seed=2, n_users=1, n_products=5, concurrent_sessions=1, session_length=(1000, 1000))
    first = sim.next_event(MONDAY)
    assert sim.next_event(MONDAY + timedelta(minutes=29)).session_id == first.session_id
    assert sim.next_event(MONDAY + timedelta(minutes=60)).session_id != first.session_id


# --- records and reproducibility ------------------------------------------------------------------------------------
def test_every_record_validates_against_raw_event_schema() -> None:
    schema = load_schema(str(SCHEMA_PATH))
    field_names = {f["name"] for f in json.loads(SCHEMA_PATH.read_text())["fields"]}
    sim = Simulation(seed=99, n_users=300, n_products=100, start_time=SATURDAY)
    seen_types = set()
    for i in range(4000):  # fastavro's validate is slow (~0.3 ms per record)
        record = sim.next_event(SATURDAY + i * STEP + timedelta(microseconds=123)).to_record()
        assert set(record) == field_names
        assert record["source"] == "generator"
        assert record["event_time"].tzinfo is not None and record["event_time"].microsecond % 1000 == 0
        validate(record, schema, raise_errors=True)
        seen_types.add(record["event_type"])
    assert seen_types == set(EVENT_TYPE_WEIGHTS)


def test_record_survives_an_avro_round_trip() -> None:
    schema = load_schema(str(SCHEMA_PATH))
    sim = Simulation(seed=1, n_users=50, n_products=20)
    for i in range(500):
        record = sim.next_event(MONDAY + i * timedelta(seconds=1)).to_record()
        buffer = io.BytesIO()
        fastavro.schemaless_writer(buffer, schema, record)
        buffer.seek(0)
        assert fastavro.schemaless_reader(buffer, schema, schema) == record


def _fingerprint(seed: int, n_events: int = 3000) -> tuple[list[dict], list[dict], list[dict], list[dict]]:
    sim = Simulation(seed=seed, n_users=300, n_products=80, start_time=MONDAY)
    records, transactions, changes = [], [], []
    for i in range(n_events):
        event = sim.next_event(MONDAY + i * timedelta(milliseconds=50))
        records.append(event.to_record())
        if event.transaction:
            transactions.append(asdict(event.transaction))
        changes.extend(asdict(c) for c in sim.due_status_changes(MONDAY + i * timedelta(milliseconds=50)))
    population = [asdict(u) for u in sim.users] + [asdict(p) for p in sim.products]
    return population, records, transactions, changes


def test_same_seed_gives_identical_output_and_different_seed_does_not() -> None:
    first, second, other = _fingerprint(17), _fingerprint(17), _fingerprint(18)
    assert first == second
    assert first[0] != other[0] and first[1] != other[1]
    assert {r["event_id"] for r in first[1]}.isdisjoint(r["event_id"] for r in other[1])


def test_polling_cadence_does_not_change_the_event_sequence() -> None:
    polled = Simulation(seed=8, n_users=100, n_products=50)
    unpolled = Simulation(seed=8, n_users=100, n_products=50)
    for i in range(5000):
        now = MONDAY + i * timedelta(milliseconds=20)
        polled.due_status_changes(now)
        assert polled.next_event(now).to_record() == unpolled.next_event(now).to_record()


def test_uuid4_str_matches_the_uuid_module() -> None:
    a, b = random.Random(4), random.Random(4)
    for _ in range(1000):
        text = uuid4_str(a)
        assert text == str(uuid.UUID(int=b.getrandbits(128), version=4))
        assert uuid.UUID(text).version == 4


def test_naive_times_are_rejected() -> None:
    with pytest.raises(ValueError):
        Simulation(seed=1, n_users=1, n_products=1, start_time=datetime(2026, 1, 1))
    with pytest.raises(ValueError):
        Simulation(seed=1, n_users=1, n_products=1).next_event(datetime(2026, 1, 1))
