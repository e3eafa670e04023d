"""Distillation loss terms, registered by name (see `clipdistill.losses.base`).

Importing this package registers every built-in term.
"""

from clipdistill.losses.base import NEEDS, TERMS, Outputs, Term, TermContext, get_term, register_term

__all__ = ["NEEDS", "TERMS", "Outputs", "Term", "TermContext", "get_term", "register_term"]
