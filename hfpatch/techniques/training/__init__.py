"""Training techniques: they patch a `transformers.Trainer` instance (TRL's `DPOTrainer` included), replacing
its loss, instead of a model. `losses` holds the pure loss functions, `base` the trainer machinery."""
from . import tdpo  # noqa: F401  (registers the technique)
from . import token_dpo  # noqa: F401  (registers the technique)
