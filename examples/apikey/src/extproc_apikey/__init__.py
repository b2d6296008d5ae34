"""API-key authentication for extproc: keys in Redis or in the config, SHA-256 at rest."""

from extproc_apikey.config import ApiKeyConfig, StaticKey, hash_key
from extproc_apikey.plugin import OWNER_KEY, ApiKeyPlugin

__all__ = ["OWNER_KEY", "ApiKeyConfig", "ApiKeyPlugin", "StaticKey", "hash_key"]
