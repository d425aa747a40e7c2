"""Self-speculative drafting by early exit: the target's first L layers, its final norm and its head draft.

No second model: the draft runs the target's own first L decoder layers on the tokens it proposes, attending
to the KV the target already cached for those layers (the same weights on the same accepted tokens give the
same keys and values, so nothing is recomputed: the draft's cache is a view whose new entries go to new
tensors, and the target's cache is never written). Its exit hidden state goes through the final norm and
the LM head; the argmax is the next draft token, a chain of k tokens per step.

DEL's rule (Zarch et al., 2025, arXiv:2504.05598) picks the exit L and the length k from running acceptance
statistics: after a verification the hidden states the target computed at a candidate exit layer for the
accepted positions are scored against the tokens the target chose there (a shadow test of the exits, one
per scored step in turn, at the cost of a norm and a head on a few rows; scored steps thin out while no exit
pays), and the pair maximising the expected tokens per layer computed,

    E[tokens | a_L, k] / (k * (L + H) + N + H),     E = (1 - a_L^(k+1)) / (1 - a_L)

with a_L the running agreement of exit L, N the number of layers and H the final norm and LM head's cost in
layers (their parameters over a decoder layer's: about 8 on SmolLM2-135M, whose 49k-row head outweighs eight
of its layers; DEL's paper counts layers only, which on small models with large vocabularies makes every
shallow exit look cheap), is used next step (k = 0, plain decoding, when no exit pays). The running
agreement starts as a plain mean (weight 1/(n + 1) for the n-th observation, the prior counting as one) and
settles into an exponential average of weight `rate`, so a few scored steps already replace the prior.
An untrained exit agrees with the full model far less than a trained draft does;
docs/results/speculative.md reports how often on SmolLM2-135M.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch

from ... import arch, compat, primitives
from ...catalogue import register
from ...errors import UnsupportedModelError
from ...technique import param
from .base import DrafterTechnique
from .engine import CallInfo, Drafter
from .tree import DraftTree


#: verified steps scored (one exit each, in turn) per candidate exit before `score_every` applies: the first
#: estimates replace the prior fast
WARM_UP_STEPS = 4
#: longest interval between scored steps while no exit pays (the estimates still follow a changing context)
MAX_SCORE_INTERVAL = 64


@dataclasses.dataclass
class EarlyExitCall:
    """One call's early-exit state: the target's cache (read only) and this step's chain."""

    target_cache: Any
    #: the exit and draft length used by the last `draft`
    exit_layer: int = 0
    length: int = 0


