"""kit.extras.import_local: the local extra's packages, or one line naming the extra."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.kit.extras import LOCAL_EXTRA_INSTALL, LocalExtraMissing, import_local


def test_an_installed_module_is_returned() -> None:
    assert import_local("json", "a test").dumps([1]) == "[1]"


def test_a_missing_package_names_the_extra_and_what_needed_it() -> None:
    with pytest.raises(LocalExtraMissing) as raised:
        import_local("lp_no_such_package.engine", "the embedded thing")
    message = str(raised.value)
    assert "the embedded thing needs lp_no_such_package" in message
    assert LOCAL_EXTRA_INSTALL in message and "lambda-pipeline[local]" in message


def test_a_package_that_is_there_but_broken_is_not_blamed_on_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The package is installed; something it imports is missing: the real error, not a wrong hint."""
    (tmp_path / "lp_broken_package.py").write_text("import lp_missing_inner_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError) as raised:
        import_local("lp_broken_package", "the embedded thing")
    assert raised.value.name == "lp_missing_inner_dependency"
    assert not isinstance(raised.value, LocalExtraMissing)
