"""Training methods by name: `get_method("ikd").train(cfg)` trains into `cfg.out`.

See `ikdmil.methods.registry` for the contract a method fulfils and how to add one.
"""

from ikdmil.methods.registry import Method, available_methods, get_method, register_method

__all__ = ["Method", "available_methods", "get_method", "register_method"]
