"""Helpers that start real programs (nginx, HAProxy, the demo app) on loopback for tests."""
