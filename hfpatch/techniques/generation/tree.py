"""Draft trees: a trie of candidate continuations rooted at the last accepted token.

Node 0 is the root (the last accepted token, whose KV is not cached yet); every other node is one drafted
token with a parent. Several drafters add paths into one tree; shared prefixes are stored once, so the
node budget counts distinct candidates only.
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

    def add_child(self, parent: int, token: int) -> int | None:
        """Index of the child of `parent` holding `token` (created if needed); None when over budget/depth."""
        existing = self.children[parent].get(token)
        if existing is not None:
            return existing
        depth = self.depths[parent] + 1
        if self.full or (self.max_depth is not None and depth > self.max_depth):
            return None
        index = len(self.tokens)
        self.tokens.append(token)
        self.parents.append(parent)
        self.depths.append(depth)
        self.children.append({})
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

    def path_to(self, node: int) -> list[int]:
        """Node indices from the root's first child down to `node` (empty for the root)."""
        path = []
        while node > 0:
            path.append(node)
            node = self.parents[node]
        return path[::-1]

    def attention_mask(self, past_length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Additive mask (1, 1, n, past+n): every node sees the whole cache, its ancestors and itself.

        A float mask (0 / dtype min) rather than a bool one: eager attention silently misreads bool masks.
        """
        n = len(self.tokens)
        # Parents always precede their children, so each row is its parent's row plus the node itself.
        allowed = torch.eye(n, dtype=torch.bool)
        for node in range(1, n):
            allowed[node] |= allowed[self.parents[node]]
        tree_part = torch.zeros(n, n, dtype=dtype)
        tree_part.masked_fill_(~allowed, torch.finfo(dtype).min)
        past_part = torch.zeros(n, past_length, dtype=dtype)
        return torch.cat([past_part, tree_part], dim=1).to(device)[None, None]

    def position_ids(self, root_position: int, device: torch.device) -> torch.Tensor:
        return (torch.tensor(self.depths, dtype=torch.long) + root_position).to(device)[None]

    def input_ids(self, device: torch.device) -> torch.Tensor:
        return torch.tensor(self.tokens, dtype=torch.long, device=device)[None]
