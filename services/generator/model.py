"""Synthetic e-commerce domain model for the generator: users, products, sessions, events, transactions.

Pure Python and free of I/O. Every random draw comes from one ``random.Random(seed)`` and time is always passed
in, so the same seed, sizes and timestamps give byte-for-byte identical users, products, ids and events.
Identifiers are canonical UUID strings (what Avro, Kafka keys and PostgreSQL ``uuid`` columns all accept).
"""

from __future__ import annotations

import heapq
import random
from bisect import bisect
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from itertools import accumulate
from typing import Any

CENT = Decimal("0.01")
DEFAULT_START_TIME = datetime(2026, 1, 1, tzinfo=UTC)  # used when no start time is injected: keeps runs reproducible

# --- tiers -------------------------------------------------------------------------------------------------------
TIERS = ("bronze", "silver", "gold", "platinum")
TIER_SHARES = {"bronze": 0.60, "silver": 0.25, "gold": 0.12, "platinum": 0.03}
TIER_ACTIVITY = {"bronze": 1.0, "silver": 1.3, "gold": 1.6, "platinum": 1.9}
# Product choice weight is price**exponent: bronze leans to cheap items, platinum to expensive ones.
TIER_PRICE_EXPONENT = {"bronze": -0.6, "silver": -0.25, "gold": 0.1, "platinum": 0.45}
QUANTITIES = (1, 2, 3, 4, 5)
TIER_QUANTITY_WEIGHTS = {
    "bronze": (75, 18, 5, 1.5, 0.5),
    "silver": (60, 25, 10, 4, 1),
    "gold": (45, 30, 15, 7, 3),
    "platinum": (30, 30, 20, 12, 8),
}
# (probability of any discount, min fraction, max fraction) of the subtotal.
TIER_DISCOUNT = {
    "bronze": (0.10, 0.05, 0.10),
    "silver": (0.20, 0.05, 0.10),
    "gold": (0.30, 0.05, 0.15),
    "platinum": (0.40, 0.10, 0.20),
}

# --- event types -------------------------------------------------------------------------------------------------
EVENT_TYPE_WEIGHTS = {
    "page_view": 35,
    "product_view": 25,
    "search": 15,
    "add_to_cart": 10,
    "purchase": 5,
    "remove_from_cart": 4,
    "checkout_start": 3,
    "login": 2,
    "logout": 1,
}
EVENT_TYPES = tuple(EVENT_TYPE_WEIGHTS)
WEEKEND_PURCHASE_FACTOR = 1.3

# --- transactions --------------------------------------------------------------------------------------------------
TRANSACTION_STATUSES = ("created", "paid", "shipped", "delivered", "cancelled")
VALID_STATUS_TRANSITIONS = frozenset(
    {
        ("created", "paid"),
        ("created", "cancelled"),
        ("paid", "shipped"),
        ("paid", "cancelled"),
        ("shipped", "delivered"),
    }
)
CANCEL_WHEN_CREATED = 0.08
CANCEL_WHEN_PAID = 0.04
PAYMENT_METHODS = {
    "credit_card": 55,
    "paypal": 18,
    "debit_card": 15,
    "apple_pay": 7,
    "gift_card": 3,
    "bank_transfer": 2,
}

