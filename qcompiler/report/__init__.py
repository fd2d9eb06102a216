"""qcompiler/report."""
