"""Data-selection stages (`selection.name`) that run before local training; hetfl.builtins registers them."""