# --- geography: (weight, VAT/sales-tax rate, cities) -----------------------------------------------------------
COUNTRIES: dict[str, tuple[float, str, tuple[str, ...]]] = {
    "US": (30, "0.08", ("New York", "Los Angeles", "Chicago", "Houston", "Seattle", "Austin")),
    "GB": (9, "0.20", ("London", "Manchester", "Birmingham", "Edinburgh")),
    "DE": (9, "0.19", ("Berlin", "Munich", "Hamburg", "Cologne")),
    "FR": (7, "0.20", ("Paris", "Lyon", "Marseille", "Toulouse")),
    "IN": (7, "0.18", ("Mumbai", "Delhi", "Bengaluru", "Chennai")),
    "CA": (6, "0.13", ("Toronto", "Vancouver", "Montreal")),
    "BR": (5, "0.17", ("Sao Paulo", "Rio de Janeiro", "Belo Horizonte")),
    "AU": (4, "0.10", ("Sydney", "Melbourne", "Brisbane")),
    "NL": (4, "0.21", ("Amsterdam", "Rotterdam", "Utrecht")),
    "ES": (4, "0.21", ("Madrid", "Barcelona", "Valencia")),
    "IT": (4, "0.22", ("Rome", "Milan", "Naples")),
    "JP": (4, "0.10", ("Tokyo", "Osaka", "Yokohama")),
    "MX": (3, "0.16", ("Mexico City", "Guadalajara", "Monterrey")),
    "SE": (2, "0.25", ("Stockholm", "Gothenburg")),
    "PL": (2, "0.23", ("Warsaw", "Krakow")),
}
TAX_RATES = {code: Decimal(rate) for code, (_, rate, _) in COUNTRIES.items()}

FIRST_NAMES = (
    "James", "Mary", "Robert", "Patricia", "John", "Jennifer", "Michael", "Linda", "David", "Elizabeth",
    "William", "Barbara", "Richard", "Susan", "Joseph", "Jessica", "Thomas", "Sarah", "Carlos", "Maria",
    "Hiroshi", "Yuki", "Arjun", "Priya", "Lukas", "Anna", "Pierre", "Camille", "Lars", "Sofia",
    "Mateo", "Lucia", "Oliver", "Emma", "Noah", "Olivia", "Liam", "Ava", "Wei", "Mei",
)  # fmt: skip
LAST_NAMES = (
    "Smith", "Johnson", "Williams", "Brown", "Jones", "Garcia", "Miller", "Davis", "Rodriguez", "Martinez",
    "Hernandez", "Lopez", "Wilson", "Anderson", "Taylor", "Thomas", "Moore", "Martin", "Lee", "Clark",
    "Muller", "Schmidt", "Dubois", "Rossi", "Sato", "Tanaka", "Patel", "Sharma", "Silva", "Santos",
    "Jansen", "Novak", "Kowalski", "Andersson", "Nielsen", "Kim", "Nguyen", "Chen", "Wang", "Murphy",
)  # fmt: skip
EMAIL_DOMAINS = ("gmail.com", "yahoo.com", "outlook.com", "icloud.com", "proton.me", "example.com")
STREETS = ("Main St", "Oak Ave", "Park Rd", "High St", "Maple Dr", "Station Rd", "Church Ln", "Elm St", "Lake Blvd")

