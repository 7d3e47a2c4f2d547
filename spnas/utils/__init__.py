"""Lowest layer: typed errors, value checks, atomic file writes and fail points. No torch."""
