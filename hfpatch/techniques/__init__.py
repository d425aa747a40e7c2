"""Built-in techniques. Importing this package registers every one of them in `hfpatch.catalogue`."""
from . import generation  # noqa: F401
from . import tokenizer  # noqa: F401
from . import attention  # noqa: F401
from . import compute  # noqa: F401
from . import vision  # noqa: F401
from . import training  # noqa: F401
