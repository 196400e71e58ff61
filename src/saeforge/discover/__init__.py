"""Concept discovery: which SAE features track a labelled concept (sentences labelled 0–3)."""
