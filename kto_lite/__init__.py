"""kto_lite: KTO alignment from binary feedback on a 4-bit QLoRA base, on one consumer GPU.

Importing the package silences messages a user can do nothing about (errors still show):
bitsandbytes' advice to install an optional CPU kernel package, and transformers' deprecation
notices for the gradient-checkpointing calls that peft makes on our behalf.
"""

import logging
import warnings

logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=r"`\w*gradient_checkpointing\w*` is deprecated", category=FutureWarning)
