"""Deliberately broken events, to exercise the validator's dead-letter path.

Pure and seeded like the model. Bad events are built from the simulation's users and products but never go
through ``Simulation.next_event``, so they change no session state and create no transaction: nothing of
them reaches PostgreSQL.
"""

from __future__ import annotations

import copy
import json
import random
from bisect import bisect
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timedelta
from itertools import accumulate
from pathlib import Path
from typing import Any

from services.generator.model import Event, Product, User, random_ipv4, uuid4_str
from services.kit.paths import avro_schema_dir

BAD_KINDS = (
    "null_ids",
    "wrong_types",
    "negative_amount",
    "unknown_user",
    "duplicate",
    "future_timestamp",
    "garbage_bytes",
)
DEFAULT_KIND_WEIGHTS: dict[str, float] = {
    "null_ids": 20,
    "wrong_types": 15,
    "negative_amount": 15,
    "unknown_user": 15,
    "duplicate": 15,
    "future_timestamp": 10,
    "garbage_bytes": 10,
}
# Fields whose type the rogue writer schema changes to string.
ROGUE_STRING_FIELDS = ("quantity", "price")
# A first byte that is neither the Confluent magic byte (0x00) nor a valid Avro union index for the first field,
# so a garbage payload can never decode by luck, whatever framing the service uses.
GARBAGE_FIRST_BYTE = b"\x7f"


@dataclass(slots=True, frozen=True)
class BadEvent:
    """A broken message. Encode ``record`` with ``writer_schema`` when set, else with the real schema;
    send ``payload`` as-is when ``record`` is None."""

    kind: str
    key: str | None
    record: dict[str, Any] | None
    payload: bytes | None
    writer_schema: dict[str, Any] | None


def load_raw_event_schema(path: Path | None = None) -> dict[str, Any]:
    """The raw_event.avsc contract as a JSON dict (not parsed by fastavro, so it can be copied and edited)."""
    return json.loads((path or avro_schema_dir() / "raw_event.avsc").read_text())


def rogue_writer_schema(raw_schema: dict[str, Any]) -> dict[str, Any]:
    """Same record name and namespace as the real schema, but quantity and price typed as strings.

    Records encoded with it decode only with this writer schema: the validator sees a schema it does not know.
    """
    rogue = copy.deepcopy(raw_schema)
    for avro_field in rogue["fields"]:
        if avro_field["name"] in ROGUE_STRING_FIELDS:
            avro_field["type"] = ["null", "string"]
    rogue["doc"] = "Rogue writer schema used by the generator's wrong_types bad events."
    return rogue


