"""Reports on a model (layer L3): its cost (:mod:`~qcompiler.report.cost`), its validation against the float model
(:mod:`~qcompiler.report.validate`) and deployment bundles (:mod:`~qcompiler.report.bundle`)."""
