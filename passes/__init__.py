"""Built-in passes of qcompiler, one per module (``passes/fold_batchnorm.py`` -> ``FoldBatchNormPass`` ->
``fold-batchnorm``). Installed as ``qcompiler.passes``; discovered by ``qcompiler.core.registry``."""
