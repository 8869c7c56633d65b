"""Testbed v2, the cipher: the pair where the Q3 claims can fail, its OPD cells, sweep and
pre-registered decisions (docs/testbed_v2.md)."""