# category -> (min price, max price, subcategories, search terms)
CATEGORIES: dict[str, tuple[float, float, tuple[str, ...], tuple[str, ...]]] = {
    "electronics": (
        20.0, 2000.0,
        ("smartphones", "laptops", "headphones", "cameras", "accessories"),
        ("wireless headphones", "gaming laptop", "usb-c charger", "4k camera", "smartphone case"),
    ),
    "clothing": (
        8.0, 250.0,
        ("tops", "jeans", "jackets", "shoes", "dresses"),
        ("running shoes", "winter jacket", "slim jeans", "summer dress", "linen shirt"),
    ),
    "home_garden": (
        10.0, 800.0,
        ("kitchen", "furniture", "lighting", "garden", "bedding"),
        ("coffee maker", "desk lamp", "garden hose", "office chair", "duvet cover"),
    ),
    "books": (5.0, 60.0, ("fiction", "non_fiction", "children", "comics"), ("fantasy novel", "cookbook", "biography")),
    "sports": (
        10.0, 600.0,
        ("fitness", "cycling", "outdoor", "team_sports"),
        ("yoga mat", "road bike helmet", "tent", "dumbbells", "football"),
    ),
    "beauty": (5.0, 150.0, ("skincare", "makeup", "fragrance", "haircare"), ("face serum", "perfume", "shampoo")),
    "toys": (5.0, 200.0, ("board_games", "puzzles", "dolls", "building"), ("board game", "lego set", "puzzle 1000")),
    "grocery": (2.0, 50.0, ("coffee", "snacks", "beverages", "pantry"), ("espresso beans", "green tea", "olive oil")),
}  # fmt: skip
CATEGORY_WEIGHTS = {
    "electronics": 18, "clothing": 22, "home_garden": 15, "books": 10,
    "sports": 10, "beauty": 10, "toys": 7, "grocery": 8,
}  # fmt: skip
BRANDS = {
    "electronics": ("Voltix", "Nordwave", "Kairo", "Lumetra", "Axion"),
    "clothing": ("Threadline", "Urbano", "Calder & Co", "Mistral", "Northpeak"),
    "home_garden": ("Hearthly", "Verdana", "Casa Nova", "Oakmere"),
    "books": ("Inkwell Press", "Meridian Books", "Lantern House"),
    "sports": ("Stridewell", "Apexa", "Trailforge", "Kinetic"),
    "beauty": ("Lumiere", "Botanica", "Aurelle"),
    "toys": ("Playforge", "Tinkerly", "Brickwise"),
    "grocery": ("Harvest Lane", "Blue Mill", "Sunward"),
}
NAME_ADJECTIVES = ("Pro", "Classic", "Ultra", "Essential", "Premium", "Compact", "Eco", "Signature", "Lite", "Max")

DEVICE_TYPES = {"desktop": 45, "mobile": 45, "tablet": 10}
REFERRERS: dict[str | None, float] = {
    None: 35,  # direct traffic has no referrer
    "https://www.google.com/": 35,
    "https://www.bing.com/": 5,
    "https://www.facebook.com/": 8,
    "https://www.instagram.com/": 6,
    "https://t.co/": 3,
    "https://newsletter.example.com/": 8,
}
STATIC_PAGES = ("/", "/deals", "/new-arrivals", "/account", "/cart", "/help", "/wishlist")
SESSION_TIMEOUT = timedelta(minutes=30)


# --- output types ------------------------------------------------------------------------------------------------
@dataclass(slots=True)
class User:
    user_id: str
    email: str
    first_name: str
    last_name: str
    tier: str
    country: str
    city: str
    registration_date: date
    created_at: datetime
    updated_at: datetime
    shipping_address: str  # not a users column; copied onto the user's transactions


@dataclass(slots=True)
class Product:
    product_id: str
    name: str
    category: str
    subcategory: str
    brand: str
    price: Decimal
    cost: Decimal
    created_at: datetime
    updated_at: datetime


@dataclass(slots=True)
class Transaction:
    transaction_id: str
    user_id: str
    product_id: str
    quantity: int
    unit_price: Decimal
    discount: Decimal
    tax: Decimal
    total: Decimal
    payment_method: str
    shipping_address: str
    status: str
    created_at: datetime
    updated_at: datetime


@dataclass(slots=True, frozen=True)
class StatusChange:
    transaction_id: str
    old_status: str
    new_status: str
    changed_at: datetime


@dataclass(slots=True)
class Event:
    event_id: str | None
    event_type: str
    event_time: datetime
    user_id: str | None
    session_id: str | None
    product_id: str | None = None
    transaction_id: str | None = None
    quantity: int | None = None
    price: float | None = None
    amount: float | None = None
    search_query: str | None = None
    page_url: str | None = None
    referrer: str | None = None
    device_type: str | None = None
    ip_address: str | None = None
    country: str | None = None
    properties: dict[str, str] = field(default_factory=dict)
    # The OLTP row a purchase created; not part of the Avro record.
    transaction: Transaction | None = None

    @property
    def key(self) -> str | None:
        """Kafka key: the user, so that one user's events stay ordered within a partition."""
        return self.user_id

    def to_record(self) -> dict[str, Any]:
        """The event as a dict with exactly the fields of schemas/avro/raw_event.avsc."""
        return {
            "event_id": self.event_id,
            "event_type": self.event_type,
            "event_time": self.event_time,
            "user_id": self.user_id,
            "session_id": self.session_id,
            "product_id": self.product_id,
            "transaction_id": self.transaction_id,
            "quantity": self.quantity,
            "price": self.price,
            "amount": self.amount,
            "search_query": self.search_query,
            "page_url": self.page_url,
            "referrer": self.referrer,
            "device_type": self.device_type,
            "ip_address": self.ip_address,
            "country": self.country,
            "source": "generator",
            "properties": dict(self.properties),
        }


