"""Preallocated KV caches for streaming generation, with in-place and zero-copy forks.

Layout: per layer, K (post-norm, post-RoPE) and V of shape [rows, capacity, H, D]. The cache holds only the
PAST of the chunk being generated: a chunk's own K/V are passed to the attention separately (the chunk
attends to [past ; itself]) and are written once, by the clean-context "commit" forward. Denoising steps
therefore never write to the cache, and the last chunk of a video is never written at all.

Positions are Python ints shared by all rows of a batch (every row is at the same chunk), so a forward
never reads a device value back (no `.item()`); row indices are device tensors.

Rolling window (Self-Forcing's local_attn_size with sink frames): the storage becomes a ring. Slots
[0, sink) are pinned; later tokens go to sink + (j - sink) % (capacity - sink). Attention is unmasked over
the valid slots, so their order does not matter and eviction is a plain overwrite: no copies.

Forks, for AR-CoPO's G branches at the pivot chunk:
- in place (`fork_`): one launch of the C++ op copies a parent row's valid tokens into child rows;
- zero-copy (`branch`): a new cache whose rows hold only the branches' own chunks and read the shared
  prefix through the attention kernel's prefix segment (parent tensors, parent row, prefix length).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ops


@dataclass
class CrossKV:
    """Cross-attention K/V per layer ([text_rows, text_len, H, D]), computed once per prompt. `rows` maps
    query rows to text rows (AR-CoPO: every branch of a group reads the group's single text row)."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    rows: torch.Tensor | None = None

    def select(self, rows: torch.Tensor | None) -> CrossKV:
        return CrossKV(self.k, self.v, rows)

    def layer(self, i: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.k[i], self.v[i]
        if self.rows is not None:
            return k[self.rows], v[self.rows]
        if k.shape[0] == batch:
            return k, v
        if k.shape[0] == 1:
            return k.expand(batch, *k.shape[1:]), v.expand(batch, *v.shape[1:])
        raise ValueError(f"cross-attention cache has {k.shape[0]} text rows for a batch of {batch}; pass rows")

    @property
    def num_rows(self) -> int:
        return self.k[0].shape[0]


@dataclass
class _Storage:
    k: list[torch.Tensor]
    v: list[torch.Tensor]
    capacity: int
    frame_tokens: int
    sink_tokens: int = 0
    ring: bool = False
    # zero-copy prefix segment: (parent k list, parent v list, parent row, prefix tokens)
    prefix: tuple[list[torch.Tensor], list[torch.Tensor], int, int] | None = None
    total_tokens: int = 0  # absolute tokens committed (prefix included): shared by every view


class KVCache:
    """Self-attention KV cache of all layers for `rows` samples. See the module docstring."""

    def __init__(self, storage: _Storage, query_rows: torch.Tensor | None = None):
        self._s = storage
        self.query_rows = query_rows
        # the attention kernel's row table, converted once per view instead of once per layer and step
        self._rows32 = None if query_rows is None else query_rows.to(torch.int32)

    @property
    def total_tokens(self) -> int:
        """Absolute tokens committed so far (the next chunk starts here); shared by all views."""
        return self._s.total_tokens

    # -- construction ----------------------------------------------------------------------------------

    @classmethod
    def allocate(
        cls,
        *,
        num_layers: int,
        rows: int,
        capacity_tokens: int,
        num_heads: int,
        head_dim: int,
        frame_tokens: int,
        device=None,
        dtype=torch.bfloat16,
        ring: bool = False,
        sink_tokens: int = 0,
    ) -> KVCache:
        if rows < 1:
            raise ValueError(f"rows must be >= 1, got {rows}")
        if capacity_tokens < 0 or capacity_tokens % frame_tokens:
            raise ValueError(f"capacity_tokens ({capacity_tokens}) must be a non-negative multiple of frame_tokens ({frame_tokens})")
        if ring and not 0 <= sink_tokens < capacity_tokens:
            raise ValueError(
                f"a rolling window needs 0 <= sink tokens ({sink_tokens}) < past capacity ({capacity_tokens}): "
                "make local_attn_frames larger than chunk_frames + sink_frames"
            )
        shape = (rows, capacity_tokens, num_heads, head_dim)
        k = [torch.empty(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        v = [torch.empty(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        return cls(_Storage(k, v, capacity_tokens, frame_tokens, sink_tokens, ring))

    @classmethod
    def for_model(
        cls,
        cfg,
        *,
        rows: int,
        num_chunks: int,
        frame_tokens: int,
        device=None,
        dtype=torch.bfloat16,
        local_attn_frames: int | None = None,
        sink_frames: int = 0,
    ) -> KVCache:
        """A cache for `num_chunks` chunks of cfg.chunk_frames frames. Without a window it holds the past of
        the last chunk, (num_chunks - 1) chunks; with local_attn_frames (total frames visible to a chunk,
        itself and the sink included) it holds local_attn_frames - chunk_frames frames as a ring."""
        chunk = cfg.chunk_frames * frame_tokens
        if local_attn_frames is None:
            cap, ring = (num_chunks - 1) * chunk, False
        else:
            cap, ring = (local_attn_frames - cfg.chunk_frames) * frame_tokens, True
        return cls.allocate(
            num_layers=cfg.num_layers,
            rows=rows,
            capacity_tokens=cap,
            num_heads=cfg.num_heads,
            head_dim=cfg.head_dim,
            frame_tokens=frame_tokens,
            device=device,
            dtype=dtype,
            ring=ring,
            sink_tokens=sink_frames * frame_tokens,
        )

    # -- bookkeeping ------------------------------------------------------------------------------------

    @property
    def rows(self) -> int:
        return self._s.k[0].shape[0] if self._s.k else 0

    @property
    def num_layers(self) -> int:
        return len(self._s.k)

    @property
    def capacity(self) -> int:
        return self._s.capacity

    @property
    def frame_tokens(self) -> int:
        return self._s.frame_tokens

    @property
    def prefix_tokens(self) -> int:
        return self._s.prefix[3] if self._s.prefix else 0

    @property
    def own_tokens(self) -> int:
        """Tokens committed to this cache's own storage (beyond a zero-copy prefix)."""
        return self.total_tokens - self.prefix_tokens

    @property
    def length(self) -> int:
        """Valid tokens in the own storage (what the attention reads from it)."""
        return min(self.own_tokens, self._s.capacity)

    @property
    def start_frame(self) -> int:
        """Absolute latent-frame index of the next chunk (its RoPE time offset)."""
        return self.total_tokens // self._s.frame_tokens

    @property
    def zero_copy(self) -> bool:
        return self._s.prefix is not None

    @property
    def dtype(self) -> torch.dtype:
        return self._s.k[0].dtype

    @property
    def device(self) -> torch.device:
        return self._s.k[0].device

    def nbytes(self) -> int:
        """Bytes of this cache's own storage (a zero-copy prefix is owned by its parent)."""
        return sum(t.numel() * t.element_size() for t in (*self._s.k, *self._s.v))

    def view(self, rows: torch.Tensor | None) -> KVCache:
        """The same storage and position, read and written by a batch whose row b is cache row rows[b]."""
        if rows is not None:
            rows = torch.as_tensor(rows, dtype=torch.int64, device=self.device)
        return KVCache(self._s, rows)

    def rewind(self, total_tokens: int) -> None:
        """Forget everything after `total_tokens` (the next micro-batch of branches restarts at the pivot)."""
        if not self.prefix_tokens <= total_tokens <= self.total_tokens:
            raise ValueError(f"can rewind to [{self.prefix_tokens}, {self.total_tokens}] tokens, not {total_tokens}")
        if self._s.ring and total_tokens < self.total_tokens and self.own_tokens > self._s.capacity:
            raise ValueError("a rolling-window cache that has wrapped cannot be rewound")
        self._s.total_tokens = total_tokens

    def reset(self) -> None:
        """Empty the cache for a new video (positions only: stale data past the valid length is never read)."""
        if self.zero_copy:
            raise ValueError("a zero-copy branch cannot be reset (its prefix belongs to the parent)")
        self._s.total_tokens = 0

    def storage_tensors(self) -> list[torch.Tensor]:
        """This cache's own K and V tensors of every layer (not a zero-copy prefix)."""
        return [*self._s.k, *self._s.v]

    def check_fits(self, num_tokens: int) -> None:
        """Raise unless `num_tokens` more tokens can be committed."""
        if not self._s.ring and self.own_tokens + num_tokens > self._s.capacity:
            raise ValueError(
                f"KV cache full: it holds {self._s.capacity} tokens past a prefix of {self.prefix_tokens}; "
                f"{self.own_tokens} are used and {num_tokens} more were asked for (allocate more chunks)"
            )

    # -- the attention layer's interface ----------------------------------------------------------------

    def _batch_rows(self, batch: int) -> torch.Tensor | None:
        if self.query_rows is not None:
            if self.query_rows.shape[0] != batch:
                raise ValueError(f"cache view maps {self.query_rows.shape[0]} rows, the batch has {batch}")
            return self.query_rows
        if batch > self.rows:
            raise ValueError(f"batch of {batch} exceeds the cache's {self.rows} rows")
        return None

    def _prefix_rows(self, batch: int, row: int, device) -> torch.Tensor:
        # memoised: built once per batch size, not once per layer and step
        key = (batch, row, str(device))
        if getattr(self, "_prow_key", None) != key:
            self._prow, self._prow_key = torch.full((batch,), row, dtype=torch.int32, device=device), key
        return self._prow

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention of a chunk's q, k, v [B, n, H, D] over [prefix ; cached past ; the chunk]."""
        B = q.shape[0]
        rows = self._batch_rows(B)
        kw = {}
        if self._s.prefix is not None and self._s.prefix[3] > 0:
            pk, pv, prow, plen = self._s.prefix
            kw = dict(
                k_prefix=pk[layer],
                v_prefix=pv[layer],
                prefix_len=plen,
                prefix_rows=self._prefix_rows(B, prow, q.device),
            )
        n = self.length
        return ops.chunk_attention(
            q,
            k,
            v,
            self._s.k[layer] if n else None,
            self._s.v[layer] if n else None,
            n,
            None if rows is None else self._rows32,
            **kw,
            # the slots past `length` hold nothing yet (the chunk's own K/V go there at commit): an SDPA
            # backend may write k, v there and read [past ; own] as one view (not in a ring: slots wrap)
            cache_scratch=not self._s.ring,
        )

    def _slots(self, start: int, n: int) -> list[tuple[int, int, int]]:
        """(slot, token offset within the chunk, count) pieces where own tokens [start, start+n) live."""
        cap, sink = self._s.capacity, self._s.sink_tokens
        if not self._s.ring or start + n <= cap:
            return [(start, 0, n)]
        pieces, done = [], 0
        ring = cap - sink
        while done < n:
            j = start + done
            slot = j if j < cap else sink + (j - sink) % ring
            cnt = min(n - done, cap - slot)
            pieces.append((slot, done, cnt))
            done += cnt
        return pieces

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store a chunk's K/V [B, n, H, D] at the slots of the next n tokens (call advance() after the
        last layer). Rows follow the batch's row mapping."""
        B, n = k.shape[:2]
        self.check_fits(n)
        rows = self._batch_rows(B)
        kc, vc = self._s.k[layer], self._s.v[layer]
        for slot, off, cnt in self._slots(self.own_tokens, n):
            if rows is None:
                kc[:B, slot : slot + cnt].copy_(k[:, off : off + cnt])
                vc[:B, slot : slot + cnt].copy_(v[:, off : off + cnt])
            else:
                kc[rows, slot : slot + cnt] = k[:, off : off + cnt].to(kc.dtype)
                vc[rows, slot : slot + cnt] = v[:, off : off + cnt].to(vc.dtype)

    def advance(self, n: int) -> None:
        self.check_fits(n)
        self._s.total_tokens += n

    # -- forks ---------------------------------------------------------------------------------------

    def fork_(self, src_row: int, dst_rows) -> None:
        """In place: copy row src_row's valid tokens into each of dst_rows (all layers, K and V, one launch
        of the C++ op). Positions are shared by all rows, so only the data moves."""
        if self._s.ring:
            raise ValueError("forking a rolling-window cache is not supported (AR-CoPO uses the full cache)")
        dst = torch.as_tensor(dst_rows, dtype=torch.int64).reshape(-1)
        src = torch.full_like(dst, int(src_row))
        if self.length == 0 or dst.numel() == 0:
            return
        ops.kv_fork_([*self._s.k, *self._s.v], src.to(self.device), dst.to(self.device), self.length)

    def clone_row(self, row: int) -> KVCache:
        """A new 1-row cache holding a copy of row `row`'s valid tokens, sized to exactly those tokens."""
        if self._s.ring or self.zero_copy:
            raise ValueError("clone_row needs a plain (non-ring, non-branched) cache")
        n = self.length
        k0 = self._s.k[0]
        out = KVCache.allocate(
            num_layers=self.num_layers, rows=1, capacity_tokens=n, num_heads=k0.shape[2], head_dim=k0.shape[3],
            frame_tokens=self._s.frame_tokens, device=k0.device, dtype=k0.dtype,
        )
        for dst, src in zip((*out._s.k, *out._s.v), (*self._s.k, *self._s.v)):
            dst.copy_(src[row : row + 1, :n])
        out._s.total_tokens = self.total_tokens
        return out

    def branch(self, parent_row: int, rows: int, capacity_tokens: int | None = None) -> KVCache:
        """Zero-copy fork: a new cache of `rows` rows that reads this cache's row `parent_row` (its valid
        tokens) as a shared prefix and stores only what comes after. capacity_tokens defaults to this
        cache's remaining capacity."""
        if self._s.ring or self.zero_copy:
            raise ValueError("zero-copy branches need a plain (non-ring, non-branched) parent cache")
        if not 0 <= parent_row < self.rows:
            raise ValueError(f"parent_row must be in [0, {self.rows}), got {parent_row}")
        cap = self._s.capacity - self.length if capacity_tokens is None else capacity_tokens
        k0 = self._s.k[0]
        child = KVCache.allocate(
            num_layers=self.num_layers,
            rows=rows,
            capacity_tokens=cap,
            num_heads=k0.shape[2],
            head_dim=k0.shape[3],
            frame_tokens=self._s.frame_tokens,
            device=k0.device,
            dtype=k0.dtype,
        )
        child._s.prefix = (self._s.k, self._s.v, int(parent_row), self.length)
        child._s.total_tokens = self.total_tokens
        return child