class EarlyExitDrafter(Drafter):
    """Drafts with the target's first layers. Shared by calls: agreement estimates per exit and counters.

    The hidden states scored by `update` are those of the last forward through each candidate layer; with
    several threads generating at once that may be another call's, which only blurs the agreement estimates
    (the shape check drops most such rows), never the output.
    """

    name = "early_exit"
    wants_call_info = True

    def __init__(self, model, exits: list[int], max_length: int, rate: float, prior: float,
                 fixed_exit: int | None, fixed_length: int | None, score_every: int = 1):
        adapter = arch.adapter_for(model)
        self.model = model
        self.layers = adapter.decoder_layers()
        self.embed = adapter.input_embeddings()
        self.norm = adapter.final_norm()
        self.head = adapter.output_embeddings()
        self.rotary = getattr(adapter.language_model, "rotary_emb", None)
        self.exits = exits
        self.max_length = max_length
        self.rate = rate
        self.fixed_exit = fixed_exit
        self.fixed_length = fixed_length
        self.score_every = score_every
        self._updates = 0
        #: scoring: whose turn it is, steps since the last scored one, and the current interval
        self._turn = self._since_scored = 0
        self._interval = score_every
        self.agreement = {layer: prior for layer in exits}
        self.observations = {layer: 0 for layer in exits}
        self._layer_kwarg = compat.cache_kwarg(self.layers[0])
        #: the final norm and head's cost in decoder layers (parameter counts; a decode step reads every weight)
        layer_params = sum(p.numel() for p in self.layers[0].parameters())
        head_params = sum(p.numel() for module in (self.norm, self.head) for p in module.parameters())
        self.head_cost = head_params / max(layer_params, 1)
        #: hidden states after each candidate exit layer in the last forward that ran it (the verification)
        self.captured: dict[int, torch.Tensor] = {}
        self.steps = self.drafted = self.accepted = 0
        self.exit_counts: dict[int, int] = {}

    def capture_hook(self, layer: int):
        """A forward hook on decoder layer `layer - 1` that keeps its output hidden states."""
        def hook(module, args, kwargs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            self.captured[layer] = hidden.detach()
        return hook

    # -- choosing the exit and the length (DEL)
    def choose(self) -> tuple[int, int]:
        """(exit layer, draft length) maximising expected tokens per layer computed; length 0: do not draft."""
        n = len(self.layers)
        if self.fixed_exit is not None and self.fixed_length is not None:
            return self.fixed_exit, self.fixed_length
        h = self.head_cost
        best = (0, 0)
        best_rate = 1.0 / (n + h)  # plain decoding: one token per N layers and a head
        for layer in ([self.fixed_exit] if self.fixed_exit is not None else self.exits):
            a = min(self.agreement[layer], 0.999)
            lengths = [self.fixed_length] if self.fixed_length is not None else range(1, self.max_length + 1)
            for k in lengths:
                expected = (1 - a ** (k + 1)) / (1 - a)
                rate = expected / (k * (layer + h) + n + h)
                if rate > best_rate:
                    best, best_rate = (layer, k), rate
        return best

    # -- per call
    def start(self, prompt: list[int], info: CallInfo) -> EarlyExitCall:
        return EarlyExitCall(target_cache=info.cache)

    def _exit_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(hidden)).float()

    def draft(self, tree: DraftTree, context: list[int], call: EarlyExitCall) -> None:
        layer, length = self.choose()
        call.exit_layer, call.length = layer, length
        self.exit_counts[layer] = self.exit_counts.get(layer, 0) + 1
        budget = min(length, tree.max_nodes - tree.num_drafted)
        if budget <= 0:
            return
        self.steps += 1
        cache = compat.cache_view(call.target_cache, layer)
        root_position = len(context) - 1
        token, node, estimate = context[-1], 0, 1.0
        device = self.head.weight.device
        a = self.agreement[layer]
        with torch.no_grad():
            for depth in range(budget):
                position = torch.tensor([[root_position + depth]], device=device)
                hidden = self.embed(torch.tensor([[token]], device=device))
                embeddings = self.rotary(hidden, position_ids=position)
                for block in self.layers[:layer]:
                    out = block(hidden, attention_mask=None, position_ids=position, position_embeddings=embeddings,
                                use_cache=True, **{self._layer_kwarg: cache})
                    hidden = out[0] if isinstance(out, tuple) else out
                token = int(self._exit_logits(hidden[:, -1]).argmax(-1))
                estimate *= a
                child = tree.add_child(node, token, estimate, self.name)
                if child is None:
                    break
                node = child
                self.drafted += 1

    def update(self, tree: DraftTree, topk, accepted: list[int], context: list[int], call: EarlyExitCall) -> None:
        """Score one candidate exit (in turn) on the positions the target just verified and accepted.

        One head per scored step, every step while warming up and then every `score_every` steps, the interval
        doubling (up to MAX_SCORE_INTERVAL) while DEL keeps decoding plainly: on a small model with a large
        vocabulary the head costs a fifth of a forward, so scoring every exit often would cost more than an
        unpaying exit ever saves."""
        self.accepted += len(accepted)
        self._updates += 1
        if self._updates > WARM_UP_STEPS * len(self.exits):
            self._since_scored += 1
            if self._since_scored < self._interval:
                self.captured.clear()
                return
        self._since_scored = 0
        nodes = [0, *accepted]
        # the target's token after each of these nodes: the accepted children, then the bonus token
        chosen = context[len(context) - len(nodes):]
        rows = torch.tensor(nodes)
        wanted = torch.tensor(chosen)
        layer = self.fixed_exit if self.fixed_exit is not None else self.exits[self._turn % len(self.exits)]
        self._turn += 1
        hidden = self.captured.get(layer)
        if hidden is not None and hidden.shape[1] == len(tree.tokens):
            predicted = self._exit_logits(hidden[0, rows.to(hidden.device)]).argmax(-1).cpu()
            for hit in (predicted == wanted).tolist():
                self.observations[layer] += 1
                weight = max(self.rate, 1.0 / (self.observations[layer] + 1))
                self.agreement[layer] += weight * (float(hit) - self.agreement[layer])
        self.captured.clear()
        paying = self.choose()[1] > 0
        self._interval = self.score_every if paying else min(self._interval * 2, MAX_SCORE_INTERVAL)

    def stats(self) -> dict[str, Any]:
        return {"agreement_by_exit": {layer: round(value, 3) for layer, value in self.agreement.items()},
                "head_cost_in_layers": round(self.head_cost, 2),
                "observations": sum(self.observations.values()),
                "exit_chosen": dict(sorted(self.exit_counts.items())),
                "drafted_tokens": self.drafted, "accepted_tokens": self.accepted,
                "acceptance_rate": self.accepted / self.drafted if self.drafted else 0.0}


