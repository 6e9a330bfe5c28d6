"""The shared Debezium property set: parsing, placeholders, local overlay, routing, Debezium Server rendering."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.cdc.connector import (
    FILE_OFFSET_STORE,
    LOCAL_ENGINE_NAME,
    SERVER_ONLY,
    ConnectorConfigError,
    captured_tables,
    default_properties_path,
    heartbeat_topic,
    load_properties,
    local_properties,
    normalize_tables,
    parse_properties,
    placeholders,
    render_properties,
    resolve,
    route_topic,
    server_properties,
    server_properties_path,
    table_topics,
)
from services.cdc.settings import CdcSettings

REQUIRED = {"PGHOST": "db.example", "PGUSER": "lambda", "PGDATABASE": "shop"}


def shared() -> dict[str, str]:
    return load_properties(default_properties_path())


# --- java.util.Properties --------------------------------------------------------------------------------------


def test_parse_properties_follows_java_rules() -> None:
    text = (
        "# comment\n"
        "! also a comment\n"
        "   \n"
        "a=1\n"
        "b = 2\n"
        "c:3\n"
        "d 4\n"
        "e   =   five  \n"
        "f=first \\\n"
        "    second\n"
        "g=back\\\\slash\n"
        "h\\=key\\:x=v\n"
        "i=\\u0041\\tB\n"
        "j\n"
        "k==x\n"
        "l = :y\n"
    )
    assert parse_properties(text) == {
        "a": "1",
        "b": "2",
        "c": "3",
        "d": "4",
        "e": "five  ",
        "f": "first second",
        "g": "back\\slash",
        "h=key:x": "v",
        "i": "A\tB",
        "j": "",
        "k": "=x",
        "l": ":y",
    }


def test_render_round_trips() -> None:
    original = {"a b": "x=y", "c:d": " leading", "e": "tab\there\\", "f#": "!", "g": "${X:1}.$1"}
    assert parse_properties(render_properties(original)) == original


# --- placeholders and the local overlay ------------------------------------------------------------------------


def test_resolve_required_defaults_and_empty_values() -> None:
    props = {"a": "${X}", "b": "${Y:dflt}", "c": "pre-${X}-${Y:}-post", "d": "$1 and ${Z:}"}
    assert resolve(props, {"X": "x", "Y": ""}) == {"a": "x", "b": "dflt", "c": "pre-x--post", "d": "$1 and "}
    with pytest.raises(ConnectorConfigError, match=r"a needs \$\{X\}.*c needs \$\{X\}"):
        resolve(props, {})


def test_the_shared_set_needs_only_connection_variables() -> None:
    required = {name for name, default in placeholders(shared()).items() if default is None}
    assert required == {"PGHOST", "PGUSER", "PGDATABASE"}  # all else has a default
    resolved = resolve(shared(), REQUIRED)
    assert resolved["database.hostname"] == "db.example"
    assert resolved["database.port"] == "5432"
    assert resolved["slot.name"] == "lp_cdc"
    assert "database.password" in resolved and resolved["database.password"] == ""


def test_shared_set_captures_what_the_design_says() -> None:
    props = resolve(shared(), REQUIRED)
    assert props["connector.class"] == "io.debezium.connector.postgresql.PostgresConnector"
    assert props["plugin.name"] == "pgoutput"
    assert props["snapshot.mode"] == "initial"
    assert props["decimal.handling.mode"] == "string"
    assert props["converter.schemas.enable"] == "false"
    assert props["tombstones.on.delete"] == "true"
    assert props["publication.autocreate.mode"] == "disabled"  # preflight owns the publication
    assert "public.debezium_heartbeat" in props["heartbeat.action.query"]
    assert int(props["heartbeat.interval.ms"]) > 0
    assert captured_tables(props) == ["public.users", "public.products", "public.transactions"]
    # Connection values and the offset store are not in the shared set.
    assert not [k for k in shared() if k.startswith("offset.storage")]
    assert "name" not in shared()


def test_local_overlay_adds_the_file_offset_store(tmp_path: Path) -> None:
    props = local_properties(shared(), REQUIRED, tmp_path / "offsets.dat")
    assert props["offset.storage"] == FILE_OFFSET_STORE
    assert props["offset.storage.file.filename"] == str(tmp_path / "offsets.dat")
    assert props["name"] == LOCAL_ENGINE_NAME


# --- routing --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("debezium_topic", "expected"),
    [
        ("cdc.public.users", "cdc.postgres.users"),
        ("cdc.public.transactions", "cdc.postgres.transactions"),
        ("cdc.sales.orders", "cdc.postgres.orders"),
        ("__debezium-heartbeat.cdc", "cdc.heartbeat"),
        ("other.public.users", "other.public.users"),  # RegexRouter renames only full matches
        ("cdc.users", "cdc.users"),
    ],
)
def test_route_topic(debezium_topic: str, expected: str) -> None:
    assert route_topic(resolve(shared(), REQUIRED), debezium_topic) == expected


def test_topic_prefix_moves_every_topic() -> None:
    props = resolve(shared(), {**REQUIRED, "CDC_TOPIC_PREFIX": "t1.cdc"})
    assert table_topics(props) == {
        "public.users": "t1.cdc.postgres.users",
        "public.products": "t1.cdc.postgres.products",
        "public.transactions": "t1.cdc.postgres.transactions",
    }
    assert heartbeat_topic(props) == "t1.cdc.heartbeat"


def test_routing_refuses_transforms_it_cannot_mirror() -> None:
    props = {"transforms": "x", "transforms.x.type": "io.debezium.transforms.ExtractNewRecordState"}
    with pytest.raises(ConnectorConfigError, match=r"only org\.apache\.kafka\.connect\.transforms\.RegexRouter"):
        route_topic(props, "cdc.public.users")


def test_routes_match_the_declared_topics() -> None:
    from services.declarations.resources import VALUE_ENCODING_JSON, load_declarations

    root = Path(__file__).resolve().parents[3]
    declared = {t.topic_name: t for t in load_declarations(root / "deploy" / "k8s").topics}
    props = resolve(shared(), REQUIRED)
    for topic in [*table_topics(props).values(), heartbeat_topic(props)]:
        assert topic in declared, f"{topic} is routed to but not declared in deploy/k8s/topics"
        assert declared[topic].value_encoding == VALUE_ENCODING_JSON
    partitions = {t: declared[f"cdc.postgres.{t}"].partitions for t in ("users", "products", "transactions")}
    assert partitions == {"users": 8, "products": 4, "transactions": 16}
    assert declared["cdc.postgres.users"].value_schema == "cdc-users"


# --- Debezium Server -------------------------------------------------------------------------------------------


def test_server_properties_prefix_every_shared_key() -> None:
    rendered = parse_properties(server_properties(default_properties_path().read_text()))
    for key, value in shared().items():
        if key.startswith("converter."):
            rest = key.removeprefix("converter.")
            assert rendered[f"debezium.format.key.{rest}"] == value
            assert rendered[f"debezium.format.value.{rest}"] == value
        elif key.startswith("transforms"):
            assert rendered[f"debezium.{key}"] == value
        else:
            assert rendered[f"debezium.source.{key}"] == value
    for key, value in SERVER_ONLY:
        assert rendered[key] == value
    assert rendered["debezium.sink.type"] == "kafka"
    assert rendered["debezium.format.value"] == "json"
    assert rendered["debezium.source.offset.storage"].endswith("KafkaOffsetBackingStore")


def test_committed_application_properties_is_up_to_date() -> None:
    expected = server_properties(default_properties_path().read_text())
    assert server_properties_path().read_text() == expected, (
        "deploy/debezium/application.properties is stale: run python -m services.cdc server-properties"
    )


def test_server_only_keys_cannot_be_shadowed() -> None:
    text = default_properties_path().read_text() + "\noffset.storage=x\n"
    with pytest.raises(ConnectorConfigError, match="server-only keys"):
        server_properties(text)


# --- settings -> placeholder values ----------------------------------------------------------------------------


def settings(**env: str) -> CdcSettings:
    return CdcSettings(kafka_bootstrap_servers="k:9092", **env)  # type: ignore[arg-type]


def test_connection_variables_come_from_the_dsn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PGPASSWORD", raising=False)
    variables = settings(
        postgres_dsn="postgresql://lp:s3cret@db.internal:6543/oltp?sslmode=require"
    ).connector_variables()
    assert {k: variables[k] for k in ("PGHOST", "PGPORT", "PGUSER", "PGPASSWORD", "PGDATABASE", "PGSSLMODE")} == {
        "PGHOST": "db.internal",
        "PGPORT": "6543",
        "PGUSER": "lp",
        "PGPASSWORD": "s3cret",
        "PGDATABASE": "oltp",
        "PGSSLMODE": "require",
    }
    monkeypatch.setenv("PGPASSWORD", "from-env")
    variables = settings(postgres_dsn="host=127.0.0.1 port=5 user=u dbname=d").connector_variables()
    assert variables["PGPASSWORD"] == "from-env" and variables["PGPORT"] == "5"


def test_settings_feed_the_capture_placeholders() -> None:
    s = settings(
        postgres_dsn="postgresql://u@h/d",
        cdc_tables="users, sales.orders",
        cdc_slot_name="t_slot",
        cdc_topic_prefix="x",
    )
    props = local_properties(shared(), s.connector_variables(), s.offsets_file)
    assert props["table.include.list"] == "public.users,sales.orders"
    assert props["slot.name"] == "t_slot"
    assert table_topics(props)["sales.orders"] == "x.postgres.orders"
    assert s.offsets_file.name == "t_slot.offsets.dat"


def test_unix_socket_dsn_is_refused() -> None:
    with pytest.raises(ValueError, match="unix socket"):
        settings(postgres_dsn="host=/var/run/postgresql dbname=d").connector_variables()


def test_bad_slot_name_is_a_config_error() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="cdc_slot_name"):
        settings(postgres_dsn="postgresql://u@h/d", cdc_slot_name="Bad-Name")


def test_normalize_tables() -> None:
    assert normalize_tables(["users", " public.products ", "", "s.t"]) == ["public.users", "public.products", "s.t"]
