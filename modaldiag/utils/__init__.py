"""Shared helpers: input validation (one place for every check) and atomic file IO."""
