"""The testbeds: tiny teacher-student pairs built from a seed, each in its own package, on the
library's step, loss, selection and claims.

- ``arith/``: the embedded arithmetic pair (``embedded://``), its build and its criteria.
- ``cipher/``: testbed v2, the pair where the Q3 claims can fail, its sweep and decisions.
- ``agent/``: the embedded agentic pair (a calculator tool), its build and its DAgger teacher.
- ``tiny.py``: the character tokenizer, the model shape and the pair's files, shared by all three.
- ``sft.py``: the one supervised-fitting loop the builds train with.

The library never imports this package (tests/test_layering.py).
"""
