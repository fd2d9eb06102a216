"""Built-in passes of qcompiler, one per module (``passes/fold_batchnorm.py`` -> ``FoldBatchNormPass`` ->
``fold-batchnorm``). Installed as ``qcompiler.passes``; discovered by ``qcompiler.core.registry``.

Importing the package also hands the core the IR layer's model export / check / save
(:mod:`qcompiler.core.model_io`): the core never imports ``qcompiler.ir`` itself, and every pipeline of
built-in passes imports this package first.
"""

from qcompiler import ir
from qcompiler.core import model_io


def _check(model: object, where: str) -> None:
    ir.check_model(model, where=where, full=True)  # type: ignore[arg-type]


model_io.install(model_io.ModelIO(export=ir.export_model, check=_check, save=ir.save_model))
