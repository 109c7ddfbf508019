"""Tests-only aids shared across test directories, imported as ``helpers.<module>``.

``tests/`` is on ``sys.path`` because pytest (rootdir, prepend import mode) inserts the directory of
``tests/conftest.py`` before collecting, so this package resolves from every test directory, with
or without pytest-xdist. Nothing in ``megatron_vrft`` may import it.
"""
