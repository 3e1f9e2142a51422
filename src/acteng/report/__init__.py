"""Presentation: figures, the self-contained HTML report and the demo that writes it.

No measuring code imports this package; it only reads results.
"""
