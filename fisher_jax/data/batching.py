"""Tokenisation and fixed-shape, length-bucketed batches.

Every batch has exactly ``batch_size`` rows and a sequence length taken from a short list of
buckets, so a jitted step compiles only a handful of shapes. A last partial batch is filled with
padding rows that have ``weights == 0`` (all pad tokens, ``attention_mask`` all 0, label 0): every
statistic and metric weights rows by ``weights``, so no example is ever dropped or counted twice.

Batch dict (numpy): ``input_ids``, ``attention_mask``, ``token_type_ids`` int32 ``[B, T]``;
``labels`` ``[B]`` int32 (classification) or float32 (regression); ``weights`` float32 ``[B]``.

Several processes (:mod:`fisher_jax.distributed`): every iterator yields this process's
contiguous slice of each global batch (:func:`make_local_batch`): rows ``p*k .. p*k+k-1`` of a
batch of ``B`` rows, ``k = ceil(B / n)``, padded to the length the whole global batch needs. The
processes' slices, one after the other, are the one-process batch (weight-0 rows appended when
``n`` does not divide ``B``). No process reads or tokenises the whole split
(:class:`SplitRows`, :func:`encode_rows`): process ``p`` reads only its part of the file (the
``p``-th of ``n`` byte ranges) and tokenises only the pass's rows in it; every row's length and
label (a few bytes each) are all-gathered, so every process plans the same length-bucketed
batches as one process would, and the global batches' token rows are all-gathered from the
processes that hold them as the batches are built.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np

from fisher_jax.data.glue import Examples, TaskSpec, get_task, load_split, normalize_split, split_reads_by_bytes
from fisher_jax.errors import FisherJaxError

DEFAULT_BUCKETS: tuple[int, ...] = (32, 64, 128)
LENGTH_GROUP_BATCHES = 100  # shuffle=True sorts by length within chunks of this many batches
_ENCODE_CHUNK = 4096  # texts per tokenizer call: bounded memory, still fast in the Rust backend


@dataclass
class Encoded:
    """Token ids of every example, unpadded, stored flat with offsets (no per-row objects).

    Row ``i`` is ``flat_ids[offsets[i]:offsets[i + 1]]`` (already truncated to ``max_length``,
    special tokens included); ``token_type_ids`` likewise.
    """

    flat_ids: np.ndarray  # int32 [total tokens]
    flat_type_ids: np.ndarray  # int8 [total tokens]
    offsets: np.ndarray  # int64 [N + 1]
    labels: np.ndarray  # int64 [N] or float32 [N]
    max_length: int
    pad_token_id: int
    task: str = ""
    split: str = ""
    spec: TaskSpec | None = field(default=None, repr=False)
    # One process's share of a pass (:func:`encode_rows` with several processes): every row's
    # length and label, token ids only where ``held`` (the other rows have empty extents).
    row_lengths: np.ndarray | None = field(default=None, repr=False)
    held: np.ndarray | None = field(default=None, repr=False)
    # plan_batch's all-gathered token rows of the next batches: (plan, {position: (ids, types)})
    _window: tuple | None = field(default=None, init=False, repr=False, compare=False)

    @functools.cached_property
    def lengths(self) -> np.ndarray:
        """Number of tokens of each example (int64 [N]), held here or not (computed once: every
        batch reads it)."""
        return np.diff(self.offsets) if self.row_lengths is None else self.row_lengths

    @property
    def is_regression(self) -> bool:
        return bool(np.issubdtype(self.labels.dtype, np.floating))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(input ids, token type ids) of example ``i``."""
        if self.held is not None and not self.held[i]:
            raise FisherJaxError(f"row {i} is tokenised by another process (this one holds its share only)")
        s, e = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.flat_ids[s:e], self.flat_type_ids[s:e]

    def subset(self, indices: Sequence[int] | np.ndarray) -> "Encoded":
        """The examples at ``indices``, in that order."""
        idx = np.asarray(indices, dtype=np.int64)
        extents = np.diff(self.offsets)[idx]  # the lengths, or 0 for rows another process holds
        offsets = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(extents, out=offsets[1:])
        positions = _gather_positions(self.offsets[idx], extents)
        return Encoded(self.flat_ids[positions], self.flat_type_ids[positions], offsets,
                       self.labels[idx], self.max_length, self.pad_token_id, self.task,
                       self.split, self.spec,
                       row_lengths=None if self.row_lengths is None else self.row_lengths[idx],
                       held=None if self.held is None else self.held[idx])


