"""The ``automtl`` command line (installed as ``automtl_compiler.cli``)."""
