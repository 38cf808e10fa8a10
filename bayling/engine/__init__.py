"""One engine for every path that generates text (chat, api.py, the worker, eval)."""
