"""The embedded arithmetic pair (``embedded://``): its build and its criteria (docs/testbed.md)."""
