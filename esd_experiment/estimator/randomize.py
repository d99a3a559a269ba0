"""WeightWatcher's randomized ESD (``analyze(randomize=True)``), as the ``--randomize`` metric.

Each of the layer's matrices is shuffled element-wise (a uniform random permutation of its
entries, which keeps their distribution and destroys their correlations) and the shuffled
layer's eigenvalues are computed by the estimator's own eigensolver; the columns compare the
two spectra and fit the Marchenko-Pastur law to the shuffled one (estimator/mp_fit.py). Names and
definitions are WeightWatcher 0.7's (``apply_random_esd``, ``random_eigenvalues``,
``apply_mp_fit(random=True)``), docs/metrics.md section 4. The shuffle is seeded by ``--seed``
and the layer's name, so a result is reproducible and independent of the order layers are
computed in. Imports neither torch nor pandas.
"""

from __future__ import annotations

import contextlib
import threading
import zlib
from collections.abc import Callable, Iterator

import numpy as np

from esd_experiment.estimator.mp_fit import mp_fit

RANDOMIZE_NAME = "randomize"  # recorded as randomize(seed=<seed>) in esd_options
RANDOM_COLUMNS = ("max_rand_eval", "rand_distance", "ww_softrank", "ww_maxdist",
                  "rand_num_spikes", "num_traps", "rand_sigma_mp", "rand_mp_softrank",
                  "rand_W_scale", "rand_bulk_max", "rand_bulk_min")
# WeightWatcher pools this many shuffles of a layer with fewer than FEW_EVALS eigenvalues
# (all its matrices together: a convolution's are its slices'), for a steadier random ESD.
FEW_EVALS = 100
FEW_EVALS_REPLICAS = 5
# Integer types as wide as each float storage type: the shuffle moves bits, not values.
_SAME_WIDTH = {2: np.int16, 4: np.int32, 8: np.int64}
_UNSIGNED = {2: np.uint16, 4: np.uint32, 8: np.uint64}
_TIE_CHUNK = 1 << 22  # entries compared at a time when looking for tied keys
_RAW_CHUNK = 1 << 18  # random words drawn at a time (a small temporary, malloc's to reuse)


def recorded_name(seed: int) -> str:
    """The name the metric is recorded by: the seed is part of the result's options."""
    return f"{RANDOMIZE_NAME}(seed={seed})"


def layer_rng(seed: int, name: str, replica: int) -> np.random.Generator:
    """The generator of one shuffle of one layer: from the run's seed, the layer's name and
    the shuffle's number, so that no layer's shuffle depends on another's."""
    return np.random.default_rng([seed, zlib.crc32(name.encode("utf-8")), replica])


def shuffled_bits(raw: np.ndarray, rng: np.random.Generator,
                  sort_words: Callable[[np.ndarray], np.ndarray] | None = None,
                  words: np.ndarray | None = None) -> np.ndarray:
    """A copy of ``raw`` (any shape, any 2-, 4- or 8-byte dtype) with its entries in a
    uniformly random order, as an integer array of the same width and shape: reinterpreted
    as the original dtype it is the element-wise shuffled matrix.

    2- and 4-byte entries are shuffled by ``sort_shuffle`` (a sort: 2-3x faster than a
    random-access shuffle of a matrix larger than the CPU's cache), ``sort_words`` sorting its
    words, written in ``words`` when given; 8-byte entries leave no room for a key beside them
    and go through ``Generator.shuffle``."""
    width = raw.dtype.itemsize
    flat = np.ascontiguousarray(raw).view(_UNSIGNED[width]).reshape(-1)
    if width == 8:
        out = flat.copy()
        rng.shuffle(out)
    else:
        out = sort_shuffle(flat, rng, key_bits=64 - 8 * width, sort_words=sort_words,
                           words=words)
    return out.view(_SAME_WIDTH[width]).reshape(raw.shape)


def sort_shuffle(values: np.ndarray, rng: np.random.Generator, *, key_bits: int,
                 sort_words: Callable[[np.ndarray], np.ndarray] | None = None,
                 words: np.ndarray | None = None) -> np.ndarray:
    """``values`` (1-D, unsigned, at most ``64 - key_bits`` bits wide) in a uniformly random
    order, as a strided view of the sorted words (no second copy).

    Each entry gets a random key of ``key_bits`` bits, written above the entry's own bits in
    one 64-bit word; sorting the words (``sort_words``: any exact sort of uint64, returning
    the sorted words; NumPy's in place by default, a GPU's from the estimator) puts the
    entries in key order. Entries whose keys tie are then put in a random order among
    themselves (they would otherwise stay ordered by their bits), so every order is equally
    likely: the random-key construction of a uniform permutation, with ties broken at
    random. The result depends on nothing but ``rng``. ``words``: room for the words (uint64,
    at least ``values.size``; default a new array), which the result is a view of when the
    sort is in place.
    """
    bits = 8 * values.itemsize
    words = np.empty(values.size, np.uint64) if words is None else words[:values.size]
    for start in range(0, values.size, _RAW_CHUNK):  # 64 random bits each, the key on top
        stop = min(start + _RAW_CHUNK, values.size)
        words[start:stop] = rng.bit_generator.random_raw(stop - start)
    if key_bits < 64 - bits:  # a shorter key than the word has room for (ties are likelier)
        words >>= np.uint64(64 - key_bits)
        words <<= np.uint64(bits)
    ratio = 8 // values.itemsize
    low = 0 if np.little_endian else ratio - 1  # where the word's lowest bits lie in memory
    words.view(values.dtype)[low::ratio] = values  # the entry below its key
    if sort_words is None:
        words.sort()
    else:
        words = sort_words(words)
    out = words.view(values.dtype)[low::ratio]
    ties = _tied_keys(words, bits)
    if ties.size:
        both = np.concatenate((ties, ties + 1))  # every entry of a run of tied keys, once
        both.sort()
        members = both[np.concatenate(([True], both[1:] != both[:-1]))]
        # a member continues the run before it when it is tied to the entry before it
        before = np.minimum(np.searchsorted(ties, members - 1), ties.size - 1)
        run = np.cumsum(ties[before] != members - 1)
        order = np.lexsort((rng.random(members.size), run))
        out[members] = out[members[order]]
    return out


