"""``hfpatch critical-tokens``: cDPO's critical-token weights for a preference file, and the adapters as a recipe.

The command trains the two contrastive LoRA adapters (positive on the chosen answers, negative on the rejected
ones) on the model, or loads them from a recipe saved earlier, scores every token of every rejected answer
and writes the file again with a weight column (``1 - s_t``, one float per token of the rejected completion as
TRL's ``DPOTrainer`` tokenises it). ``--save-recipe`` writes a ``token_dpo`` recipe carrying the adapters, so
``hfpatch.patch(trainer, DIR)`` scores tokens inside the loss instead of reading a column.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import hfpatch
from hfpatch.apps.cli.common import (CommandError, add_command, add_model_arguments, load_local_model, positive,
                                     positive_float, resolve_model_dir, resolve_recipe_argument)
from hfpatch.files import OutputError, atomic_folder, check_folder_target
from hfpatch.recipe import Recipe
from hfpatch.techniques.training import critical_tokens as ct

#: The technique whose recipe carries the adapters (its tensors are ``token_dpo/positive/...``).
TECHNIQUE = "token_dpo"
SUMMARY_FILE = "critical_tokens.json"
#: The cDPO paper's adapter settings, used where the command line does not set them.
TRAINING_DEFAULTS = {"r": 8, "alpha": 16.0, "lr": 3e-4, "epochs": 1, "seed": 0}


def register(subparsers) -> None:
    parser = add_command(
        subparsers, "critical-tokens", handler=_cmd_critical_tokens,
        help="score how critical each token of the rejected answers is (cDPO) and write it as a column",
        description="Read a preference file (JSON Lines: one object per line with prompt, chosen and rejected "
                    "text), train a positive LoRA on the chosen answers and a negative LoRA on the rejected ones "
                    "(or load both from --recipe), and write the file to --out with a weight column: for each "
                    "token of the rejected answer 1 - s_t, where s_t = softmax((1+b) log p_pos - b log p_neg)[y_t] "
                    "(low weight = the positive adapter agrees with the token; high = the token is critical to the "
                    "mistake). Tokens are counted as TRL's DPOTrainer tokenises the rejected completion (EOS "
                    "appended), so the column feeds recipe 'cdpo' (token_dpo with weights='column'). "
                    "--save-recipe also writes a token_dpo recipe with the two adapters as its tensor payload "
                    "(weights='critical': tokens are scored inside the loss). Progress bars show training and "
                    "scoring; outputs are written to a temporary folder and moved into place when complete.",
        examples=["hfpatch critical-tokens --pairs pairs.jsonl --out scored/",
                  "hfpatch critical-tokens --model ./smollm2 --pairs pairs.jsonl --out scored/ --save-recipe ./cdpo-rec",
                  "hfpatch critical-tokens --model ./smollm2 --pairs more.jsonl --recipe ./cdpo-rec --out scored2/"],
        notes="--out holds the scored file (same name as --pairs) and critical_tokens.json (counts, mean weight, "
              "where the adapters came from). Defaults follow the cDPO paper: LoRA rank 8, alpha 16, lr 3e-4, one "
              "epoch on the MLP projections, b = 1.",
    )
    add_model_arguments(parser)
    parser.add_argument("--pairs", required=True, metavar="FILE",
                        help="preference pairs, JSON Lines with prompt / chosen / rejected strings")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the scored file and a summary")
    parser.add_argument("--save-recipe", metavar="DIR", help="also write a token_dpo recipe carrying the two adapters")
    parser.add_argument("--recipe", metavar="R",
                        help="load the adapters from this recipe (a folder or Hub repo saved with --save-recipe) "
                             "instead of training them")
    parser.add_argument("--force", action="store_true", help="replace non-empty --out / --save-recipe folders")
    columns = parser.add_argument_group("columns")
    columns.add_argument("--prompt-column", default="prompt", metavar="NAME", help="default: prompt")
    columns.add_argument("--chosen-column", default="chosen", metavar="NAME", help="default: chosen")
    columns.add_argument("--rejected-column", default="rejected", metavar="NAME", help="default: rejected")
    columns.add_argument("--column", default="rejected_weights", metavar="NAME",
                         help="the weight column to write (default: rejected_weights, what recipe cdpo reads)")
    train = parser.add_argument_group("adapters")
    # The training options default to None so that giving one together with --recipe can be refused;
    # TRAINING_DEFAULTS fills them in.
    train.add_argument("--r", type=positive, help="LoRA rank (default: 8)")
    train.add_argument("--alpha", type=positive_float, help="LoRA alpha (default: 16)")
    train.add_argument("--lr", type=positive_float, help="learning rate (default: 3e-4)")
    train.add_argument("--epochs", type=positive, help="epochs over the answers (default: 1)")
    train.add_argument("--batch-size", type=positive, default=8, help="answers per step and per scoring batch "
                                                                      "(default: 8)")
    train.add_argument("--target-modules", metavar="A,B",
                       help="comma-separated projections to adapt (names or paths; default: every MLP projection)")
    train.add_argument("--b", type=float, default=1.0, help="b in (1+b) log p_pos - b log p_neg (default: 1)")
    train.add_argument("--seed", type=int, help="seed of the adapter initialisation and order (default: 0)")


def _read_pairs(path: Path, columns: tuple[str, ...]) -> list[dict]:
    """The rows of a JSONL preference file, each checked to hold the named string columns."""
    if not path.is_file():
        raise CommandError(f"--pairs {path}: no such file")
    rows = []
    try:
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as exc:
                    raise CommandError(f"--pairs {path}, line {number}: not JSON ({exc.msg}); the file must hold "
                                       "one JSON object per line") from None
                if not isinstance(row, dict):
                    raise CommandError(f"--pairs {path}, line {number}: expected a JSON object, got "
                                       f"{type(row).__name__}")
                for column in columns:
                    if not isinstance(row.get(column), str):
                        what = "has no" if column not in row else "has a non-text"
                        raise CommandError(f"--pairs {path}, line {number}: {what} {column!r} column (columns: "
                                           f"{sorted(row)[:8]}; name them with --prompt-column/--chosen-column/"
                                           "--rejected-column)")
                rows.append(row)
    except UnicodeDecodeError as exc:
        raise CommandError(f"--pairs {path}: not UTF-8 text ({exc.reason})") from None
    if not rows:
        raise CommandError(f"--pairs {path}: the file holds no pairs")
    return rows


def _recipe_adapters(recipe: Recipe, what: str) -> tuple[ct.LoraState, ct.LoraState]:
    """The contrastive adapters a token_dpo recipe carries."""
    prefix = f"{TECHNIQUE}/"
    tensors = {k[len(prefix):]: v for k, v in recipe.tensors.items() if k.startswith(prefix)}
    metadata = {k[len(prefix):]: v for k, v in recipe.tensor_metadata.items() if k.startswith(prefix)}
    if not tensors:
        raise CommandError(f"{what}: recipe {recipe.name!r} carries no contrastive adapters (no {prefix}* tensors); "
                           "give a recipe written by 'hfpatch critical-tokens --save-recipe'")
    return ct.adapters_from_tensors(tensors, metadata)


def _check_target(option: str, value: str, force: bool) -> Path:
    try:
        return check_folder_target(value, force=force)
    except OutputError as exc:
        reason = "already exists and is not empty; pass --force to replace it" if "not empty" in exc.reason \
            else exc.reason
        raise CommandError(f"{option} {value}: {reason}") from None


def _cmd_critical_tokens(args: argparse.Namespace) -> int:
    # Everything the user can get wrong is checked before the model loads or anything trains.
    if args.b < 0 or args.b != args.b or args.b == float("inf"):
        raise CommandError(f"--b must be a finite number >= 0, got {args.b}")
    pairs_path = Path(args.pairs).expanduser()
    rows = _read_pairs(pairs_path, (args.prompt_column, args.chosen_column, args.rejected_column))
    resolve_model_dir(args.model)
    out = _check_target("--out", args.out, args.force)
    recipe_out = _check_target("--save-recipe", args.save_recipe, args.force) if args.save_recipe else None
    if recipe_out is not None and recipe_out == out:
        raise CommandError("--save-recipe and --out must be different folders")
    if recipe_out is not None and not any(t["name"] == TECHNIQUE for t in hfpatch.list_techniques()):
        raise CommandError(f"--save-recipe: this hfpatch has no {TECHNIQUE!r} technique to carry the adapters")
    loaded = None
    if args.recipe:
        for option in (*TRAINING_DEFAULTS, "target_modules"):
            if getattr(args, option) is not None:
                raise CommandError(f"--{option.replace('_', '-')} sets how adapters are trained; with --recipe the "
                                   "adapters are loaded, not trained")
        loaded = _recipe_adapters(resolve_recipe_argument(args.recipe), f"--recipe {args.recipe}")
    for option, default in TRAINING_DEFAULTS.items():
        if getattr(args, option) is None:
            setattr(args, option, default)
    targets = [t.strip() for t in args.target_modules.split(",") if t.strip()] if args.target_modules else None

    model, tokenizer, folder = load_local_model(args.model, dtype=args.dtype, device=args.device)
    started = time.perf_counter()
    if loaded is not None:
        positive_adapter, negative_adapter = loaded
        ct.check_base_model(positive_adapter, model)
        source = f"recipe {args.recipe}"
    else:
        correct = list(dict.fromkeys((r[args.prompt_column], r[args.chosen_column]) for r in rows))
        wrong = list(dict.fromkeys((r[args.prompt_column], r[args.rejected_column]) for r in rows))
        positive_adapter, negative_adapter = ct.train_contrastive_adapters(
            model, tokenizer, correct, wrong, r=args.r, alpha=args.alpha, lr=args.lr, epochs=args.epochs,
            target_modules=targets, batch_size=args.batch_size, seed=args.seed, progress=True)
        source = f"trained on {len(correct)} chosen and {len(wrong)} rejected answers"
    trained_s = time.perf_counter() - started
    scored = ct.score_dataset(model, tokenizer, positive_adapter, negative_adapter, rows,
                              prompt_column=args.prompt_column, rejected_column=args.rejected_column,
                              column=args.column, b=args.b, batch_size=args.batch_size, progress=True)
    weights = [w for row in scored for w in row[args.column]]
    config = positive_adapter.config
    summary = {"model": str(folder), "pairs": str(pairs_path), "rows": len(scored), "tokens": len(weights),
               "mean_weight": round(sum(weights) / max(1, len(weights)), 6), "column": args.column, "b": args.b,
               "adapters": source, "r": config.r, "alpha": config.alpha,
               "target_modules": len(config.target_modules),
               "seconds": {"adapters": round(trained_s, 2), "total": round(time.perf_counter() - started, 2)}}
    try:
        with atomic_folder(out, force=args.force) as tmp:
            with (tmp / pairs_path.name).open("w", encoding="utf-8") as handle:
                for row in scored:
                    handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
            if recipe_out is not None:
                tensors, metadata = ct.adapters_to_tensors(positive_adapter, negative_adapter)
                recipe = Recipe(
                    [{"type": TECHNIQUE, "weights": "critical", "critical_b": args.b}], name="cdpo-critical",
                    # the base model is named by its sizes, not by a local path (a recipe may go to the Hub)
                    description=f"cDPO with critical-token weights scored in the loss by two contrastive LoRA "
                                f"adapters (r={config.r}) trained on a {config.base_model['model_type']} model "
                                f"({config.base_model['num_layers']} layers, vocabulary "
                                f"{config.base_model['vocab_size']}); patch a Trainer, not a model",
                    requirements={"model_types": [config.base_model["model_type"]]},
                    tensors={f"{TECHNIQUE}/{k}": v for k, v in tensors.items()},
                    tensor_metadata={f"{TECHNIQUE}/{k}": v for k, v in metadata.items()})
                with atomic_folder(recipe_out, force=args.force) as recipe_tmp:
                    recipe.save_pretrained(recipe_tmp)
    except OutputError as exc:
        raise CommandError(f"{exc.path}: {exc.reason}") from None
    print(f"scored {summary['tokens']} rejected tokens in {len(scored)} pairs (mean weight {summary['mean_weight']:.3f}; "
          f"adapters {source}) -> {out / pairs_path.name}"
          + (f"; recipe with the adapters -> {recipe_out}" if recipe_out is not None else ""))
    return 0

