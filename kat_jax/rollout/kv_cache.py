"""Host-side bookkeeping of the paged KV cache: a block allocator with reference counts and a
radix (prefix) tree of cached blocks keyed by token ids, as SGLang's RadixAttention.

    pool = BlockAllocator(num_blocks)            # block 0 is the trash block, never handed out
    tree = PrefixCache(pool, block_size)
    blocks = tree.match(tokens)                  # longest cached prefix, whole blocks; +1 ref each
    tree.insert(tokens, blocks)                  # full blocks of a finished sequence become shared
    pool.release(blocks)                         # the sequence's own references

A tree node holds one full block (block_size token ids) and one reference to it; a running
sequence holds one reference to each block of its table. A block returns to the free list when
its last reference goes. Eviction (evict, called by the engine when an allocation does not fit)
removes least-recently-used leaves that only the tree references, so memory stays within the
pool (the budget) and a cached prefix lives as long as there is room for it.
"""

from __future__ import annotations

import heapq
import itertools


class BlockAllocator:
    """Blocks 1 .. num_blocks - 1 with reference counts (block 0: trash)."""

    def __init__(self, num_blocks: int):
        if num_blocks < 2:
            raise ValueError(f"a KV pool needs at least 2 blocks, got {num_blocks}")
        self.num_blocks = num_blocks
        self.refs = [0] * num_blocks
        self.free = list(range(num_blocks - 1, 0, -1))

    def alloc(self, n: int) -> list[int] | None:
        """n fresh blocks (one reference each), or None when fewer than n are free."""
        if n > len(self.free):
            return None
        out = [self.free.pop() for _ in range(n)]
        for b in out:
            self.refs[b] = 1
        return out

    def retain(self, blocks: list[int]) -> None:
        for b in blocks:
            self.refs[b] += 1

    def release(self, blocks: list[int]) -> None:
        for b in blocks:
            self.refs[b] -= 1
            if self.refs[b] == 0:
                self.free.append(b)


class _Node:
    __slots__ = ("key", "block", "parent", "children", "last_used")

    def __init__(self, key, block, parent, last_used):
        self.key, self.block, self.parent = key, block, parent
        self.children: dict[tuple[int, ...], _Node] = {}
        self.last_used = last_used


class PrefixCache:
    """A radix tree of full cache blocks: the path to a node spells the token ids of every block
    before it, so a block's keys and values (which depend on all earlier tokens) are reused only
    after the same prefix."""

    def __init__(self, pool: BlockAllocator, block_size: int):
        self.pool, self.block_size = pool, block_size
        self.root = _Node((), -1, None, 0)
        self._clock = itertools.count(1)
        self.cached_blocks = 0

    def match(self, tokens: list[int]) -> list[int]:
        """Blocks of the longest cached prefix of tokens (whole blocks), one new reference each
        for the caller; the matched nodes become most recently used."""
        node, out, bs = self.root, [], self.block_size
        now = next(self._clock)
        for i in range(len(tokens) // bs):
            child = node.children.get(tuple(tokens[i * bs:(i + 1) * bs]))
            if child is None:
                break
            child.last_used = now
            out.append(child.block)
            node = child
        self.pool.retain(out)
        return out

    def insert(self, tokens: list[int], blocks: list[int]) -> None:
        """Cache the full blocks of a sequence whose first len(tokens) positions are computed
        (blocks: its table). A prefix already cached keeps its block (the sequence's duplicate is
        freed when the sequence releases it)."""
        node, bs = self.root, self.block_size
        now = next(self._clock)
        for i in range(min(len(tokens) // bs, len(blocks))):
            key = tuple(tokens[i * bs:(i + 1) * bs])
            child = node.children.get(key)
            if child is None:
                child = _Node(key, blocks[i], node, now)
                node.children[key] = child
                self.pool.retain([blocks[i]])
                self.cached_blocks += 1
            child.last_used = now
            node = child

    def evict(self, n: int) -> int:
        """Free up to n blocks by removing least-recently-used leaves that no running sequence
        references (a parent whose last child goes becomes a leaf in turn); returns how many
        were freed."""
        def evictable(x):
            return x is not self.root and not x.children and self.pool.refs[x.block] == 1

        heap = [(x.last_used, id(x), x) for x in self._nodes() if evictable(x)]
        heapq.heapify(heap)
        freed = 0
        while freed < n and heap:
            _, _, leaf = heapq.heappop(heap)
            del leaf.parent.children[leaf.key]
            self.pool.release([leaf.block])
            self.cached_blocks -= 1
            freed += 1
            if evictable(leaf.parent):
                heapq.heappush(heap, (leaf.parent.last_used, id(leaf.parent), leaf.parent))
        return freed

    def clear(self) -> None:
        """Drop every cached prefix (e.g. after a weight update: they were computed with the old
        weights)."""
        for node in self._nodes():
            self.pool.release([node.block])
        self.root.children = {}
        self.cached_blocks = 0

    def _nodes(self):
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            yield node
