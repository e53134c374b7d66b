"""gemma_kit's test suite: a package so that its helpers are imported by name (tests.support)."""
