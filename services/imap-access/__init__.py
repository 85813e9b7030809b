"""Postbus."""
