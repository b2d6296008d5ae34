"""Rate limiting for extproc: descriptors, exact counters in Redis with adaptive batching, an
in-process fallback, RateLimit headers. The plugin is :class:`RateLimitPlugin`; its schema is
:class:`RateLimitConfig`."""

from plugins.rate_limit.config import RateLimitConfig
from plugins.rate_limit.plugin import RateLimitPlugin

__all__ = ["RateLimitConfig", "RateLimitPlugin"]
