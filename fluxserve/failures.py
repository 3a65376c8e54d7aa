"""Failures whose message is written for the client: the worker stores it as the job's `error` as is."""

from __future__ import annotations


class JobFailure(Exception):
    """A job cannot produce an image, for a reason the client should read (no internals in the message)."""
