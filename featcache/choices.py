"""The user-visible vocabularies shared by the library and the command line.

Defined once here, without heavy imports, so that ``featcache --help`` does not load torch or timm.
"""

from __future__ import annotations

DTYPES = ("float16", "bfloat16", "float32")  # cache dtypes; bfloat16 is stored as uint16
COMPRESSORS = ("lz4", "zstd", "none")  # chunk compressors (crc32c always follows)
DEFAULT_COMPRESSOR = "lz4"  # fastest decode at ~1.9x on post-ReLU taps (docs/store.md)
DEFAULT_BATCH_SIZE = 32  # backbone inputs per forward pass during extraction
READER_MODES = ("auto", "gpu", "ram", "stream")
WEIGHT_CHOICES_HELP = "a local .safetensors/.pth state dict, 'pypi:efficientnet-lite0', 'hub' or 'random'"
