"""qcompiler/core."""
