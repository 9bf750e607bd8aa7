"""qtrap load generator (GSM8K/MathQA reasoning chains at controlled concurrency).

Not implemented yet: this package is a placeholder in the layout; see README.md.
"""
