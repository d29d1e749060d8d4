"""Logging set-up shared by the services and the CLI."""

from __future__ import annotations

import logging
import os


def configure_logging(service: str, level: str | None = None) -> None:
    """Plain, greppable lines on stderr: time, level, service, logger, message."""
    level = level or os.environ.get("PYACEMAKER_LOG_LEVEL", "INFO")
    logging.basicConfig(
        level=level.upper(),
        format=f"%(asctime)s %(levelname)s {service} %(name)s: %(message)s",
        force=True,
    )
