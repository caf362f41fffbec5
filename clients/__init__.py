"""Clients of the inference service."""
