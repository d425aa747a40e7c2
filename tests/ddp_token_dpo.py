"""One training step of TRL's DPOTrainer patched with token_dpo, run by tests/test_trainer_patch.py twice: in
one process with the whole global batch, and under `accelerate launch --multi_gpu --num_processes 2` on CPU
(gloo; `--cpu` would start a single process) with half of it per process. Rank 0 saves the loss and the
updated weights to argv[1] for the test to compare. Plain SGD with learning rate 1, so the update is the
gradient itself.

The global batch is the whole 4-pair dataset, so it is the same set of pairs whatever order the samplers draw.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import hfpatch  # noqa: E402
from preference_fixtures import dpo_trainer, preference_rows, tokenizer  # noqa: E402
from tiny_models import tiny_model  # noqa: E402

GLOBAL_BATCH = 4


def main(out: str) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tok = tokenizer()
    rows = []
    for i, row in enumerate(preference_rows(GLOBAL_BATCH, seed=5)):
        n = len(tok(row["prompt"] + row["rejected"] + tok.eos_token)["input_ids"]) - len(tok(row["prompt"])["input_ids"])
        rows.append({**row, "rejected_weights": [0.2 + 0.15 * ((i + k) % 5) for k in range(n)]})
    trainer = dpo_trainer(Path(out).parent / f"run-{world}", rows=rows, ref_model=tiny_model("llama", seed=1).eval(),
                          per_device_train_batch_size=GLOBAL_BATCH // world, max_steps=1, learning_rate=1.0, optim="sgd",
                          gradient_checkpointing=False)
    recipe = hfpatch.Recipe([{"type": "token_dpo", "weights": "column", "form": "token"}])
    with hfpatch.patch(trainer, recipe) as handle:
        trainer.train()
        stats = handle.stats["token_dpo"]
    if trainer.accelerator.is_main_process:
        loss = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry][0]
        state = {name: value.detach().cpu().clone() for name, value in trainer.model.state_dict().items()}
        torch.save({"world": trainer.accelerator.num_processes, "loss": loss, "state": state,
                    "margins": stats["rewards/margins"], "weights": stats["weights/rejected_mean"]}, out)


if __name__ == "__main__":
    main(sys.argv[1])
