"""Tiny preference data and trainers for the training-technique tests (TRL's DPOTrainer and a plain Trainer)."""
from __future__ import annotations

import copy

import torch

from tiny_models import tiny_model, word_level_tokenizer

WORDS = "alpha beta gamma delta one two three four five six seven eight nine ten yes no"


def tokenizer():
    return word_level_tokenizer(128, WORDS)


def preference_rows(n: int = 8, seed: int = 0) -> list[dict]:
    """`n` text pairs whose completions differ in length (so padding and alignment are exercised)."""
    g = torch.Generator().manual_seed(seed)
    words = WORDS.split()

    def phrase(length: int) -> str:
        return " ".join(words[int(i)] for i in torch.randint(0, len(words), (length,), generator=g))

    rows = []
    for i in range(n):
        rows.append({"prompt": phrase(3 + i % 3) + " ", "chosen": phrase(2 + i % 4), "rejected": phrase(3 + (i + 1) % 3)})
    return rows


def dpo_config(tmp_path, **overrides):
    from trl import DPOConfig

    values = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, per_device_eval_batch_size=4, max_steps=2,
                  learning_rate=1e-2, report_to="none", use_cpu=True, logging_steps=1, save_strategy="no",
                  beta=0.1, seed=0, dataloader_num_workers=0, disable_tqdm=True, bf16=False)
    values.update(overrides)
    return DPOConfig(**values)


def dpo_trainer(tmp_path, *, rows=None, model=None, ref_model="copy", **config):
    """TRL's DPOTrainer on a tiny llama with a frozen copy as the reference (ref_model=None: none given)."""
    from datasets import Dataset
    from trl import DPOTrainer

    model = model if model is not None else tiny_model("llama")
    model.train()
    ref = copy.deepcopy(model).eval() if ref_model == "copy" else ref_model
    data = Dataset.from_list(rows if rows is not None else preference_rows())
    return DPOTrainer(model=model, ref_model=ref, args=dpo_config(tmp_path, **config), train_dataset=data,
                      processing_class=tokenizer())


def first_batch(trainer) -> dict:
    """The first training batch exactly as the trainer's loss sees it (collator, device, no shuffling)."""
    loader = trainer.get_train_dataloader()
    return next(iter(loader))
