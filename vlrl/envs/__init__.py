"""Multi-turn environments: the protocol and its loader (environment.py), tools in the model's call format
(tools.py), and the built-in environments, each beside the data of its task (zoom.py, calculator.py)."""