def _gather_positions(starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Flat positions ``starts[i] + 0..lens[i]-1`` for all i, concatenated, without a loop."""
    total = int(lens.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    row_of = np.repeat(np.arange(len(lens)), lens)
    first = np.zeros(len(lens), dtype=np.int64)
    np.cumsum(lens[:-1], out=first[1:])
    return starts[row_of] + (np.arange(total) - first[row_of])


def encode(tokenizer: Any, examples: Examples, max_length: int = 128) -> Encoded:
    """Tokenise every example (sentence pairs as pairs), truncating ``longest_first``.

    ``tokenizer`` is a Hugging Face tokenizer (``transformers.AutoTokenizer.from_pretrained``).
    No padding happens here: rows keep their own lengths so :func:`batches` can bucket them.
    Tokenizers without token type ids (DistilBERT) get zeros.
    """
    if max_length < 4:
        raise FisherJaxError(f"max_length must be at least 4 tokens, got {max_length}")
    n = len(examples)
    ids_parts: list[np.ndarray] = []
    type_parts: list[np.ndarray] = []
    lengths = np.zeros(n, dtype=np.int64)
    for start in range(0, n, _ENCODE_CHUNK):
        stop = min(start + _ENCODE_CHUNK, n)
        text_a = examples.text_a[start:stop]
        text_b = None if examples.text_b is None else examples.text_b[start:stop]
        out = tokenizer(text_a, text_b, truncation="longest_first", max_length=max_length,
                        padding=False, return_attention_mask=False, return_token_type_ids=True)
        types = out.get("token_type_ids")
        for j, ids in enumerate(out["input_ids"]):
            lengths[start + j] = len(ids)
            ids_parts.append(np.asarray(ids, dtype=np.int32))
            type_parts.append(np.asarray(types[j] if types is not None else [0] * len(ids),
                                         dtype=np.int8))
    if n and lengths.max() > max_length:  # a tokenizer that ignored truncation
        raise FisherJaxError(f"tokenizer returned {lengths.max()} tokens > max_length {max_length}")
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    pad = getattr(tokenizer, "pad_token_id", None)
    return Encoded(
        flat_ids=np.concatenate(ids_parts) if ids_parts else np.zeros(0, np.int32),
        flat_type_ids=np.concatenate(type_parts) if type_parts else np.zeros(0, np.int8),
        offsets=offsets, labels=np.asarray(examples.labels), max_length=int(max_length),
        pad_token_id=int(pad) if pad is not None else 0, task=examples.task,
        split=examples.split, spec=examples.spec)


class SplitRows:
    """The rows of one split, read when asked for: ``len()`` is the split's row count,
    :meth:`take` the examples of chosen rows.

    One process reads the split once and keeps it. Process ``p`` of ``n`` reads and keeps only
    its part: the rows whose lines start in the ``p``-th of ``n`` equal byte ranges of the file
    (a local GLUE file, a task file's TSV or JSON Lines file), or else (quoted CSV, a JSON array,
    the Hub) rows ``[p*N/n, (p+1)*N/n)`` after a counting pass; the parts' row counts are
    all-gathered, so every process knows which rows each holds (:attr:`bounds`). A bad row stops
    every process (:func:`fisher_jax.distributed.all_succeed`).
    """

    def __init__(self, task: str | TaskSpec, split: str, glue_dir: str | os.PathLike | None = None):
        self.spec = get_task(task)
        self.split = normalize_split(self.spec, split)
        self.glue_dir = glue_dir
        self._mine: Examples | None = None  # this process's rows (one process: all of them)
        self._bounds: np.ndarray | None = None  # [n + 1]: process q holds rows bounds[q]:bounds[q+1]

    def _read(self) -> None:
        if self._bounds is not None:
            return
        from ..distributed import all_succeed, allgather, process_part

        p, n = process_part()
        if n == 1:
            self._mine = load_split(self.spec, self.split, self.glue_dir)
            self._bounds = np.array([0, len(self._mine)])
            return

        def read() -> Examples:
            if split_reads_by_bytes(self.spec, self.split, self.glue_dir):
                return load_split(self.spec, self.split, self.glue_dir, part=(p, n))
            total = int(load_split(self.spec, self.split, self.glue_dir, keep=lambda i: False).num_rows or 0)
            lo, hi = total * p // n, total * (p + 1) // n
            return load_split(self.spec, self.split, self.glue_dir, keep=lambda i: lo <= i < hi)

        self._mine = all_succeed(read)
        counts = allgather(np.asarray(len(self._mine), np.int32)).astype(np.int64)
        self._bounds = np.concatenate([[0], np.cumsum(counts)])
        if self._bounds[-1] == 0:
            raise FisherJaxError(f"{self.spec.name} {self.split}: no examples (empty dataset)")

    def __len__(self) -> int:
        self._read()
        return int(self._bounds[-1])

    @property
    def bounds(self) -> np.ndarray:
        """Row ``bounds[q]`` up to (not including) ``bounds[q + 1]`` are process ``q``'s."""
        self._read()
        return self._bounds

    def mine(self) -> tuple[int, int]:
        """The rows ``[lo, hi)`` this process holds."""
        from ..distributed import process_part

        p = process_part()[0]
        return int(self.bounds[p]), int(self.bounds[p + 1])

    def take(self, rows: Sequence[int] | np.ndarray) -> Examples:
        """The examples at split rows ``rows``, in that order (repeats allowed); with several
        processes only rows this process holds (:meth:`mine`)."""
        n = len(self)
        idx = np.asarray(rows, dtype=np.int64)
        if len(idx) and (idx.min() < 0 or idx.max() >= n):
            raise FisherJaxError(f"row {int(idx.min() if idx.min() < 0 else idx.max())} is outside "
                                 f"{self.spec.name} {self.split}'s {n} rows")
        lo, hi = self.mine()
        if len(idx) and (idx.min() < lo or idx.max() >= hi):
            raise FisherJaxError(f"rows outside [{lo}, {hi}) of {self.spec.name} {self.split} are read by "
                                 f"another process")
        if len(idx) == hi - lo and np.array_equal(idx, np.arange(lo, hi)):
            return self._mine
        return self._mine.subset(idx - lo)


def encode_rows(tokenizer: Any, source: SplitRows, rows: Sequence[int] | np.ndarray,
                max_length: int = 128) -> Encoded:
    """:func:`encode` of split rows ``rows`` (in that order) of ``source``.

    One process: ``encode(tokenizer, source.take(rows), max_length)``. Several: each process
    tokenises the rows of ``rows`` it holds (:meth:`SplitRows.mine`); every row's length and
    label are all-gathered, so the result knows them all (``lengths``, ``labels``, for planning
    batches) but holds token ids only for its own rows (``held``).
    :func:`make_local_batch` / :func:`plan_batch` all-gather the batches' token rows from their
    holders.
    """
    from ..distributed import allgather, process_part

    idx = np.asarray(rows, dtype=np.int64)
    if process_part()[1] == 1:
        return encode(tokenizer, source.take(idx), max_length)
    m = len(idx)
    lo, hi = source.mine()
    mine = np.flatnonzero((idx >= lo) & (idx < hi))  # positions in the pass, increasing
    enc = encode(tokenizer, source.take(idx[mine]), max_length)
    per = int(allgather(np.asarray(len(mine), np.int32)).max())
    regression = source.spec.is_regression
    send = np.full((2, per), -1, dtype=np.int32)  # positions, lengths; -1: padding
    send[0, :len(mine)], send[1, :len(mine)] = mine, enc.lengths
    values = np.zeros(per, dtype=np.float32 if regression else np.int32)
    values[:len(mine)] = enc.labels
    every, every_labels = allgather(send), allgather(values)
    lengths = np.zeros(m, dtype=np.int64)
    labels = np.zeros(m, dtype=np.float32 if regression else np.int64)
    for q in range(len(every)):
        real = every[q, 0] >= 0
        lengths[every[q, 0, real]] = every[q, 1, real]
        labels[every[q, 0, real]] = every_labels[q, real]
    held = np.zeros(m, dtype=bool)
    held[mine] = True
    offsets = np.zeros(m + 1, dtype=np.int64)
    np.cumsum(np.where(held, lengths, 0), out=offsets[1:])
    return Encoded(enc.flat_ids, enc.flat_type_ids, offsets, labels, enc.max_length, enc.pad_token_id,
                   enc.task, enc.split, enc.spec, row_lengths=lengths, held=held)


# --------------------------------------------------------------------------------------------
# batch plans: which examples go into which batch


def bucket_sizes(buckets: Sequence[int], max_length: int) -> tuple[int, ...]:
    """Sequence lengths a batch may have: the buckets below ``max_length``, then ``max_length``."""
    if any(int(b) < 1 for b in buckets):
        raise FisherJaxError(f"bucket sizes must be positive, got {list(buckets)}")
    return tuple(sorted({int(b) for b in buckets if int(b) < max_length} | {int(max_length)}))


def _check_sizes(batch_size: int, max_examples: int | None) -> None:
    if int(batch_size) < 1:
        raise FisherJaxError(f"batch_size must be positive, got {batch_size}")
    if max_examples is not None and int(max_examples) < 1:
        raise FisherJaxError(f"max_examples must be positive, got {max_examples}")


def select_examples(n: int, shuffle: bool = False, seed: int = 0,
                    max_examples: int | None = None) -> np.ndarray:
    """The examples a pass uses, in pass order: all (or the first ``max_examples``) of
    ``range(n)``, or of ``np.random.default_rng(seed).permutation(n)`` when shuffling.

    So ``max_examples`` with ``shuffle=True`` is a random subset, and a fixed one per seed.
    """
    order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
    return order[:max_examples] if max_examples is not None else order


# Every fine-tuning seed of a task holds out the same rows, so any checkpoint of a zoo can be
# scored on a slice that none of them trained on.
HELD_OUT_SEED = 0


def default_held_out(n: int) -> int:
    """Held-out rows of an ``n``-row training split by default: 10 %, at most 1000."""
    return min(1000, int(n) // 10)


def held_out_split(n: int, held_out: int, seed: int = HELD_OUT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """``(train rows, held-out rows)`` of an ``n``-row training split, both sorted.

    The ``held_out`` rows are a seeded random subset (``default_rng((seed, 2)).permutation(n)``'s
    first ``held_out``): fine-tuning never trains on them and selects its checkpoint on them.
    """
    held_out = int(held_out)
    if not 0 <= held_out < n:
        raise FisherJaxError(f"held_out must be in [0, {n}) for a split of {n} rows, got {held_out}")
    order = np.random.default_rng((int(seed), 2)).permutation(n)
    return np.sort(order[held_out:]), np.sort(order[:held_out])


def eval_subset(n: int, max_examples: int | None, seed: int = 0) -> np.ndarray:
    """Rows a capped evaluation scores, sorted: all of ``range(n)``, or a seeded random
    ``max_examples`` of them (``default_rng((seed, 3))``) — a sample, not the split's first rows."""
    if max_examples is None or int(max_examples) <= 0 or int(max_examples) >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng((int(seed), 3)).permutation(n)[:int(max_examples)])


def _group(order: np.ndarray, lengths: np.ndarray, batch_size: int, shuffle: bool,
           seed: int) -> list[np.ndarray]:
    """Cut ``order`` into batches; when shuffling, group similar lengths first.

    Length grouping: sort by length inside consecutive chunks of ``LENGTH_GROUP_BATCHES``
    batches, cut, then shuffle the order of the full batches (the partial batch stays last).
    Padding per batch stays small while batches still mix the whole data set over an epoch.
    A second generator, seeded with ``(seed, 1)``, shuffles the batch order so that the choice of
    examples (:func:`select_examples`) does not depend on it.
    """
    if shuffle:
        chunk = batch_size * LENGTH_GROUP_BATCHES
        parts = [order[s:s + chunk] for s in range(0, len(order), chunk)]
        order = np.concatenate(
            [p[np.argsort(lengths[p], kind="stable")] for p in parts]) if parts else order
    groups = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    if shuffle and groups:
        n_full = len(groups) if len(groups[-1]) == batch_size else len(groups) - 1
        perm = np.random.default_rng((seed, 1)).permutation(n_full)
        groups = [groups[i] for i in perm] + groups[n_full:]
    return groups


def batch_indices(encoded: Encoded, batch_size: int, shuffle: bool = False, seed: int = 0,
                  max_examples: int | None = None) -> list[np.ndarray]:
    """Example indices of every batch :func:`batches` yields (same arguments, same order)."""
    _check_sizes(batch_size, max_examples)
    order = select_examples(len(encoded), shuffle, seed, max_examples)
    return _group(order, encoded.lengths, int(batch_size), shuffle, seed)


def num_batches(encoded: Encoded | Examples | int, batch_size: int,
                max_examples: int | None = None) -> int:
    """How many batches a pass yields (for progress bars): ``ceil(min(n, max_examples) / B)``."""
    _check_sizes(batch_size, max_examples)
    n = encoded if isinstance(encoded, (int, np.integer)) else len(encoded)
    if max_examples is not None:
        n = min(n, int(max_examples))
    return math.ceil(n / int(batch_size))


# --------------------------------------------------------------------------------------------
# assembling batches


def batch_length(encoded: Encoded, indices: np.ndarray, sizes: Sequence[int]) -> int:
    """The padded length of a batch of ``indices``: the smallest of ``sizes`` that holds its longest row."""
    idx = np.asarray(indices, dtype=np.int64)
    longest = int(encoded.lengths[idx].max()) if len(idx) else 1
    fits = [s for s in sizes if s >= longest]
    if not fits:
        raise FisherJaxError(f"an example has {longest} tokens, more than the largest bucket "
                             f"{max(sizes)}")
    return fits[0]


def make_batch(encoded: Encoded, indices: np.ndarray, batch_size: int,
               sizes: Sequence[int], length: int | None = None) -> dict[str, np.ndarray]:
    """One padded batch of the examples ``indices`` (at most ``batch_size`` of them).

    ``T`` is ``length`` or else :func:`batch_length` (the smallest of ``sizes`` that holds the
    longest row). Rows past ``len(indices)`` are padding rows: pad ids, attention 0, label 0, weight 0.
    """
    idx = np.asarray(indices, dtype=np.int64)
    if len(idx) > batch_size:
        raise FisherJaxError(f"{len(idx)} examples do not fit in a batch of {batch_size}")
    T = batch_length(encoded, idx, sizes) if length is None else int(length)
    if encoded.held is not None and not encoded.held[idx].all():
        raise FisherJaxError("some of these rows are tokenised by another process: build the batch "
                             "with make_local_batch (every process at once)")
    ids, types = _token_rows(encoded, idx, T)
    return _assemble(encoded, idx, ids, types, batch_size, T)


def _token_rows(encoded: Encoded, idx: np.ndarray, T: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and type ids ``[len(idx), T]`` of rows this process holds (0 past each row's end)."""
    lens = encoded.lengths[idx]
    if len(idx) and int(lens.max()) > T:
        raise FisherJaxError(f"an example has {int(lens.max())} tokens, more than the batch length {T}")
    valid = np.arange(T)[None, :] < lens[:, None]
    positions = _gather_positions(encoded.offsets[idx], lens)
    ids = np.zeros((len(idx), T), dtype=np.int32)
    types = np.zeros((len(idx), T), dtype=np.int32)
    ids[valid] = encoded.flat_ids[positions]
    types[valid] = encoded.flat_type_ids[positions]
    return ids, types


def _assemble(encoded: Encoded, idx: np.ndarray, ids_rows: np.ndarray, type_rows: np.ndarray,
              batch_size: int, T: int) -> dict[str, np.ndarray]:
    """The batch dict of rows ``idx`` (their tokens given), padded to ``batch_size`` rows."""
    k = len(idx)
    valid = np.arange(T)[None, :] < encoded.lengths[idx][:, None]  # [k, T]
    ids = np.full((batch_size, T), encoded.pad_token_id, dtype=np.int32)
    ids[:k] = np.where(valid, ids_rows, encoded.pad_token_id)
    types = np.zeros((batch_size, T), dtype=np.int32)
    types[:k] = type_rows  # already 0 past each row's end
    mask = np.zeros((batch_size, T), dtype=np.int32)
    mask[:k] = valid
    label_dtype = np.float32 if encoded.is_regression else np.int32
    labels = np.zeros(batch_size, dtype=label_dtype)
    labels[:k] = encoded.labels[idx]
    weights = np.zeros(batch_size, dtype=np.float32)
    weights[:k] = 1.0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types,
            "labels": labels, "weights": weights}


EXCHANGE_WINDOW = 64  # batches whose token rows one all-gather brings (a share of a pass)


def _exchange_rows(encoded: Encoded, batches: Sequence[tuple[np.ndarray, int]]
                   ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Token ids and type ids ``[len(idx), T]`` of the rows of each ``(idx, T)``, each row from the
    process that holds it: one all-gather for all of them (every process calls it with the same
    batches), summed over processes. The message is padded to a power of two, so a pass compiles
    only a few all-gathers."""
    from ..distributed import allgather, padded_size

    blocks = []
    for idx, T in batches:
        mine = np.flatnonzero(encoded.held[idx])
        send = np.zeros((len(idx), 2 * T + 1), dtype=np.int32)
        send[mine, :T], send[mine, T:2 * T] = _token_rows(encoded, idx[mine], T)
        send[mine, 2 * T] = 1  # holders of the row: must come back as exactly 1
        blocks.append(send)
    sizes = [b.size for b in blocks]
    flat = np.zeros(padded_size(sum(sizes)), dtype=np.int32)
    flat[:sum(sizes)] = np.concatenate([b.ravel() for b in blocks])
    got = allgather(flat).sum(axis=0)
    out = []
    for (idx, T), block, start in zip(batches, blocks, np.cumsum([0] + sizes[:-1])):
        rows = got[start:start + block.size].reshape(block.shape)
        holders = rows[:, 2 * T]
        if np.any(holders != 1):
            bad = int(np.flatnonzero(holders != 1)[0])
            raise FisherJaxError(f"row {int(idx[bad])} of a batch is held by {int(holders[bad])} processes, not "
                                 f"one: every process must build the same batches from the same encode_rows")
        out.append((rows[:, :T], rows[:, T:2 * T]))
    return out


def make_local_batch(encoded: Encoded, indices: np.ndarray, batch_size: int, sizes: Sequence[int],
                     part: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """This process's slice of the global batch :func:`make_batch` would build.

    ``part = (p, n)`` (default: :func:`fisher_jax.distributed.process_part`): rows
    ``p*k .. p*k+k-1`` of the ``n*k``-row global batch, ``k = ceil(batch_size / n)``, at the
    global batch's length, so the ``n`` slices concatenated are ``make_batch(...)`` padded with
    weight-0 rows to ``n*k``. One process: exactly ``make_batch``.
    """
    from ..distributed import local_slice, process_part

    part = process_part() if part is None else part
    if part[1] == 1 and encoded.held is None:
        return make_batch(encoded, indices, batch_size, sizes)
    idx = np.asarray(indices, dtype=np.int64)
    if len(idx) > batch_size:
        raise FisherJaxError(f"{len(idx)} examples do not fit in a batch of {batch_size}")
    T = batch_length(encoded, idx, sizes)
    if encoded.held is None:
        sl, k = local_slice(batch_size, part)
        return make_batch(encoded, idx[sl], k, sizes, length=T)
    (rows,) = _exchange_rows(encoded, [(idx, T)])  # a share of the pass: rows from their holders
    return _local_part(encoded, idx, rows, batch_size, part)


def _local_part(encoded: Encoded, idx: np.ndarray, rows: tuple[np.ndarray, np.ndarray], batch_size: int,
                part: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """This process's slice of the global batch of rows ``idx``, given all its token rows."""
    from ..distributed import local_slice

    ids, types = rows
    sl, k = local_slice(batch_size, part)
    return _assemble(encoded, idx[sl], ids[sl], types[sl], k, ids.shape[1])


def plan_batch(encoded: Encoded, plan: Sequence[np.ndarray], position: int, batch_size: int,
               sizes: Sequence[int]) -> dict[str, np.ndarray]:
    """``make_local_batch(encoded, plan[position], ...)``, for a pass through ``plan`` in order.

    From a share of a pass (:func:`encode_rows`) the token rows of ``EXCHANGE_WINDOW`` batches
    (``position`` onwards) come in one all-gather and wait on ``encoded`` until their turn, instead
    of one collective per batch. Every process must ask for the same positions in the same order.
    """
    idx = np.asarray(plan[position], np.int64)
    if encoded.held is None:
        return make_local_batch(encoded, idx, batch_size, sizes)
    if len(idx) > batch_size:
        raise FisherJaxError(f"{len(idx)} examples do not fit in a batch of {batch_size}")
    window = encoded._window
    if window is None or window[0] is not plan or position not in window[1]:
        stop = min(len(plan), position + EXCHANGE_WINDOW)
        asked = [(np.asarray(plan[i], np.int64), batch_length(encoded, plan[i], sizes)) for i in range(position, stop)]
        window = encoded._window = (plan, dict(zip(range(position, stop), _exchange_rows(encoded, asked))))
    return _local_part(encoded, idx, window[1].pop(position), batch_size)


class BatchIterator:
    """An iterator over batch dicts that also knows its length (``len()`` for progress bars).

    Batches are built one at a time as the iterator advances (nothing is padded up front). It is
    re-iterable: once a pass has run to its end, iterating again starts a new pass over the same
    plan, so the same batches come again (statistics, then evaluation, over one stream). A pass
    that is under way continues where it is (``iter()`` of a started pass returns it unchanged).
    With several processes each batch is this process's slice (:func:`make_local_batch`);
    ``indices`` stay the whole global batches'. Every process must advance its iterator over the
    same plan together: a share of a pass (:func:`encode_rows`) all-gathers each batch's rows.
    """

    def __init__(self, encoded: Encoded, plan: list[np.ndarray], batch_size: int,
                 sizes: Sequence[int], example_ids: np.ndarray | None = None):
        self._encoded = encoded
        self._example_ids = example_ids
        self._plan = plan
        self._batch_size = int(batch_size)
        self._sizes = tuple(sizes)
        self._position = 0  # batches of the current pass handed out so far

    def __iter__(self) -> "BatchIterator":
        if self._position >= len(self._plan):  # the last pass ended: start a new one
            self._position = 0
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._position >= len(self._plan):
            raise StopIteration
        self._position += 1
        return plan_batch(self._encoded, self._plan, self._position - 1, self._batch_size, self._sizes)

    def __len__(self) -> int:
        return len(self._plan)

    @property
    def encoded(self) -> Encoded:
        """The tokenised examples the batches are built from."""
        return self._encoded

    @property
    def indices(self) -> list[np.ndarray]:
        """Each batch's example indices in the loaded split (for mapping predictions back)."""
        if self._example_ids is None:
            return list(self._plan)
        return [self._example_ids[p] for p in self._plan]


def batches(encoded: Encoded, batch_size: int, buckets: Sequence[int] = DEFAULT_BUCKETS,
            shuffle: bool = False, seed: int = 0,
            max_examples: int | None = None) -> BatchIterator:
    """Stream fixed-shape batches over ``encoded`` (see the module docstring for the dict).

    ``shuffle=False`` keeps the original order (evaluation: batch ``i`` holds examples
    ``i*B .. i*B+B-1``). ``shuffle=True`` draws a seeded permutation and groups similar lengths
    (see :func:`_group`); the same seed gives the same batches. ``max_examples`` keeps the first
    that many examples of the pass order (a random subset when shuffling). Arguments are checked
    at call time; batches are built lazily.
    """
    plan = batch_indices(encoded, batch_size, shuffle, seed, max_examples)
    return BatchIterator(encoded, plan, batch_size, bucket_sizes(buckets, encoded.max_length))


def sample_batches_with_replacement(encoded: Encoded, num_examples: int = 128,
                                    batch_size: int = 32, seed: int = 0,
                                    buckets: Sequence[int] = DEFAULT_BUCKETS) -> BatchIterator:
    """The released Fisher-mask code's data: ``num_examples`` draws with replacement.

    The draw is the released ``calc_fisher.py``'s: ``transformers.set_seed(seed)`` (which calls
    ``np.random.seed(seed)``) then ``np.random.choice(n, num_examples)``, reproduced by
    :func:`_replacement_plan` without touching numpy's global generator. Consecutive draws form
    the batches, in draw order (the released ``shuffle=False``), so an example drawn twice appears
    twice. With the paper's 128 and 32 that is four full batches; a remainder becomes a last batch
    padded with weight-0 rows.
    """
    plan = _replacement_plan(len(encoded), num_examples, batch_size, seed)
    return BatchIterator(encoded, plan, batch_size, bucket_sizes(buckets, encoded.max_length))


def _replacement_plan(n: int, num_examples: int, batch_size: int, seed: int) -> list[np.ndarray]:
    """The released code's draw of ``num_examples`` rows of ``n`` with replacement, in batches.

    ``np.random.RandomState(seed).choice(n, num_examples)``: the same numbers as the released
    ``np.random.seed(seed); np.random.choice(n, num_examples)`` (numpy's legacy generator, seeded
    by ``transformers.set_seed``), from a private generator so numpy's global state is untouched.
    Batch ``i`` holds draws ``i*B .. i*B+B-1``.
    """
    if int(num_examples) < 1:
        raise FisherJaxError(f"num_examples must be positive, got {num_examples}")
    _check_sizes(batch_size, None)
    if n == 0:
        raise FisherJaxError("cannot sample from an empty data set")
    if not 0 <= int(seed) < 2**32:  # the legacy generator's seed range
        raise FisherJaxError(f"seed must be in [0, 2**32) for the released draw, got {seed}")
    draws = np.random.RandomState(int(seed)).choice(int(n), int(num_examples))
    return [draws[s:s + batch_size] for s in range(0, len(draws), int(batch_size))]


def sample_task_batches(task: str | TaskSpec, split: str, tokenizer: Any, num_examples: int = 128,
                        batch_size: int = 32, max_length: int | None = None,
                        glue_dir: str | os.PathLike | None = None, seed: int = 0,
                        buckets: Sequence[int] = DEFAULT_BUCKETS) -> BatchIterator:
    """:func:`sample_batches_with_replacement` on a GLUE split, tokenising only the rows drawn.

    The released ``calc_fisher.py``'s rows: ``np.random.seed(seed); np.random.choice(len(split),
    num_examples)``, batched in draw order (see :func:`_replacement_plan`); ``.indices`` gives each
    batch's row ids in the split. The same draws and batches as
    ``sample_batches_with_replacement(encode(tokenizer, load_split(...), max_length), ...)``, but
    128 draws from QQP's 364k rows tokenise at most 128.
    """
    spec = get_task(task)
    length = default_max_length(spec) if max_length is None else int(max_length)
    source = SplitRows(spec, split, glue_dir)
    draws = _replacement_plan(len(source), num_examples, batch_size, seed)
    rows, pos = np.unique(np.concatenate(draws), return_inverse=True)  # each distinct row tokenised once
    encoded = encode_rows(tokenizer, source, rows, length)
    plan = np.split(pos, np.cumsum([len(d) for d in draws])[:-1])
    return BatchIterator(encoded, plan, batch_size, bucket_sizes(buckets, length), example_ids=rows)


def default_max_length(task: str | TaskSpec) -> int:
    """The reference code's sequence length: 64 for SST-2, 128 for every other task."""
    return get_task(task).max_length


def task_batches(task: str | TaskSpec, split: str, tokenizer: Any, batch_size: int,
                 max_length: int | None = None, glue_dir: str | os.PathLike | None = None,
                 shuffle: bool = False, seed: int = 0, max_examples: int | None = None,
                 buckets: Sequence[int] = DEFAULT_BUCKETS) -> BatchIterator:
    """Load a GLUE split, tokenise it and stream batches: the one call most code needs.

    Only the examples the pass uses are tokenised (``max_examples`` on SST-2's 67k training rows
    stays cheap), and with several processes each tokenises its share of them
    (:func:`encode_rows`). The batches are exactly those of
    ``batches(encode(tokenizer, load_split(...), max_length), batch_size, ...)``.
    """
    _check_sizes(batch_size, max_examples)
    spec = get_task(task)
    length = default_max_length(spec) if max_length is None else int(max_length)
    source = SplitRows(spec, split, glue_dir)
    order = select_examples(len(source), shuffle, seed, max_examples)
    encoded = encode_rows(tokenizer, source, order, length)
    # Rows are already in pass order; group them with the same rule batches() uses.
    plan = _group(np.arange(len(encoded)), encoded.lengths, int(batch_size), shuffle, seed)
    return BatchIterator(encoded, plan, batch_size, bucket_sizes(buckets, length),
                         example_ids=order)


class Relabelled:
    """Batches whose task label ids ``y`` become a checkpoint's ``order[y]`` (a checkpoint whose
    ``id2label`` orders the classes unlike the task: :func:`fisher_jax.data.glue.label_order`), so
    label-dependent statistics see each row's true class; re-iterable, with a length."""

    def __init__(self, batches: Any, order: Sequence[int]):
        self.batches, self.order = batches, np.asarray(order, np.int64)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for batch in self.batches:
            yield {**batch, "labels": self.order[np.asarray(batch["labels"], np.int64)]}
