"""JWT authentication plugin: see :mod:`plugins.jwt_auth.config` for what it can do."""

from .config import JwtAuthConfig
from .plugin import JwtAuthPlugin

__all__ = ["JwtAuthConfig", "JwtAuthPlugin"]
