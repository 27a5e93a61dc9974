"""Low precision and quantization with torchao (the `quant` extra).

    training  fp8 training (float8 linears) and quantization-aware training (fake-quantized
              linears), applied to the model before `parallelize`; imports nothing from
              `pretrain.train`, which calls it
    export    quantizing a plain model (PTQ, and QAT's conversion) and writing a quantized
              model directory; below `pretrain.train` too (the trainer converts QAT runs)
    ptq       a checkpoint quantized into such a directory, its loading for
              `pretrain-generate`, validation loss and generation speed; above `pretrain.train`

torchao is imported lazily and quietly (`torchao()`): a run without fp8 or QAT never needs it,
and its import logs one warning per CUDA-only extension it cannot load on a CPU machine.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from types import ModuleType

from pretrain.errors import ConfigError

# Loggers that warn once at import about what a CPU machine lacks (CUDA kernels) or about
# torchao's use of a deprecated pytree call; neither concerns the user.
_NOISY_LOGGERS = ("torchao", "torch.utils._pytree")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def torchao() -> ModuleType:
    """torchao with its quantization, QAT and float8 modules imported, or a ConfigError naming
    the extra to install."""
    try:
        with _quiet():
            import torchao as ao
            import torchao.float8
            import torchao.prototype.mx_formats  # imported by QAT's prepare, which warns
            import torchao.prototype.qat
            import torchao.prototype.quantization.int4.inference_workflow
            import torchao.quantization
            import torchao.quantization.qat  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"torchao is not installed ({e}); pip install 'pretrain[quant]' "
                          "(or torchao) for fp8, QAT and quantized models") from e
    return ao
