"""Log lines and warnings of other libraries that say nothing to a wb user, dropped where they arise.

Installed when `workbench` is imported (filters only: nothing heavy is imported): peft imports
bitsandbytes as soon as peft itself is imported, so `wb chat`, `wb eval` and `wb train` would all
print bitsandbytes' notice about an optional CPU kernel package without it; and peft and trl ask
transformers 5 a deprecated question (`is_gradient_checkpointing`) whenever they wrap a model.
"""

from __future__ import annotations

import logging
import warnings

# logger -> the message fragment dropped there: a missing optional CPU kernel package (logged once, at
# import) and LLM.int8's documented fp16 cast of its inputs (logged on every forward).
DROPPED = {
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community",
    "bitsandbytes.autograd._functions": "MatMul8bitLt: inputs will be cast from",
}


class _DropMessage(logging.Filter):
    def __init__(self, fragment: str):
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in str(record.msg)


DEPRECATIONS = (r".*`is_gradient_checkpointing` is deprecated",)  # FutureWarnings of transformers 5


def install() -> None:
    """Add the filters (once per logger)."""
    for message in DEPRECATIONS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)
    for name, fragment in DROPPED.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) for f in logger.filters):
            logger.addFilter(_DropMessage(fragment))
