"""Federated methods, one file each; hetfl.builtins imports them, which registers them by name."""
