"""Tasks: what is learned and how it is scored, and the dataset builders (hetfl.builtins registers them)."""
