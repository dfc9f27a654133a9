"""Sharding rules, one per ATen op, in a registry (importing this package registers them all)."""

from distrifx.passes.rules import dense, pointwise, spatial, views  # noqa: F401  (registration)
from distrifx.passes.rules.registry import RuleContext, RuleFn, lookup, register, registered_ops

__all__ = ["RuleContext", "RuleFn", "lookup", "register", "registered_ops"]
