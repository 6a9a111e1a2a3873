"""Which asyncio event loop the SMTP front end runs on.

uvloop (libuv) by default: it does the same work as asyncio's selector loop with about a
fifth less CPU per SMTP session (bench/mta.py), which at one client at a time is the time
the client waits. MAILMOAT_EVENT_LOOP=asyncio picks the standard library's loop instead:
for debugging, or where uvloop cannot be installed (then it is also the fallback).
"""
from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

ENVIRONMENT = "MAILMOAT_EVENT_LOOP"
CHOICES = ("uvloop", "asyncio")


def loop_factory() -> tuple[str, Callable[[], asyncio.AbstractEventLoop]]:
    """(name, factory) of the loop to use; raises ValueError for an unknown choice."""
    wanted = os.environ.get(ENVIRONMENT, "uvloop").strip().lower() or "uvloop"
    if wanted not in CHOICES:
        raise ValueError(f"{ENVIRONMENT}={wanted!r}: use one of {', '.join(CHOICES)}")
    if wanted == "uvloop":
        try:
            import uvloop
        except ImportError:  # not installed here: the standard loop does the same job
            return "asyncio (uvloop not installed)", asyncio.new_event_loop
        return "uvloop", uvloop.new_event_loop
    return "asyncio", asyncio.new_event_loop


def new_event_loop() -> asyncio.AbstractEventLoop:
    return loop_factory()[1]()
