"""Jigsaw's federation: trust, transport and the two services (county node, central matcher).

Imports go one way: ``federation`` uses ``linkage``; ``linkage`` never imports ``federation``.
"""

from federation.errors import AuthError, ConfigError, FederationError, StoreError, TransportError
from federation.registry import Registry
from federation.settings import MatcherSettings, NodeSettings, load_settings
from federation.signing import sign, verify

__all__ = [
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
]
