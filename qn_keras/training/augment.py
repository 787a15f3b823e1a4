"""SpecAugment, SpecCutout and time warping of feature batches, as pure TensorFlow ops.

Applied by the trainer to training batches only, inside the train step, never in validation,
evaluation or serving. Random draws are stateless (``seed`` is a ``[2]`` int tensor derived
from the run seed, the step and the replica), so a run resumed from a checkpoint augments
exactly as the uninterrupted run would have.

Draws follow NeMo's ``SpecAugment`` / ``SpecCutout`` (``nemo/collections/asr/parts/submodules/
spectr_augment.py``; Python ``randint`` is inclusive at both ends):

- frequency mask: ``start ~ U{0..F - freq_width}``, ``width ~ U{0..freq_width}``
- time mask: width limit ``tw = time_width`` (or ``max(1, int(L * time_width))`` for a float),
  ``start ~ U{0..max(1, L - tw)}``, ``width ~ U{0..tw}``, with ``L`` the utterance's length
- cutout rectangle: ``f0 ~ U{0..F - rect_freq}``, ``fw ~ U{0..rect_freq}``,
  ``t0 ~ U{0..max(0, L - rect_time)}``, ``tw ~ U{0..rect_time}``. NeMo draws ``t0`` over the
  padded batch length; drawing over the utterance's own length keeps every rectangle on real
  frames, so the strength does not depend on how a batch was padded.

Masked values are ``mask_value`` (0: the per-feature mean after normalization); frames past
each length are never touched.
"""

from __future__ import annotations

import tensorflow as tf


def _randint(seed, upper):
    """Integers uniform on ``0..upper`` inclusive, one per element of ``upper`` (int32)."""
    upper = tf.maximum(tf.cast(upper, tf.int32), 0)
    u = tf.random.stateless_uniform(tf.shape(upper), seed=seed, dtype=tf.float32)
    draw = tf.cast(tf.floor(u * tf.cast(upper + 1, tf.float32)), tf.int32)
    return tf.minimum(draw, upper)


def _span_mask(start, width, size):
    """``[B, size]`` bool: True for ``start <= i < start + width``."""
    positions = tf.range(size)[None, :]
    return (positions >= start[:, None]) & (positions < (start + width)[:, None])


def _seeds(seed, count):
    seed = tf.cast(seed, tf.int32)
    return [tf.random.experimental.stateless_fold_in(seed, i) for i in range(count)]


def frequency_masks(shape, seed, num_masks, width):
    """``[B, F]`` bool mask of ``num_masks`` random mel bands per utterance."""
    batch, num_freq = shape[0], shape[2]
    mask = tf.zeros([batch, num_freq], tf.bool)
    seeds = _seeds(seed, 2 * num_masks)
    for i in range(num_masks):
        start = _randint(seeds[2 * i], tf.fill([batch], num_freq - width))
        w = _randint(seeds[2 * i + 1], tf.fill([batch], width))
        mask |= _span_mask(start, w, num_freq)
    return mask


def time_masks(shape, lengths, seed, num_masks, width):
    """``[B, T]`` bool mask of ``num_masks`` random time spans, cut to each utterance's length
    (for utterances shorter than the width NeMo's spans can reach into the padding)."""
    num_time = shape[1]
    lengths = tf.cast(lengths, tf.int32)
    if isinstance(width, float):
        limit = tf.maximum(1, tf.cast(tf.cast(lengths, tf.float32) * width, tf.int32))
    else:
        limit = tf.fill(tf.shape(lengths), int(width))
    mask = tf.zeros([shape[0], num_time], tf.bool)
    seeds = _seeds(seed, 2 * num_masks)
    for i in range(num_masks):
        start = _randint(seeds[2 * i], tf.maximum(1, lengths - limit))
        w = _randint(seeds[2 * i + 1], limit)
        mask |= _span_mask(start, w, num_time)
    return mask & tf.sequence_mask(lengths, num_time)


