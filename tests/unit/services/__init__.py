"""Unit tests of the reference services (stack/services/qoe)."""
