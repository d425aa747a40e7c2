"""Choosing and emitting tokens exactly as plain decoding would, and accepting a verified tree path.

Every token of a served call, drafted or not, goes through `Emitter.next_token`: the logits processors see
the sequence so far, the token is the argmax (greedy) or one sample of the processed distribution, then it
is appended, streamed and checked against the stopping criteria, in that order, one token at a time. That
is why a stop (EOS, max_new_tokens, a stop string) inside an accepted run cuts exactly where plain decoding
stops, and why sampling draws from the random generator exactly as often as plain decoding does.
"""
from __future__ import annotations

import torch

from ... import compat
from .tree import DraftTree


class Emitter:
    """The growing output of one generate call: sequence, context list, scores/logits wanted, streamer."""

    def __init__(self, input_ids: torch.Tensor, logits_processor, stopping_criteria, generation_config,
                 streamer=None):
        self.input_ids = input_ids
        #: the same sequence as a list of ints (the drafters' view); grows with `input_ids`
        self.context: list[int] = input_ids[0].tolist()
        self.prompt_length = input_ids.shape[1]
        self._logits_processor = logits_processor
        self._stopping_criteria = stopping_criteria
        self._do_sample = generation_config.do_sample
        self._return_dict = generation_config.return_dict_in_generate
        self.scores: list[torch.Tensor] | None = [] if self._return_dict and generation_config.output_scores else None
        self.logits: list[torch.Tensor] | None = [] if self._return_dict and generation_config.output_logits else None
        self._streamer = streamer

    @property
    def length(self) -> int:
        """Tokens in the sequence, prompt included."""
        return self.input_ids.shape[1]

    @property
    def new_tokens(self) -> int:
        return self.length - self.prompt_length

    def choose(self, raw_logits: torch.Tensor) -> tuple[int, torch.Tensor]:
        """The token plain decoding picks from these raw logits [1, vocab], and the processed scores."""
        scores = self._logits_processor(self.input_ids, raw_logits)
        if self._do_sample:
            token = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1)
        else:
            token = torch.argmax(scores, dim=-1)
        return int(token), scores

    def emit(self, token: int, scores: torch.Tensor, raw_logits: torch.Tensor) -> bool:
        """Append one token; True when the stopping criteria end generation here."""
        self.input_ids = torch.cat([self.input_ids, self.input_ids.new_tensor([[token]])], dim=-1)
        self.context.append(token)
        if self.scores is not None:
            self.scores.append(scores)
        if self.logits is not None:
            self.logits.append(raw_logits)
        if self._streamer is not None:
            self._streamer.put(self.input_ids.new_tensor([token]).cpu())
        scores_so_far = tuple(self.scores) if self.scores is not None else None
        return bool(self._stopping_criteria(self.input_ids, scores_so_far).any())

    def next_token(self, raw_logits: torch.Tensor) -> tuple[int, bool]:
        """Choose and emit the next token: (token, whether generation must stop)."""
        token, scores = self.choose(raw_logits)
        return token, self.emit(token, scores, raw_logits)

    def close(self) -> None:
        if self._streamer is not None:
            self._streamer.end()

    def result(self, cache):
        """What `generate` returns: the sequences, or a `GenerateDecoderOnlyOutput` when a dict was asked for."""
        if not self._return_dict:
            return self.input_ids
        return compat.decoder_only_generate_output(
            sequences=self.input_ids,
            scores=tuple(self.scores) if self.scores is not None else None,
            logits=tuple(self.logits) if self.logits is not None else None,
            cache=cache,
        )


def accept_path(out: Emitter, tree: DraftTree, node_logits: torch.Tensor) -> tuple[list[int], bool]:
    """Walk down a verified tree, emitting at each node the token plain decoding chooses there.

    `node_logits` [nodes, vocab] are the target's raw logits at every node (fp32). The walk follows the
    child holding the chosen token and ends at a node without one (that token is the bonus token) or at a
    stop. Returns the accepted drafted nodes, root's child first, and whether generation must stop.
    """
    accepted: list[int] = []
    node = 0
    while True:
        token, done = out.next_token(node_logits[node : node + 1].clone())
        child = tree.children[node].get(token)
        if done or child is None:
            return accepted, done
        accepted.append(child)
        node = child
