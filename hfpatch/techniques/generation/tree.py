"""Draft trees: a trie of candidate continuations rooted at the last accepted token.

Node 0 is the root (the last accepted token, whose KV is not cached yet); every other node is one drafted
token with a parent. Several drafters add paths into one tree; shared prefixes are stored once, so the
node budget counts distinct candidates only.

Drafters may attach an estimate of the probability that a node gets accepted (its whole path matches the
target). A node proposed several times keeps the highest estimate: drafters that agree are mostly right or
wrong together (measured: adding their estimates as independent evidence over-predicted acceptance), so
agreement is not counted twice. `select` keeps the most probable nodes, which is how an adaptive tree is
cut down to the size worth verifying.
"""
from __future__ import annotations

import torch


class DraftTree:
    """A token trie with a node budget.

    Example:
        >>> tree = DraftTree(root_token=5, max_nodes=8)
        >>> tree.add_path(0, [7, 9])     # 5 -> 7 -> 9
        >>> tree.add_path(0, [7, 3])     # shares the node for 7
        >>> tree.tokens, tree.parents
        ([5, 7, 9, 3], [-1, 0, 1, 1])
    """

    def __init__(self, root_token: int, max_nodes: int, max_depth: int | None = None):
        self.tokens: list[int] = [root_token]
        self.parents: list[int] = [-1]
        self.depths: list[int] = [0]
        self.children: list[dict[int, int]] = [{}]
        #: per node: drafter name -> that drafter's estimate that the node is accepted
        self.estimates: list[dict[str, float]] = [{}]
        #: drafted nodes allowed besides the root
        self.max_nodes = max_nodes
        self.max_depth = max_depth

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def num_drafted(self) -> int:
        return len(self.tokens) - 1

    @property
    def full(self) -> bool:
        return self.num_drafted >= self.max_nodes

    def add_child(self, parent: int, token: int, estimate: float | None = None, source: str = "") -> int | None:
        """Index of the child of `parent` holding `token` (created if needed); None when over budget/depth.

        `estimate`: the drafter `source`'s probability that this node is accepted (see `acceptance`).
        """
        existing = self.children[parent].get(token)
        if existing is not None:
            if estimate is not None:
                own = self.estimates[existing]
                own[source] = max(own.get(source, 0.0), estimate)
            return existing
        depth = self.depths[parent] + 1
        if self.full or (self.max_depth is not None and depth > self.max_depth):
            return None
        index = len(self.tokens)
        self.tokens.append(token)
        self.parents.append(parent)
        self.depths.append(depth)
        self.children.append({})
        self.estimates.append({} if estimate is None else {source: estimate})
        self.children[parent][token] = index
        return index

    def add_path(self, parent: int, tokens) -> int:
        """Add a chain of tokens below `parent`; returns how many of them are in the tree afterwards."""
        added = 0
        for token in tokens:
            child = self.add_child(parent, int(token))
            if child is None:
                break
            parent = child
            added += 1
        return added

    def acceptance(self, node: int) -> float:
        """Estimated probability that `node` is accepted: the highest estimate of the drafters that proposed it.

        A child never scores above its parent, because each drafter's own estimate for a child is at most
        its estimate for the parent; `select` relies on that to keep every kept node's ancestors.
        """
        return max(self.estimates[node].values(), default=0.0)

    def ranked_nodes(self) -> list[tuple[int, float]]:
        """Drafted nodes with their acceptance estimates, most probable first (parents before children on ties)."""
        scored = [(node, self.acceptance(node)) for node in range(1, len(self.tokens))]
        scored.sort(key=lambda item: (-item[1], item[0]))
        return scored

    def select(self, nodes) -> "DraftTree":
        """A new tree holding the root and the given drafted nodes (each one's parent must be among them)."""
        keep = sorted(set(nodes))
        tree = DraftTree(self.tokens[0], max_nodes=len(keep), max_depth=self.max_depth)
        new_index = {0: 0}
        for node in keep:
            parent = new_index.get(self.parents[node])
            if parent is None:
                raise ValueError(f"select: node {node} is kept without its parent {self.parents[node]}")
            new_index[node] = tree.add_child(parent, self.tokens[node])
            tree.estimates[new_index[node]] = dict(self.estimates[node])
        return tree

    def path_to(self, node: int) -> list[int]:
        """Node indices from the root's first child down to `node` (empty for the root)."""
        path = []
        while node > 0:
            path.append(node)
            node = self.parents[node]
        return path[::-1]

    def attention_mask(self, past_length: int, dtype: torch.dtype, device: torch.device,
                       window: int | None = None) -> torch.Tensor:
        """Additive mask (1, 1, n, past+n): every node sees the whole cache, its ancestors and itself.

        A float mask (0 / dtype min) rather than a bool one: eager attention silently misreads bool masks.
        `window`: the mask of a sliding-window layer, whose `past_length` cached positions are the ones just
        before the root; a node at depth d then sees only positions less than `window` before its own (the
        tree must be shallower than the window, so ancestors always are).
        """
        n = len(self.tokens)
        # Parents always precede their children, so each row is its parent's row plus the node itself.
        allowed = torch.eye(n, dtype=torch.bool)
        for node in range(1, n):
            allowed[node] |= allowed[self.parents[node]]
        tree_part = torch.zeros(n, n, dtype=dtype)
        tree_part.masked_fill_(~allowed, torch.finfo(dtype).min)
        past_part = torch.zeros(n, past_length, dtype=dtype)
        if window is not None:
            # column j holds position root - past_length + j; node d at root + d sees it when j > past + d - window
            depth = torch.tensor(self.depths)[:, None]
            column = torch.arange(past_length)[None, :]
            past_part.masked_fill_(column <= past_length + depth - window, torch.finfo(dtype).min)
        return torch.cat([past_part, tree_part], dim=1).to(device)[None, None]

    def position_ids(self, root_position: int, device: torch.device) -> torch.Tensor:
        return (torch.tensor(self.depths, dtype=torch.long) + root_position).to(device)[None]

    def input_ids(self, device: torch.device) -> torch.Tensor:
        return torch.tensor(self.tokens, dtype=torch.long, device=device)[None]