@dataclass(slots=True)
class _Session:
    session_id: str
    user_index: int
    device_type: str
    ip_address: str
    referrer: str | None
    events_left: int
    last_seen: datetime
    cart: list[int] = field(default_factory=list)  # product indices


# --- helpers -----------------------------------------------------------------------------------------------------
_UUID_VERSION_CLEAR = ~((0xF000 << 64) | (0xC000 << 48))
_UUID_VERSION4_BITS = (0x4000 << 64) | (0x8000 << 48)


def uuid4_str(rng: random.Random) -> str:
    """A version-4 UUID string from ``rng``; same text as ``str(uuid.UUID(int=bits, version=4))``, faster."""
    h = f"{(rng.getrandbits(128) & _UUID_VERSION_CLEAR) | _UUID_VERSION4_BITS:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _cumulative(weights: Any) -> list[float]:
    return list(accumulate(float(w) for w in weights))


def _pick(rng: random.Random, values: tuple[Any, ...] | list[Any], cum: list[float]) -> Any:
    return values[bisect(cum, rng.random() * cum[-1])]


def _cents(value: Decimal) -> Decimal:
    return value.quantize(CENT, rounding=ROUND_HALF_UP)


def random_ipv4(rng: random.Random) -> str:
    """A public-looking IPv4 address (no 0/8, 10/8, 127/8 or multicast/reserved first octets)."""
    first = rng.randint(1, 223)
    while first in (10, 127):
        first = rng.randint(1, 223)
    rest = rng.getrandbits(24)
    return f"{first}.{rest >> 16}.{(rest >> 8) & 0xFF}.{rest & 0xFF}"


def _status_path(rng: random.Random) -> tuple[str, ...]:
    if rng.random() < CANCEL_WHEN_CREATED:
        return ("cancelled",)
    if rng.random() < CANCEL_WHEN_PAID:
        return ("paid", "cancelled")
    return ("paid", "shipped", "delivered")