class WordBuffers:
    """Room for ``sort_shuffle``'s words, reused from one shuffle to the next within a scope.

    A fresh array the size of a large matrix is paid for in page faults when first written
    (on a virtual machine, up to half as much as the rest of its shuffle); memory written
    before is not. ``take(size)`` hands out the buffer kept when it has room, else a new one;
    ``give(buffer)`` hands one back once nothing reads it. Inside ``reused()`` (the analysis
    of a job, ``net_esd_estimator``, ``iter_layer_results``) the larger of it and the one kept
    is kept: one buffer, the size of the largest matrix shuffled, freed when the outermost
    scope ends. Outside any scope nothing is kept."""

    def __init__(self) -> None:
        self._kept: np.ndarray | None = None
        self._scopes = 0
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def reused(self) -> Iterator[None]:
        with self._lock:
            self._scopes += 1
        try:
            yield
        finally:
            with self._lock:
                self._scopes -= 1
                if not self._scopes:
                    self._kept = None

    def take(self, size: int) -> np.ndarray:
        with self._lock:
            buffer, self._kept = self._kept, None
        if buffer is not None and buffer.size >= size:
            return buffer
        del buffer  # too small: freed before a larger one is made
        return np.empty(size, np.uint64)

    def give(self, buffer: np.ndarray) -> None:
        with self._lock:
            if self._scopes and (self._kept is None or buffer.size > self._kept.size):
                self._kept = buffer


WORDS = WordBuffers()


def _tied_keys(words: np.ndarray, bits: int) -> np.ndarray:
    """The positions ``i`` of sorted ``words`` whose key (the bits above the lowest ``bits``,
    at most 32) equals that of ``i + 1``; a chunk at a time, in a reused buffer. Equal keys
    have equal upper 32 bits: only where those are equal are the keys compared."""
    upper = words.view(np.uint32)[(1 if np.little_endian else 0)::2]
    found = [np.empty(0, np.intp)]
    same = np.empty(min(_TIE_CHUNK, words.size), bool)
    for start in range(0, words.size - 1, _TIE_CHUNK):
        stop = min(start + _TIE_CHUNK, words.size - 1)
        np.equal(upper[start + 1:stop + 1], upper[start:stop], out=same[:stop - start])
        near = np.flatnonzero(same[:stop - start])
        near += start
        found.append(near[(words[near] >> np.uint64(bits))
                          == (words[near + 1] >> np.uint64(bits))])
    return np.concatenate(found)


def jensen_shannon_distance(p: np.ndarray, q: np.ndarray) -> float:
    """sqrt of the Jensen-Shannon divergence (natural log) between ``p`` and ``q`` read as
    weights over the same positions, each normalised to sum 1 (WeightWatcher compares the
    two sorted eigenvalue vectors so)."""
    from scipy.special import rel_entr

    m = (p + q) / 2
    m = m / m.sum()
    kl_p = rel_entr(p / p.sum(), m).sum()
    kl_q = rel_entr(q / q.sum(), m).sum()
    return float(np.sqrt((kl_p + kl_q) / 2))


def randomized_columns(evals: np.ndarray, N: int, M: int,
                       shuffled_evals: Callable[[int, int], np.ndarray | None], *,
                       seed: int) -> dict[str, float]:
    """The randomized-ESD columns of one layer.

    ``evals``: the layer's eigenvalues (ascending, float64); ``N`` >= ``M`` its matrices'
    dimensions; ``shuffled_evals(seed, replica)``: the eigenvalues (ascending, float64, scaled
    as ``evals``) of the layer with every matrix shuffled by ``layer_rng(seed, name,
    replica)``, None when they are not finite.
    """
    replicas = FEW_EVALS_REPLICAS if evals.size < FEW_EVALS else 1
    parts = [shuffled_evals(seed, r) for r in range(replicas)]
    if any(p is None for p in parts):
        return dict.fromkeys(RANDOM_COLUMNS, np.nan)
    first = parts[0]
    pooled = np.sort(np.concatenate(parts)) if replicas > 1 else first
    out = {"max_rand_eval": float(pooled[-1])}
    lambda_max = float(evals[-1])
    out["rand_distance"] = (jensen_shannon_distance(evals, first) if evals.sum() > 0
                            else np.nan)
    out["ww_softrank"] = float(first[-1]) / lambda_max if lambda_max > 0 else np.nan
    out["ww_maxdist"] = lambda_max - float(first[-1])
    fit = mp_fit(pooled, N, M)
    out["rand_num_spikes"] = out["num_traps"] = fit["num_spikes"]
    out["rand_sigma_mp"] = fit["sigma_mp"]
    out["rand_mp_softrank"] = fit["mp_softrank"]
    total = pooled.sum()
    out["rand_W_scale"] = float(np.sqrt(pooled.size / total)) if total > 0 else np.nan
    out["rand_bulk_max"] = fit["bulk_max"]
    out["rand_bulk_min"] = fit["bulk_min"]
    return {c: out[c] for c in RANDOM_COLUMNS}