class BadEventGenerator:
    """Decides per emitted message whether it is bad (probability ``share``) and builds the bad event.

    Service loop::

        bad = bad_events.maybe(now)
        if bad is None:
            event = simulation.next_event(now)
            bad_events.observe(event)   # remembered for the ``duplicate`` kind
    """

    def __init__(
        self,
        seed: int,
        users: list[User],
        products: list[Product],
        *,
        share: float = 0.02,
        kind_weights: dict[str, float] | None = None,
        raw_schema: dict[str, Any] | None = None,
        history_size: int = 1000,
    ) -> None:
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"share must be within [0, 1], got {share}")
        weights = dict(DEFAULT_KIND_WEIGHTS if kind_weights is None else kind_weights)
        unknown = set(weights) - set(BAD_KINDS)
        if unknown:
            raise ValueError(f"unknown bad-event kinds {sorted(unknown)}; known: {list(BAD_KINDS)}")
        self._kinds = tuple(k for k in BAD_KINDS if weights.get(k, 0) > 0)
        if share > 0 and not self._kinds:
            raise ValueError("at least one bad-event kind needs a positive weight")
        self._kind_cum = list(accumulate(float(weights[k]) for k in self._kinds))
        if not users or not products:
            raise ValueError("users and products must not be empty")
        # A different stream from the simulation's (which uses ``seed`` itself), still fully determined by it.
        self._rng = random.Random(f"bad-events/{seed}")
        self.share = share
        self._users = users
        self._products = products
        self._known_user_ids = {u.user_id for u in users}
        self._history: deque[Event] = deque(maxlen=history_size)
        self.rogue_schema = rogue_writer_schema(raw_schema or load_raw_event_schema())

    def observe(self, event: Event) -> None:
        """Remember a good event that was sent, so that ``duplicate`` can re-send it later."""
        self._history.append(event)

    def maybe(self, now: datetime) -> BadEvent | None:
        """A bad event with probability ``share``, else None (then send a good one)."""
        if self.share <= 0 or self._rng.random() >= self.share:
            return None
        return self.make(now)

    def make(self, now: datetime, kind: str | None = None) -> BadEvent:
        """A bad event of ``kind`` (or of a kind drawn by weight). ``duplicate`` falls back to ``null_ids``
        until a good event has been observed."""
        rng = self._rng
        if kind is None:
            kind = self._kinds[bisect(self._kind_cum, rng.random() * self._kind_cum[-1])]
        elif kind not in BAD_KINDS:
            raise ValueError(f"unknown bad-event kind {kind!r}; known: {list(BAD_KINDS)}")
        if kind == "duplicate" and not self._history:
            kind = "null_ids"
        now = now.replace(microsecond=now.microsecond - now.microsecond % 1000)

        if kind == "garbage_bytes":
            payload = GARBAGE_FIRST_BYTE + rng.randbytes(rng.randint(8, 200))
            return BadEvent(kind, uuid4_str(rng), None, payload, None)
        if kind == "duplicate":
            original = self._history[int(rng.random() * len(self._history))]
            return BadEvent(kind, original.key, original.to_record(), None, None)

        record = self._base_record(now, purchase=kind in ("negative_amount", "wrong_types"))
        writer_schema = None
        if kind == "null_ids":
            which = rng.choice(("event_id", "user_id", "both"))
            if which in ("event_id", "both"):
                record["event_id"] = None
            if which in ("user_id", "both"):
                record["user_id"] = None
        elif kind == "wrong_types":
            record["quantity"] = str(record["quantity"])
            record["price"] = f"{record['price']:.2f}"
            writer_schema = self.rogue_schema
        elif kind == "negative_amount":
            record["amount"] = -abs(record["amount"])
        elif kind == "unknown_user":
            user_id = uuid4_str(rng)
            while user_id in self._known_user_ids:  # astronomically unlikely, but cheap to rule out
                user_id = uuid4_str(rng)
            record["user_id"] = user_id
        elif kind == "future_timestamp":
            record["event_time"] = now + timedelta(days=rng.uniform(2, 30))
        return BadEvent(kind, record["user_id"], record, None, writer_schema)

    def _base_record(self, now: datetime, *, purchase: bool) -> dict[str, Any]:
        """An otherwise plausible product_view/add_to_cart/purchase record by a real user."""
        rng = self._rng
        user = self._users[int(rng.random() * len(self._users))]
        product = self._products[int(rng.random() * len(self._products))]
        event_type = "purchase" if purchase else rng.choice(("product_view", "add_to_cart", "purchase"))
        price = float(product.price)
        quantity = rng.randint(1, 3)
        is_purchase = event_type == "purchase"
        event = Event(
            event_id=uuid4_str(rng),
            event_type=event_type,
            event_time=now,
            user_id=user.user_id,
            session_id=uuid4_str(rng),
            product_id=product.product_id,
            # A purchase that created no OLTP row: its transaction id exists nowhere.
            transaction_id=uuid4_str(rng) if is_purchase else None,
            quantity=quantity if event_type != "product_view" else None,
            price=price,
            amount=round(price * quantity, 2) if is_purchase else None,
            page_url=f"/products/{product.product_id}",
            device_type=rng.choice(("desktop", "mobile", "tablet")),
            ip_address=random_ipv4(rng),
            country=user.country,
        )
        return event.to_record()
