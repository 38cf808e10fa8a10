"""One engine for every path that generates text (chat, api.py, the worker, eval)."""
from .request import BudgetError, Logprob, OutputKind, Request, RequestOutput  # noqa: F401
