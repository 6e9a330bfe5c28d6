"""Every secret setting of every service is a `SecretStr`: never in a repr, a dump or a configuration error,
and in clear only where a client needs it."""

from __future__ import annotations

import importlib

import pytest
from pydantic import SecretStr
from pydantic_settings import BaseSettings

from services.kit.config import SECRET_WORDS, ConfigError, settings_from
from services.kit.kafka import client_config
from services.stores.clickhouse import ClickHouseSettings, make_client
from services.stores.iceberg import CatalogSettings, catalog_properties

SECRET = "s3cr3t-do-not-print"
# Where the services' settings classes live (the local stack's own settings, LP_*, hold the emulators' fixed
# credentials and are not a service's).
SETTINGS_MODULES = (
    "services.kit.config",
    "services.kit.sink",
    "services.stores.iceberg",
    "services.stores.clickhouse",
    "services.stores.snowflake",
    "services.archiver.settings",
    "services.clickhouse_sink.settings",
    "services.snowflake_loader.settings",
    "services.reconcile.settings",
    "services.generator.app",
    "services.cdc.settings",
    "services.ingest.app",
    "services.validator.runtime",
    "services.validator.processor",
)


def settings_classes() -> list[type[BaseSettings]]:
    for module in SETTINGS_MODULES:
        importlib.import_module(module)
    found, todo = [], list(BaseSettings.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls.__module__.startswith("services.") and not cls.__module__.startswith("services.stack"):
            found.append(cls)
    return found


def test_every_secret_setting_is_a_secret_str() -> None:
    classes = settings_classes()
    assert {"CatalogSettings", "LoaderSettings", "CdcSettings", "ValidatorSettings"} <= {c.__name__ for c in classes}
    plain = [
        f"{cls.__module__}.{cls.__name__}.{name}"
        for cls in classes
        for name, field in cls.model_fields.items()
        if any(word in name for word in SECRET_WORDS)
        and not name.endswith("_file")  # a path to a file holding the secret, read at connect time
        and field.annotation not in (SecretStr, SecretStr | None)
    ]
    assert plain == []


def test_store_secrets_stay_hidden_until_a_client_needs_them() -> None:
    catalog = CatalogSettings(
        iceberg_catalog="rest",
        iceberg_rest_uri="http://127.0.0.1:8181",
        aws_access_key_id="key",
        aws_secret_access_key=SECRET,
    )
    clickhouse = ClickHouseSettings(clickhouse_client="native", clickhouse_password=SECRET)
    for settings in (catalog, clickhouse):
        assert SECRET not in repr(settings) and SECRET not in str(settings.model_dump(mode="json"))
    props = catalog_properties(catalog)
    assert props["credential"] == f"key:{SECRET}" and props["s3.secret-access-key"] == SECRET
    client = make_client(clickhouse)  # clickhouse-driver connects on first use, not here
    try:
        assert client.driver.connection.password == SECRET
    finally:
        client.close()


def test_kafka_sasl_password_reaches_the_client_config_only() -> None:
    from services.kit.config import ServiceSettings

    settings = ServiceSettings(
        kafka_bootstrap_servers="k:9092",
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="PLAIN",
        kafka_sasl_username="user",
        kafka_sasl_password=SECRET,
    )
    assert SECRET not in repr(settings)
    assert client_config(settings)["sasl.password"] == SECRET


@pytest.mark.parametrize(
    ("cls", "env"),
    [
        (CatalogSettings, {"ICEBERG_REST_TOKEN": SECRET, "ICEBERG_CATALOG": "nope"}),
        (ClickHouseSettings, {"CLICKHOUSE_PASSWORD": SECRET, "CLICKHOUSE_PORT": "0"}),
    ],
)
def test_a_configuration_error_never_echoes_a_secret(cls: type[BaseSettings], env: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as error:
        settings_from(cls, env)
    assert SECRET not in str(error.value)
