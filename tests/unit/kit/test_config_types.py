"""The validated address types of the kit's configuration: what passes, what is refused, and what the message
says (the variable, what is wrong, never a secret)."""

import pytest
from pydantic import SecretStr, ValidationError
from pydantic_settings import BaseSettings

from services.kit.config import (
    BindHost,
    BindPort,
    BrokerList,
    ConfigError,
    Dsn,
    Host,
    HttpUrl,
    OptionalBrokerList,
    Port,
    ServiceSettings,
    check_broker_list,
    check_dsn,
    check_host,
    check_http_url,
    describe_errors,
    settings_from,
)


@pytest.mark.parametrize(
    "value",
    ["127.0.0.1:9092", "kafka-bootstrap.kafka:9092", "a:1,b:2, c.d:65535", "[::1]:9092"],
)
def test_broker_lists_that_pass(value):
    assert check_broker_list(value) == ",".join(part.strip() for part in value.split(","))


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("not a url", "no port"),
        ("kafka", "no port"),
        ("kafka:0", "port '0'"),
        ("kafka:99999", "port '99999'"),
        ("kafka:x", "port 'x'"),
        ("a:1,,b:2", "expected host:port"),
        ("", "expected host:port"),
        ("bad host:9092", "not an IP address or host name"),
        ("300.1.2.3:9092", "not an IP address or host name"),
        ("a:1,b c:2", "'b c:2'"),
        ("SASL_SSL://h:9093", "not an IP address or host name"),
    ],
)
def test_broker_lists_refused(value, why):
    with pytest.raises(ValueError, match="expected host:port") as caught:
        check_broker_list(value)
    assert why in str(caught.value)


@pytest.mark.parametrize(
    "value", ["http://tempo:4318", "https://s3.eu-west-1.amazonaws.com", "http://127.0.0.1:18333/", "http://[::1]:80/x"]
)
def test_urls_that_pass(value):
    assert check_http_url(value) == value


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("not a url", "no spaces"),
        ("localhost:9000", "expected http(s)://"),
        ("ftp://host/x", "expected http(s)://"),
        ("http://", "expected http(s)://"),
        ("http://h:abc", "port"),
        ("http://h:0", "port"),
        ("http://h:70000", "port"),
        ("http://bad_-.:1/", "not an IP address or host name"),
    ],
)
def test_urls_refused(value, why):
    with pytest.raises(ValueError) as caught:
        check_http_url(value)
    assert why in str(caught.value)


@pytest.mark.parametrize("value", ["0.0.0.0", "::", "127.0.0.1", "localhost", "ingest.lp.svc.cluster.local", "[::1]"])
def test_hosts_that_pass(value):
    assert check_host(value) == value


@pytest.mark.parametrize("value", ["not a host", "", "-leading", "a..b", "x" * 64, "256.0.0.1", "h:80", "a/b"])
def test_hosts_refused(value):
    with pytest.raises(ValueError):
        check_host(value)


@pytest.mark.parametrize(
    "value",
    [
        "postgresql://u@127.0.0.1:15432/shop",
        "postgres://u:pw@pg.db:6543/oltp?sslmode=require",
        "host=pg port=5432 user=u dbname=d",
        "host=/var/run/postgresql dbname=d",
    ],
)
def test_dsns_that_pass(value):
    assert check_dsn(SecretStr(value)).get_secret_value() == value


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("not a dsn", "not a PostgreSQL connection string"),
        ("mysql://u@h/d", "postgresql://"),
        ("http://h/d", "postgresql://"),
        ("postgresql://u:pw@h:99999/d", "port"),
        ("host='bad host' dbname=d password=pw", "host"),
        ("   ", "empty"),
    ],
)
def test_dsns_refused_without_quoting_them(value, why):
    with pytest.raises(ValueError) as caught:
        check_dsn(SecretStr(value))
    assert why in str(caught.value)
    assert "pw" not in str(caught.value)


class AddressSettings(BaseSettings):
    brokers: BrokerList = "h:1"
    optional_brokers: OptionalBrokerList = ""
    endpoint: HttpUrl | None = None
    catalog_uri: Dsn | None = None  # a secret by its type, not by its name
    bind: BindHost = "0.0.0.0"
    target: Host = "localhost"
    port: Port = 1
    listen: BindPort = 0


def _message(**values) -> str:
    with pytest.raises(ConfigError) as caught:
        settings_from(AddressSettings, {key.upper(): str(value) for key, value in values.items()})
    assert caught.value.code == 2
    return str(caught.value)


def test_message_names_the_variable_and_what_is_wrong():
    message = _message(brokers="not a url", bind="not a host", endpoint="not a url", port=0, listen=70000)
    lines = message.splitlines()
    assert lines[0] == "invalid configuration for AddressSettings:"
    by_variable = {line.split(":", 1)[0].strip(): line for line in lines[1:]}
    assert set(by_variable) == {"BROKERS", "BIND", "ENDPOINT", "PORT", "LISTEN"}
    assert "no port" in by_variable["BROKERS"] and "'not a url'" in by_variable["BROKERS"]
    assert "not an IP address or host name" in by_variable["BIND"]
    assert "http(s)://" in by_variable["ENDPOINT"]
    assert "Value error" not in message


def test_secret_values_are_never_shown():
    message = _message(catalog_uri="not a dsn hunter2")
    assert "CATALOG_URI" in message and "hunter2" not in message


def test_url_credentials_are_masked():
    message = _message(endpoint="http://user:hunter2@:80/")
    assert "ENDPOINT" in message and "hunter2" not in message and "***@" in message


def test_optional_values_may_be_empty_but_not_malformed():
    settings = settings_from(AddressSettings, {})
    assert settings.optional_brokers == "" and settings.endpoint is None
    assert "OPTIONAL_BROKERS" in _message(optional_brokers="nohost")


def test_service_settings_check_the_broker_list_and_otlp_endpoint():
    env = {"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9092", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://tempo:4318"}
    assert settings_from(ServiceSettings, env).otel_exporter_otlp_endpoint == "http://tempo:4318"
    with pytest.raises(ConfigError, match="KAFKA_BOOTSTRAP_SERVERS"):
        settings_from(ServiceSettings, {**env, "KAFKA_BOOTSTRAP_SERVERS": "not a url"})
    with pytest.raises(ConfigError, match="OTEL_EXPORTER_OTLP_ENDPOINT"):
        settings_from(ServiceSettings, {**env, "OTEL_EXPORTER_OTLP_ENDPOINT": "tempo 4318"})


def test_a_cross_field_error_is_its_own_line():
    from pydantic import model_validator

    class Both(BaseSettings):
        a: int = 0

        @model_validator(mode="after")
        def _never(self):
            raise ValueError("A and B disagree")

    with pytest.raises(ValidationError) as caught:
        Both()
    assert describe_errors(Both, caught.value).splitlines()[1] == "  A and B disagree"
