"""Settings validation: one credential, readable files, identifiers; secrets never in a repr or an error."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from services.kit.config import ConfigError, load_settings
from services.snowflake_loader.settings import LoaderSettings
from services.stores.snowflake import CredentialError, connect_kwargs

SECRET = "s3cr3t-do-not-print"
BASE = {
    "SNOWFLAKE_ACCOUNT": "org-acct",
    "SNOWFLAKE_USER": "loader",
    "SNOWFLAKE_DATABASE": "lambda_pipeline",
}


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for key in list(__import__("os").environ):
        if key.startswith(("SNOWFLAKE_", "ICEBERG_")):
            monkeypatch.delenv(key)
    for key, value in BASE.items():
        monkeypatch.setenv(key, value)
    return monkeypatch


def test_password_auth_is_valid_and_never_shown(env: pytest.MonkeyPatch) -> None:
    env.setenv("SNOWFLAKE_PASSWORD", SECRET)
    settings = load_settings(LoaderSettings)
    assert SECRET not in repr(settings) and SECRET not in str(settings.model_dump())
    kwargs = connect_kwargs(settings)
    assert kwargs["password"] == SECRET and kwargs["database"] == "LAMBDA_PIPELINE"
    assert kwargs["protocol"] == "https" and "host" not in kwargs


def test_no_credential_or_two_credentials_exit_2_naming_the_variables(
    env: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ConfigError) as error:
        load_settings(LoaderSettings)
    assert error.value.code == 2 and "SNOWFLAKE_PASSWORD_FILE" in str(error.value)
    secret_file = tmp_path / "pw"
    secret_file.write_text(SECRET + "\n")
    env.setenv("SNOWFLAKE_PASSWORD", SECRET)
    env.setenv("SNOWFLAKE_PASSWORD_FILE", str(secret_file))
    with pytest.raises(ConfigError) as error:
        load_settings(LoaderSettings)
    assert "found SNOWFLAKE_PASSWORD, SNOWFLAKE_PASSWORD_FILE" in str(error.value)
    assert SECRET not in str(error.value) + capsys.readouterr().err


def test_a_bad_variable_is_named_and_the_password_is_not_echoed(
    env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    env.setenv("SNOWFLAKE_PASSWORD", SECRET)
    env.setenv("SNOWFLAKE_DATABASE", "drop table;")
    env.setenv("SNOWFLAKE_LOADER_INTERVAL_S", "0")
    env.setenv("SNOWFLAKE_LOADER_TABLES", "user_events,orders")
    with pytest.raises(ConfigError) as error:
        load_settings(LoaderSettings)
    message = str(error.value)
    for variable in ("SNOWFLAKE_DATABASE", "SNOWFLAKE_LOADER_INTERVAL_S", "SNOWFLAKE_LOADER_TABLES"):
        assert variable in message
    assert SECRET not in message + capsys.readouterr().err


def test_password_file_is_read_at_connect_time(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    secret_file = tmp_path / "pw"
    secret_file.write_text(f"  {SECRET}\n")
    env.setenv("SNOWFLAKE_PASSWORD_FILE", str(secret_file))
    settings = load_settings(LoaderSettings)
    assert SECRET not in repr(settings)
    assert connect_kwargs(settings)["password"] == SECRET
    env.setenv("SNOWFLAKE_PASSWORD_FILE", str(tmp_path / "missing"))
    with pytest.raises(ConfigError) as error:
        load_settings(LoaderSettings)
    assert "SNOWFLAKE_PASSWORD_FILE" in str(error.value) and "no such file" in str(error.value)


def _key_file(path: Path, passphrase: bytes | None) -> rsa.RSAPrivateKey:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    encryption = serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption))
    return key


def test_key_pair_auth_with_an_encrypted_key(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    key = _key_file(tmp_path / "key.p8", SECRET.encode())
    (tmp_path / "passphrase").write_text(SECRET)
    env.setenv("SNOWFLAKE_PRIVATE_KEY_FILE", str(tmp_path / "key.p8"))
    env.setenv("SNOWFLAKE_PRIVATE_KEY_PASSPHRASE_FILE", str(tmp_path / "passphrase"))
    settings = load_settings(LoaderSettings)
    kwargs = connect_kwargs(settings)
    assert kwargs["authenticator"] == "SNOWFLAKE_JWT" and "password" not in kwargs
    loaded = serialization.load_der_private_key(kwargs["private_key"], password=None)
    assert loaded.private_numbers() == key.private_numbers()

    (tmp_path / "passphrase").write_text("wrong")
    with pytest.raises(CredentialError) as error:
        connect_kwargs(settings)
    assert "SNOWFLAKE_PRIVATE_KEY_FILE" in str(error.value) and SECRET not in str(error.value)


def test_passphrase_without_a_key_and_clashing_schemas_are_refused(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "passphrase").write_text("x")
    env.setenv("SNOWFLAKE_PASSWORD", SECRET)
    env.setenv("SNOWFLAKE_PRIVATE_KEY_PASSPHRASE_FILE", str(tmp_path / "passphrase"))
    with pytest.raises(ConfigError, match="needs SNOWFLAKE_PRIVATE_KEY_FILE"):
        load_settings(LoaderSettings)
    env.delenv("SNOWFLAKE_PRIVATE_KEY_PASSPHRASE_FILE")
    env.setenv("SNOWFLAKE_STAGING_SCHEMA", "raw")
    with pytest.raises(ConfigError, match="four different schemas"):
        load_settings(LoaderSettings)


def test_local_settings_and_fault_point(env: pytest.MonkeyPatch) -> None:
    env.setenv("SNOWFLAKE_PASSWORD", SECRET)
    env.setenv("SNOWFLAKE_HOST", "127.0.0.1")
    env.setenv("SNOWFLAKE_PORT", "18080")
    env.setenv("SNOWFLAKE_PROTOCOL", "http")
    env.setenv("SNOWFLAKE_LOADER_FAIL_AFTER", "copy")
    settings = load_settings(LoaderSettings)
    kwargs = connect_kwargs(settings)
    assert (kwargs["host"], kwargs["port"], kwargs["protocol"]) == ("127.0.0.1", 18080, "http")
    assert settings.snowflake_loader_fail_after == "copy" and settings.table_names == ("user_events", "transactions")
    env.setenv("SNOWFLAKE_LOADER_FAIL_AFTER", "somewhere")
    with pytest.raises(ConfigError, match="SNOWFLAKE_LOADER_FAIL_AFTER"):
        load_settings(LoaderSettings)
