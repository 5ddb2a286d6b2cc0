"""amanlib: a reproducibility kit for micro-expression recognition with AMAN (Wei et al., ICASSP 2022)."""

__version__ = "0.1.0"
