"""Extra ``qcompiler`` sub-commands, one module each, registered by ``qcompiler.cli`` (``register(cli)``)."""