# --- simulation ----------------------------------------------------------------------------------------------------
class Simulation:
    """A reproducible shop: a fixed population of users and products plus a stream of behaviour events.

    ``next_event(now)`` emits one event at ``now`` (purchases carry the created ``Transaction`` in
    ``event.transaction``); ``due_status_changes(now)`` returns the transaction status changes due by ``now``.
    The lifecycle of a transaction (path and delays) is drawn when it is created, so how often
    ``due_status_changes`` is polled never changes the event sequence.
    """

    def __init__(
        self,
        seed: int,
        n_users: int = 1000,
        n_products: int = 500,
        start_time: datetime | None = None,
        *,
        concurrent_sessions: int | None = None,
        session_length: tuple[int, int] = (5, 40),
        status_delay_s: tuple[float, float] = (1.0, 10.0),
    ) -> None:
        if n_users < 1 or n_products < 1:
            raise ValueError("n_users and n_products must be at least 1")
        start = start_time or DEFAULT_START_TIME
        if start.tzinfo is None:
            raise ValueError("start_time must be timezone-aware")
        self.seed = seed
        self.start_time = start.astimezone(UTC)
        self._rng = random.Random(seed)
        self._session_length = session_length
        self._status_delay_s = status_delay_s
        self._n_sessions = concurrent_sessions or max(1, min(n_users, max(16, n_users // 10)))

        self._tier_cum = _cumulative(TIER_SHARES[t] for t in TIERS)
        country_codes = tuple(COUNTRIES)
        self._country_codes = country_codes
        self._country_cum = _cumulative(COUNTRIES[c][0] for c in country_codes)
        self._categories = tuple(CATEGORIES)
        self._category_cum = _cumulative(CATEGORY_WEIGHTS[c] for c in self._categories)
        self._payment_methods = tuple(PAYMENT_METHODS)
        self._payment_cum = _cumulative(PAYMENT_METHODS.values())
        self._devices = tuple(DEVICE_TYPES)
        self._device_cum = _cumulative(DEVICE_TYPES.values())
        self._referrers = tuple(REFERRERS)
        self._referrer_cum = _cumulative(REFERRERS.values())
        self._quantity_cum = {t: _cumulative(TIER_QUANTITY_WEIGHTS[t]) for t in TIERS}
        weekday = dict(EVENT_TYPE_WEIGHTS)
        weekend = dict(weekday, purchase=weekday["purchase"] * WEEKEND_PURCHASE_FACTOR)
        # Two tables picked by the event's weekday; sampling from cumulative weights renormalises implicitly.
        self._type_cum_weekday = _cumulative(weekday[t] for t in EVENT_TYPES)
        self._type_cum_weekend = _cumulative(weekend[t] for t in EVENT_TYPES)
        self._search_terms = tuple(term for c in self._categories for term in CATEGORIES[c][3])

        self.users: list[User] = [self._make_user() for _ in range(n_users)]
        self.products: list[Product] = [self._make_product() for _ in range(n_products)]
        self.user_by_id: dict[str, User] = {u.user_id: u for u in self.users}
        self.product_by_id: dict[str, Product] = {p.product_id: p for p in self.products}
        self._product_prices = [float(p.price) for p in self.products]
        # Higher tiers act more often: a session goes to a user with probability proportional to activity.
        self._actor_cum = _cumulative(TIER_ACTIVITY[u.tier] for u in self.users)
        self._product_cum_by_tier = {
            t: _cumulative(price ** TIER_PRICE_EXPONENT[t] for price in self._product_prices) for t in TIERS
        }
        self._sessions: list[_Session | None] = [None] * self._n_sessions
        # (due, tie-breaker, transaction_id, old status, new status, later steps as (delay_s, status))
        self._status_heap: list[tuple[datetime, int, str, str, str, tuple[tuple[float, str], ...]]] = []
        self._heap_seq = 0
        self.events_emitted = 0
        self.transactions_created = 0

    # -- population ---------------------------------------------------------------------------------------------------
    def _make_user(self) -> User:
        rng = self._rng
        user_id = uuid4_str(rng)
        tier = _pick(rng, TIERS, self._tier_cum)
        first = rng.choice(FIRST_NAMES)
        last = rng.choice(LAST_NAMES)
        country = _pick(rng, self._country_codes, self._country_cum)
        city = rng.choice(COUNTRIES[country][2])
        # Registered between one day and three years before the simulation starts; profile touched since.
        registered = self.start_time - timedelta(seconds=rng.uniform(86_400, 3 * 365 * 86_400))
        registered = registered.replace(microsecond=0)
        updated = registered + (self.start_time - registered) * rng.random()
        updated = updated.replace(microsecond=0)
        email = f"{first}.{last}.{user_id[:6]}@{rng.choice(EMAIL_DOMAINS)}".lower()
        address = f"{rng.randint(1, 999)} {rng.choice(STREETS)}, {city}, {country}"
        return User(
            user_id=user_id,
            email=email,
            first_name=first,
            last_name=last,
            tier=tier,
            country=country,
            city=city,
            registration_date=registered.date(),
            created_at=registered,
            updated_at=updated,
            shipping_address=address,
        )

    def _make_product(self) -> Product:
        rng = self._rng
        product_id = uuid4_str(rng)
        category = _pick(rng, self._categories, self._category_cum)
        low, high, subcategories, _ = CATEGORIES[category]
        subcategory = rng.choice(subcategories)
        brand = rng.choice(BRANDS[category])
        # Log-uniform prices: many cheap items, a long tail of expensive ones, as in real catalogues.
        raw = low * (high / low) ** rng.random()
        price = Decimal(int(raw)) + Decimal("0.99") if raw >= 10 else _cents(Decimal(raw))
        cost = _cents(price * Decimal(str(round(rng.uniform(0.40, 0.80), 3))))
        cost = min(max(cost, CENT), price - CENT)
        noun = subcategory.replace("_", " ").title()
        name = f"{brand} {rng.choice(NAME_ADJECTIVES)} {noun} {rng.randint(1, 99)}"
        created = (self.start_time - timedelta(seconds=rng.uniform(86_400, 2 * 365 * 86_400))).replace(microsecond=0)
        updated = (created + (self.start_time - created) * rng.random()).replace(microsecond=0)
        return Product(product_id, name, category, subcategory, brand, price, cost, created, updated)

    # -- sessions -----------------------------------------------------------------------------------------------------
    def _new_session(self, now: datetime) -> _Session:
        rng = self._rng
        user_index = bisect(self._actor_cum, rng.random() * self._actor_cum[-1])
        return _Session(
            session_id=uuid4_str(rng),
            user_index=user_index,
            device_type=_pick(rng, self._devices, self._device_cum),
            ip_address=random_ipv4(rng),
            referrer=_pick(rng, self._referrers, self._referrer_cum),
            events_left=rng.randint(*self._session_length),
            last_seen=now,
        )

    def _pick_product(self, tier: str) -> int:
        cum = self._product_cum_by_tier[tier]
        return bisect(cum, self._rng.random() * cum[-1])

    # -- events -------------------------------------------------------------------------------------------------------
    def next_event(self, now: datetime) -> Event:
        """One event at ``now`` (timezone-aware; truncated to milliseconds, the Avro precision)."""
        if now.tzinfo is not UTC:
            if now.tzinfo is None:
                raise ValueError("now must be timezone-aware")
            now = now.astimezone(UTC)  # the weekend effect and event_time are defined in UTC
        rng = self._rng
        if now.microsecond % 1000:
            now = now.replace(microsecond=now.microsecond - now.microsecond % 1000)

        slot = int(rng.random() * self._n_sessions)
        session = self._sessions[slot]
        if session is None or session.events_left <= 0 or now - session.last_seen > SESSION_TIMEOUT:
            session = self._sessions[slot] = self._new_session(now)
        session.events_left -= 1
        session.last_seen = now

        cum = self._type_cum_weekend if now.weekday() >= 5 else self._type_cum_weekday
        event_type = EVENT_TYPES[bisect(cum, rng.random() * cum[-1])]
        user = self.users[session.user_index]
        tier = user.tier
        event = Event(
            event_id=uuid4_str(rng),
            event_type=event_type,
            event_time=now,
            user_id=user.user_id,
            session_id=session.session_id,
            referrer=session.referrer,
            device_type=session.device_type,
            ip_address=session.ip_address,
            country=user.country,
        )

        if event_type == "page_view":
            page = rng.choice(STATIC_PAGES) if rng.random() < 0.6 else f"/category/{rng.choice(self._categories)}"
            event.page_url = page
        elif event_type == "product_view":
            index = self._pick_product(tier)
            event.product_id = self.products[index].product_id
            event.price = self._product_prices[index]
            event.page_url = f"/products/{event.product_id}"
        elif event_type == "search":
            query = rng.choice(self._search_terms)
            event.search_query = query
            event.page_url = f"/search?q={query.replace(' ', '+')}"
        elif event_type == "add_to_cart":
            index = self._pick_product(tier)
            session.cart.append(index)
            event.product_id = self.products[index].product_id
            event.price = self._product_prices[index]
            event.quantity = 1
            event.page_url = "/cart"
        elif event_type == "remove_from_cart":
            index = (
                session.cart.pop(int(rng.random() * len(session.cart))) if session.cart else self._pick_product(tier)
            )
            event.product_id = self.products[index].product_id
            event.price = self._product_prices[index]
            event.quantity = 1
            event.page_url = "/cart"
        elif event_type == "checkout_start":
            event.amount = round(sum(self._product_prices[i] for i in session.cart), 2) if session.cart else None
            event.page_url = "/checkout"
        elif event_type == "purchase":
            self._purchase(event, session, user, now)
        elif event_type == "login":
            event.page_url = "/login"
        else:  # logout ends the session; the others end by running out of events or by timeout
            event.page_url = "/logout"
            session.events_left = 0

        self.events_emitted += 1
        return event

    def _purchase(self, event: Event, session: _Session, user: User, now: datetime) -> None:
        rng = self._rng
        tier = user.tier
        index = session.cart.pop() if session.cart else self._pick_product(tier)
        product = self.products[index]
        quantity = QUANTITIES[bisect(self._quantity_cum[tier], rng.random() * self._quantity_cum[tier][-1])]
        subtotal = product.price * quantity
        chance, low, high = TIER_DISCOUNT[tier]
        discount = (
            _cents(subtotal * Decimal(str(round(rng.uniform(low, high), 3))))
            if rng.random() < chance
            else Decimal("0.00")
        )
        tax = _cents((subtotal - discount) * TAX_RATES[user.country])
        total = _cents(subtotal - discount + tax)
        transaction = Transaction(
            transaction_id=uuid4_str(rng),
            user_id=user.user_id,
            product_id=product.product_id,
            quantity=quantity,
            unit_price=product.price,
            discount=discount,
            tax=tax,
            total=total,
            payment_method=_pick(rng, self._payment_methods, self._payment_cum),
            shipping_address=user.shipping_address,
            status="created",
            created_at=now,
            updated_at=now,
        )
        event.product_id = product.product_id
        event.transaction_id = transaction.transaction_id
        event.quantity = quantity
        event.price = self._product_prices[index]
        event.amount = float(total)
        event.page_url = "/checkout/confirmation"
        event.properties = {"payment_method": transaction.payment_method}
        event.transaction = transaction
        self.transactions_created += 1
        self._schedule(transaction, rng)

    # -- transaction lifecycle ----------------------------------------------------------------------------------------
    def _schedule(self, transaction: Transaction, rng: random.Random) -> None:
        low, high = self._status_delay_s
        steps = tuple((round(rng.uniform(low, high), 3), status) for status in _status_path(rng))
        self._push_step(transaction.transaction_id, transaction.created_at, "created", steps)

    def _push_step(
        self, transaction_id: str, since: datetime, old_status: str, steps: tuple[tuple[float, str], ...]
    ) -> None:
        (delay, new_status), rest = steps[0], steps[1:]
        self._heap_seq += 1
        due = since + timedelta(seconds=delay)
        heapq.heappush(self._status_heap, (due, self._heap_seq, transaction_id, old_status, new_status, rest))

    def due_status_changes(self, now: datetime) -> list[StatusChange]:
        """Status changes due at or before ``now``, oldest first; ``changed_at`` is the due time, not ``now``.

        A call after a long pause can return several changes of one transaction, in order.
        """
        heap = self._status_heap
        changes: list[StatusChange] = []
        while heap and heap[0][0] <= now:
            due, _, transaction_id, old_status, new_status, rest = heapq.heappop(heap)
            changes.append(StatusChange(transaction_id, old_status, new_status, due))
            if rest:
                self._push_step(transaction_id, due, new_status, rest)
        return changes

    @property
    def pending_transactions(self) -> int:
        """Transactions whose lifecycle has not finished yet."""
        return len(self._status_heap)