def cutout_masks(shape, lengths, seed, num_rects, rect_time, rect_freq):
    """``[B, T, F]`` bool mask of ``num_rects`` random time-by-frequency rectangles."""
    batch, num_time, num_freq = shape[0], shape[1], shape[2]
    lengths = tf.cast(lengths, tf.int32)
    mask = tf.zeros([batch, num_time, num_freq], tf.bool)
    seeds = _seeds(seed, 4 * num_rects)
    for i in range(num_rects):
        f0 = _randint(seeds[4 * i], tf.fill([batch], num_freq - rect_freq))
        fw = _randint(seeds[4 * i + 1], tf.fill([batch], rect_freq))
        t0 = _randint(seeds[4 * i + 2], tf.maximum(0, lengths - rect_time))
        tw = _randint(seeds[4 * i + 3], tf.fill([batch], rect_time))
        in_time = _span_mask(t0, tw, num_time)
        in_freq = _span_mask(f0, fw, num_freq)
        mask |= in_time[:, :, None] & in_freq[:, None, :]
    return mask & tf.sequence_mask(lengths, num_time)[:, :, None]


def time_warp(features, lengths, seed, max_warp):
    """Moves one random frame ``c`` of each utterance by ``d ~ U{-W..W}`` and stretches the
    two sides linearly to fit (SpecAugment's time warping, arXiv:1904.08779), within each
    utterance's length; utterances shorter than ``2W + 3`` frames are left as they are."""
    lengths = tf.cast(lengths, tf.int32)
    num_time = tf.shape(features)[1]
    s_center, s_shift = _seeds(seed, 2)
    warpable = lengths >= 2 * max_warp + 3
    # Centre in [W + 1, L - W - 2] keeps both sides at least one frame long after the shift.
    center = max_warp + 1 + _randint(s_center, tf.maximum(lengths - 2 * max_warp - 3, 0))
    shift = _randint(s_shift, tf.fill(tf.shape(lengths), 2 * max_warp)) - max_warp
    shift = tf.where(warpable, shift, 0)
    c = tf.cast(center, tf.float32)[:, None]
    new_c = c + tf.cast(shift, tf.float32)[:, None]
    last = tf.cast(tf.maximum(lengths - 1, 1), tf.float32)[:, None]
    t = tf.cast(tf.range(num_time), tf.float32)[None, :]
    # The denominators are >= 1 for warpable utterances; the guards only keep the others finite.
    left = t * c / tf.maximum(new_c, 1.0)
    right = c + (t - new_c) * (last - c) / tf.maximum(last - new_c, 1.0)
    source = tf.clip_by_value(tf.where(t <= new_c, left, right), 0.0, last)
    valid = t < tf.cast(lengths, tf.float32)[:, None]
    source = tf.where(valid & warpable[:, None], source, t)
    low = tf.cast(tf.floor(source), tf.int32)
    high = tf.minimum(low + 1, tf.maximum(lengths - 1, 0)[:, None])
    frac = (source - tf.cast(low, tf.float32))[:, :, None]
    warped = (1.0 - frac) * tf.gather(features, low, batch_dims=1) + frac * tf.gather(
        features, high, batch_dims=1
    )
    return tf.where(valid[:, :, None], tf.cast(warped, features.dtype), features)


def augment_batch(features, lengths, config, seed):
    """Applies time warping, SpecAugment and SpecCutout from an ``AugmentConfig``.

    ``features`` ``[B, T, F]``, ``lengths`` ``[B]``; returns features of the same shape.
    """
    if not config.enabled:
        return features
    shape = tf.shape(features)
    s_warp, s_freq, s_time, s_rect = _seeds(seed, 4)
    if config.time_warp:
        features = time_warp(features, lengths, s_warp, config.time_warp)
    valid = tf.sequence_mask(lengths, shape[1])
    mask = tf.zeros([shape[0], shape[1], shape[2]], tf.bool)
    if config.freq_masks:
        mask |= frequency_masks(shape, s_freq, config.freq_masks, config.freq_width)[:, None, :]
    if config.time_masks:
        mask |= time_masks(shape, lengths, s_time, config.time_masks, config.time_width)[:, :, None]
    if config.rect_masks:
        mask |= cutout_masks(
            shape, lengths, s_rect, config.rect_masks, config.rect_time, config.rect_freq
        )
    mask &= valid[:, :, None]
    return tf.where(mask, tf.cast(config.mask_value, features.dtype), features)
