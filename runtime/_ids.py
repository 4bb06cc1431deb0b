"""Identifiers: a prefix and 128 random bits."""

from __future__ import annotations

import secrets


def new_id(prefix: str) -> str:
    """``prefix_`` followed by 32 hex digits (128 bits from ``secrets``)."""
    return f"{prefix}_{secrets.token_hex(16)}"