@dataclasses.dataclass
class EarlyExitParams:
    exits: list[int] | None = param(None, help="candidate exit layers (1 = after the first layer); null: four "
                                               "layers spread over the first half of the depth", max_items=256)
    exit_layer: int | None = param(None, help="always exit after this many layers (null: DEL picks per step)", ge=1)
    draft_length: int | None = param(None, help="always draft this many tokens (null: DEL picks per step)",
                                     ge=1, le=32)
    max_draft_length: int = param(8, help="longest chain DEL may pick", ge=1, le=32)
    prior_agreement: float = param(0.0, help="agreement assumed for an exit before it is scored; the shadow test "
                                             "scores every exit during plain decoding, so none needs a trial draft",
                                   ge=0.0, le=1.0)
    rate: float = param(0.05, help="weight of each new observation in an exit's running agreement once it has "
                                   "about 1/rate of them (before that, a plain mean)", gt=0.0, le=1.0)
    score_every: int = param(4, help="score one candidate exit (in turn) on every n-th verified step while an "
                                     "exit pays (each scoring runs the final norm and head on a few rows); the "
                                     "interval doubles while none does", ge=1, le=1024)


@register
class EarlyExit(DrafterTechnique):
    """Lossless self-speculative `generate`: the target's first layers draft (no second model), DEL picks the
    exit layer and the draft length from running acceptance statistics.

    Example:
        >>> handle = hfpatch.patch(model, "early-exit")
        >>> model.generate(**inputs, max_new_tokens=64)
        >>> handle.stats["early_exit"]["drafters"]["early_exit"]["agreement_by_exit"]
    """

    name = "early_exit"
    summary = "Self-speculative drafting with the target's first L layers + norm + head; DEL picks L and k (lossless)"
    Params = EarlyExitParams
    # Families whose decoder layers take (hidden, position_embeddings, cache) and share one rotary embedding;
    # sliding-window families are left out (a shared-KV view past the window is not built).
    model_types: ClassVar[frozenset[str]] = frozenset({"llama", "qwen2", "qwen3", "phi3"})

    def node_budget(self) -> int:
        return self.params.draft_length or self.params.max_draft_length

    def make_drafter(self, model) -> EarlyExitDrafter:
        layers = len(arch.adapter_for(model).decoder_layers())
        p = self.params
        half = max(layers // 2, 1)
        exits = sorted(set(p.exits)) if p.exits else sorted({max(1, round(half * i / 4)) for i in range(1, 5)})
        if p.exit_layer is not None:
            exits = sorted(set(exits) | {p.exit_layer})
        if exits[0] < 1 or exits[-1] >= layers:
            raise UnsupportedModelError(f"{self.name}: exit layers must be in [1, {layers - 1}] for this "
                                        f"{layers}-layer model, got {exits}")
        if compat.has_sliding_window_layers(model.config):
            raise UnsupportedModelError(f"{self.name}: sliding-window models are not supported")
        drafter = EarlyExitDrafter(model, exits, p.max_draft_length, p.rate, p.prior_agreement, p.exit_layer,
                                   p.draft_length, p.score_every)
        if drafter.rotary is None:
            raise UnsupportedModelError(f"{self.name}: {type(model).__name__} has no shared rotary embedding")
        return drafter

    def apply(self, model, ctx) -> None:
        super().apply(model, ctx)
        for layer in self.drafter.exits:
            ctx.record(primitives.add_forward_hook(self.drafter.layers[layer - 1], self.drafter.capture_hook(layer)))
