"""The public surface is small and deliberate: changing it is a decision, not an accident."""

import importlib

import pytest

EXPECTED = {
    "linkage": [
        "ColumnMapping",
        "LinkResult",
        "LinkageError",
        "LinkageModel",
        "SplinkEngine",
        "TokenSpec",
        "Tokeniser",
        "TrainingOptions",
        "generate_federation",
        "link_files",
        "match_tokens",
        "normalise_records",
        "prepare_county",
        "read_county_file",
    ],
    "federation": [
        "AuthError",
        "ConfigError",
        "FederationError",
        "MatcherSettings",
        "NodeSettings",
        "Registry",
        "StoreError",
        "TransportError",
        "load_settings",
        "sign",
        "verify",
    ],
}


@pytest.mark.parametrize("package", sorted(EXPECTED))
def test_exports_are_pinned(package: str) -> None:
    module = importlib.import_module(package)
    assert sorted(module.__all__) == sorted(EXPECTED[package])
    for name in module.__all__:
        assert getattr(module, name) is not None


def test_linkage_never_imports_federation() -> None:
    import pathlib

    root = pathlib.Path(importlib.import_module("linkage").__file__).parent
    for path in root.rglob("*.py"):
        text = path.read_text()
        for banned in ("import federation", "from federation", "import fastapi", "import httpx"):
            assert banned not in text, f"{path.name} must not use {banned.split()[-1]}"
