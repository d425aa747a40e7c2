"""Tokenizer transplant: swap a model's vocabulary for another tokenizer's and initialise every new row
without training.

Shared tokens (same bytes after normalising `Ġ`/`▁`/byte-fallback pieces; special tokens by text, then by
role) copy their rows bit-for-bit. Every other new row comes from one method:

- `omp`: orthogonal matching pursuit over shared anchor tokens (mergekit-tokensurgeon's idea). With a
  `donor` model that already uses the new tokenizer, each new token's donor embedding is coded as a
  k-sparse combination of the donor's anchor rows, and the same coefficients combine the base model's
  anchor rows. Without a donor, the "donor view" of a new token is the mean of the base model's rows of its
  old-tokenizer pieces, so the result is that mean projected onto k anchor rows.
- `tokenadapt`: TokenAdapt's local (weighted pieces) + global (nearest old tokens) hybrid.
- `mean`: the mean of the old pieces' rows. `zero` and `random` are baselines.

An untied `lm_head` is initialised the same way from its own rows (with a donor, OMP fits the donor's own
`lm_head` when that is untied too). Tied models stay tied. The original embedding modules are kept and put
back on unpatch, so unpatching restores the exact weights, config and generation config.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import time
from typing import Any

import torch

from ... import arch, primitives
from ...errors import UnsupportedModelError
from ...catalogue import register
from ...technique import Technique, param
from .omp import apply_codes, omp
from .alignment import Alignment, align
from .length_bias import add_length_bias, constant_logit_direction
from .tokenadapt import mean_of_pieces, pad_pieces, tokenadapt

logger = logging.getLogger(__name__)

METHODS = ("omp", "tokenadapt", "mean", "zero", "random")


@dataclasses.dataclass
class TransplantParams:
    tokenizer: str = param(help="the new tokenizer: a local folder or Hub repo id (AutoTokenizer.from_pretrained)",
                           resource=True)
    method: str = param("omp", help="how new rows are initialised", choices=METHODS)
    donor: str | None = param(None, help="a causal LM that already uses the new tokenizer (folder or repo id); "
                                         "omp fits its coefficients in the donor's embedding space", resource=True)
    base_tokenizer: str | None = param(None, help="the model's current tokenizer; default: the folder the model "
                                                  "was loaded from (model.name_or_path)", resource=True)
    k: int = param(64, help="omp: anchor tokens per new token", ge=1, le=1024)
    omp_candidates: int | None = param(128, help="omp: anchors screened per new token before the pursuit "
                                                 "(most correlated first); null searches all anchors", ge=1,
                                       le=1 << 20)
    omp_ridge: float = param(0.01, help="omp: ridge added to the unit anchors' gram diagonal in each refit; keeps "
                                         "the codes of nearly collinear anchors small, which is what transfers "
                                         "to the base space (0: plain OMP)", ge=0)
    temperature: float = param(0.5, help="tokenadapt: softmax temperature of the piece and neighbour weights", gt=0)
    global_k: int = param(3, help="tokenadapt: nearest old tokens in the global estimate", ge=1, le=1024)
    local_weight: float = param(0.7, help="tokenadapt: weight of the local estimate (1 - it for the global)",
                                ge=0, le=1)
    seed: int = param(0, help="random: seed of the baseline's rows", ge=0)
    length_bias: float | None = param(
        None, help="donor-free: add length_bias * (old pieces - 1) * u to each initialised output row, u being a "
                   "direction with h . u ~ 1 over the model's final hidden states (fitted on text the model "
                   "samples itself, seeded), i.e. a logit offset of length_bias per extra piece; -3 measured best "
                   "(docs/results/transplant.md); None = off")
    progress: bool = param(True, help="show a progress bar while initialising rows")


def _load_tokenizer(source: str, what: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"cannot load the {what} from {source!r}: {first}") from exc


def _bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tok", disable=not enabled or total == 0, leave=False)


def initial_rows(method: str, rows: torch.Tensor, alignment: Alignment, params: TransplantParams, *,
                 donor_rows: torch.Tensor | None = None, progress: bool = False,
                 what: str = "embeddings") -> torch.Tensor:
    """The new [new_vocab, d] matrix for one embedding space: shared rows copied bit-for-bit from `rows`
    (the old [old_vocab, d] matrix), every other row by `method`. `donor_rows` [new_vocab, d'] are the
    donor model's rows for the new vocabulary (omp with a donor)."""
    new = torch.empty(alignment.new_size, rows.shape[1], dtype=rows.dtype)
    new[alignment.shared_new] = rows[alignment.shared_old]
    todo = torch.tensor(alignment.todo, dtype=torch.long)
    if todo.numel() == 0:
        return new
    pieces = [alignment.pieces[i] for i in alignment.todo]
    ids, mask = pad_pieces(pieces)
    if method == "zero":
        values = torch.zeros(len(todo), rows.shape[1])
    elif method == "random":
        g = torch.Generator().manual_seed(params.seed)
        mean, std = rows.float().mean(0), rows.float().std(0)
        values = mean + std * torch.randn(len(todo), rows.shape[1], generator=g)
    elif method == "mean":
        values = mean_of_pieces(rows, ids, mask)
    elif method == "tokenadapt":
        piece_len = torch.zeros_like(ids)
        for r, p in enumerate(pieces):
            for c, piece in enumerate(p[: ids.shape[1]]):
                piece_len[r, c] = len(alignment.old_bytes.get(piece, b"")) or 1
        exclude = torch.tensor(sorted(alignment.old_specials), dtype=torch.long) if alignment.old_specials else None
        with _bar(len(todo), f"tokenadapt {what}", progress) as bar:
            values = tokenadapt(rows, ids, mask, piece_len, temperature=params.temperature,
                                global_k=params.global_k, local_weight=params.local_weight, exclude=exclude,
                                progress=bar.update)
    elif method == "omp":
        anchors_old = alignment.shared_old
        if donor_rows is not None:
            targets = donor_rows[todo].float()
            atoms = donor_rows[alignment.shared_new].float()
        else:
            targets = mean_of_pieces(rows, ids, mask)
            atoms = rows[anchors_old].float()
        with _bar(len(todo), f"omp k={params.k} {what}", progress) as bar:
            idx, coef = omp(targets, atoms, params.k, candidates=params.omp_candidates,
                                    ridge=params.omp_ridge, progress=bar.update)
        values = apply_codes(idx, coef, rows[anchors_old].float())
    else:  # pragma: no cover - validated by the parameter's choices
        raise ValueError(method)
    new[todo] = values.to(rows.dtype)
    return new


def _clone_with_weight(module: torch.nn.Module, weight: torch.nn.Parameter, bias: torch.nn.Parameter | None = None):
    """A copy of an embedding or linear module (same class, buffers such as Gemma's embed_scale, hooks) that
    holds `weight` (and `bias`), with its size attributes updated. The original module is left untouched."""
    clone = module.__class__.__new__(module.__class__)
    clone.__dict__ = module.__dict__.copy()
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    clone._modules = dict(module._modules)
    clone._parameters["weight"] = weight
    if "bias" in module._parameters and module._parameters["bias"] is not None:
        clone._parameters["bias"] = bias
    if isinstance(module, torch.nn.Embedding):
        clone.num_embeddings = weight.shape[0]
    if isinstance(module, torch.nn.Linear):
        clone.out_features = weight.shape[0]
    return clone


def _template_markers(template: str, tokenizer) -> set[str]:
    """The special-token texts a chat template spells out literally."""
    specials = {str(t) for t in getattr(tokenizer, "all_special_tokens", [])}
    specials |= {str(t.content) for t in getattr(tokenizer, "added_tokens_decoder", {}).values()}
    return {s for s in specials if s and s in template}


@register
class TokenizerTransplant(Technique):
    """Swap the model's vocabulary for a new tokenizer's, initialising new embedding rows without training.

    Example:
        >>> handle = hfpatch.patch(model, hfpatch.Recipe([{"type": "tokenizer_transplant",
        ...                                                "tokenizer": "path/to/new_tokenizer", "method": "omp"}]))
        >>> tok = handle.tokenizer                       # use this tokenizer with the patched model
        >>> model.save_pretrained(out); tok.save_pretrained(out)   # reloads with plain transformers
        >>> handle.unpatch()                             # original embeddings, config and vocab_size
    """

    name = "tokenizer_transplant"
    family = "tokenizer"
    summary = "Tokenizer swap: new vocabulary with training-free embedding init (OMP, TokenAdapt, mean)"
    Params = TransplantParams
    claims = frozenset({"embeddings", "vocabulary"})
    model_types = frozenset(arch.supported_model_types("decoder"))  # text models; VLMs are not handled yet

    def __init__(self, params: Any = None, **kwargs: Any):
        super().__init__(params, **kwargs)
        self.tokenizer = None
        self.alignment: Alignment | None = None
        self._stats: dict[str, Any] = {}
        self._direction_fit: dict[str, float] | None = None
        #: u of `length_bias` (None when off)
        self.direction: torch.Tensor | None = None

    def stats(self) -> dict[str, Any]:
        return dict(self._stats)

    def _base_tokenizer(self, model):
        source = self.params.base_tokenizer or getattr(model, "name_or_path", None) or \
            getattr(model.config, "_name_or_path", None)
        if not source:
            raise ValueError("the model does not say which folder it was loaded from; pass base_tokenizer= "
                             "(the model's current tokenizer)")
        return _load_tokenizer(source, "model's current tokenizer (base_tokenizer)")

    def _donor_rows(self, new_size: int):
        from transformers import AutoModelForCausalLM

        try:
            donor = AutoModelForCausalLM.from_pretrained(self.params.donor, dtype=torch.float32)
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot load the donor model from {self.params.donor!r}: {exc}") from exc
        inp = donor.get_input_embeddings().weight.detach()
        out_mod = donor.get_output_embeddings()
        out = None if out_mod is None or out_mod.weight is donor.get_input_embeddings().weight \
            else out_mod.weight.detach()
        if inp.shape[0] < new_size:
            raise ValueError(f"the donor has {inp.shape[0]} embedding rows but the new tokenizer has {new_size} "
                             "tokens; the donor must use the new tokenizer")
        return inp, out

    def apply(self, model, ctx) -> None:
        p = self.params
        started = time.perf_counter()
        adapter = ctx.adapter
        emb, head = adapter.input_embeddings(), adapter.output_embeddings()
        tied = adapter.embeddings_tied()
        old_vocab = emb.weight.shape[0]
        if p.donor is not None and p.method != "omp":
            raise ValueError(f"donor= is used by method 'omp' only, not {p.method!r}")
        if p.length_bias is not None and (p.donor is not None or p.method in ("zero", "random")):
            raise ValueError("length_bias corrects rows built from the old pieces without a donor (methods mean, "
                             f"tokenadapt, omp with donor=None), not method {p.method!r}"
                             + (" with a donor" if p.donor is not None else ""))
        old_tok = self._base_tokenizer(model)
        if len(old_tok) > old_vocab:
            raise UnsupportedModelError(
                f"base_tokenizer has {len(old_tok)} tokens but the model has {old_vocab} embedding rows; "
                "it is not this model's tokenizer")
        new_tok = _load_tokenizer(p.tokenizer, "new tokenizer")
        alignment = align(old_tok, new_tok)
        if alignment.shared_new.numel() == 0:
            raise ValueError("the new tokenizer shares no token with the model's tokenizer; nothing to anchor on")
        self.alignment = alignment
        donor_in = donor_out = None
        if p.donor is not None:
            donor_in, donor_out = self._donor_rows(alignment.new_size)
        direction = self.direction = self._direction_fit = None
        if p.length_bias is not None and alignment.todo:
            # fitted before the vocabulary changes: the model samples with its own tokenizer
            start = old_tok.bos_token_id if old_tok.bos_token_id is not None else old_tok.eos_token_id
            if start is None:
                raise ValueError("length_bias samples text from the model, starting at the base tokenizer's bos or "
                                 "eos token, and this tokenizer has neither")
            direction, self._direction_fit = constant_logit_direction(model, start)
            self.direction = direction

        with torch.no_grad():
            w_in = initial_rows(p.method, emb.weight.detach(), alignment, p, donor_rows=donor_in,
                                progress=p.progress, what="input embeddings")
            if direction is not None and tied:  # the tied rows are the output rows too
                self._add_length_bias(w_in, alignment, direction)
            new_emb = _clone_with_weight(emb, torch.nn.Parameter(w_in, requires_grad=emb.weight.requires_grad))
            if tied:
                new_head = _clone_with_weight(head, new_emb.weight)
            else:
                donor_head = donor_out if donor_out is not None else donor_in
                w_out = initial_rows(p.method, head.weight.detach(), alignment, p, donor_rows=donor_head,
                                     progress=p.progress, what="lm_head")
                if direction is not None:
                    self._add_length_bias(w_out, alignment, direction)
                bias = None
                if getattr(head, "bias", None) is not None:
                    b = head.bias.detach()[:, None]
                    bias = torch.nn.Parameter(initial_rows("mean", b, alignment, p)[:, 0])
                new_head = _clone_with_weight(head, torch.nn.Parameter(w_out, requires_grad=head.weight.requires_grad),
                                              bias)
        new_pad = new_tok.pad_token_id
        if isinstance(new_emb, torch.nn.Embedding):
            new_emb.padding_idx = new_pad

        ctx.record(primitives.replace_submodule(model, adapter.input_embeddings_path(), new_emb))
        ctx.record(primitives.replace_submodule(model, adapter.output_embeddings_path(), new_head))
        self._update_config(model, ctx, old_tok, new_tok, alignment, old_vocab)

        template = self._chat_template(old_tok, new_tok)
        self.tokenizer = new_tok
        self._stats = {
            "method": p.method,
            "donor": p.donor,
            "tied": tied,
            **alignment.summary(),
            "chat_template": template,
            "seconds": round(time.perf_counter() - started, 2),
        }
        if self._direction_fit is not None:
            self._stats["length_bias"] = {"bias": p.length_bias, "direction_fit": self._direction_fit}

    def _add_length_bias(self, rows: torch.Tensor, alignment: Alignment, direction: torch.Tensor) -> None:
        todo = torch.tensor(alignment.todo, dtype=torch.long)
        counts = torch.tensor([len(alignment.pieces[i]) for i in alignment.todo])
        add_length_bias(rows, todo, counts, direction, self.params.length_bias)

    def _update_config(self, model, ctx, old_tok, new_tok, alignment: Alignment, old_vocab: int) -> None:
        text_sub = ctx.adapter.text_sub_config()
        new_size = alignment.new_size
        ctx.record(primitives.set_config_field(model, "vocab_size", new_size, sub_config=text_sub))
        ids = {role: getattr(new_tok, f"{role}_token_id", None) for role in ("bos", "eos", "pad")}
        if ids["pad"] is None and model.config.get_text_config().pad_token_id is not None:
            ids["pad"] = ids["eos"]  # the old config had a pad id; keep generate() padding with something valid
        for role, value in ids.items():
            ctx.record(primitives.set_config_field(model, f"{role}_token_id", value, sub_config=text_sub))
        # Modules that cache the vocabulary size or padding id at construction (LlamaModel.vocab_size, ...).
        for module in model.modules():
            if module.__dict__.get("vocab_size") == old_vocab:
                ctx.record(primitives.set_attribute(module, "vocab_size", new_size))
            if "padding_idx" in module.__dict__ and not isinstance(module, torch.nn.Embedding):
                ctx.record(primitives.set_attribute(module, "padding_idx", ids["pad"]))
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen = copy.deepcopy(gen)
            for role, value in ids.items():
                setattr(gen, f"{role}_token_id", value)
            ctx.record(primitives.set_attribute(model, "generation_config", gen))

    def _chat_template(self, old_tok, new_tok) -> str:
        """Carry the old chat template over when the new tokenizer has none and can spell its markers."""
        if getattr(new_tok, "chat_template", None):
            return "own"
        template = getattr(old_tok, "chat_template", None)
        if not template:
            return "none"
        vocab = new_tok.get_vocab()
        missing = sorted(m for m in _template_markers(template, old_tok) if m not in vocab)
        if missing:
            return f"not carried (the new tokenizer has no token for {', '.join(missing)})"
        new_tok.chat_template = template
        return "carried over"


__all__ = ["METHODS", "TokenizerTransplant", "TransplantParams", "initial_rows"]
