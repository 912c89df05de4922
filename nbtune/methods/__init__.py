"""Tuning methods: the registry (pure data) and the code that applies each method to a model."""

from __future__ import annotations

from nbtune.methods.registry import Field, Method, MethodContext, all_methods, find, get, names, register

__all__ = ["Field", "Method", "MethodContext", "all_methods", "find", "get", "names", "register"]
