"""wxtoken: WeChat access_token central control server.

Readers need only :func:`read_token`; importing this package loads none of the daemon's
dependencies (requests, apscheduler, structlog).
"""

from __future__ import annotations

__version__ = "0.1.0"

from wxtoken.errors import (
    ConfigError,
    ControlError,
    StoreError,
    TokenCorrupt,
    TokenExpired,
    TokenMissing,
    TokenUnavailable,
    UpstreamError,
    WxtokenError,
)
from wxtoken.reader import Token, read_token, report_invalid

__all__ = [
    "ConfigError",
    "ControlError",
    "StoreError",
    "Token",
    "TokenCorrupt",
    "TokenExpired",
    "TokenMissing",
    "TokenUnavailable",
    "UpstreamError",
    "WxtokenError",
    "__version__",
    "read_token",
    "report_invalid",
]
