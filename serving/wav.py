"""WAV decoding and resampling inside the TF graph, with core TensorFlow ops only.

``tf.audio.decode_wav`` reads 16-bit PCM only, so the RIFF header is parsed here with
``tf.strings.substr`` and ``tf.io.decode_raw``: PCM 8 (unsigned), 16, 24 and 32 bit, IEEE float
32 and 64 bit, ``WAVE_FORMAT_EXTENSIBLE`` wrappers of those, any number of channels (averaged
to mono) and any sample rate. Samples are scaled exactly as ``soundfile`` (and so
:func:`qn_keras.audio.decode_audio`) scales them.

Resampling reproduces ``scipy.signal.resample_poly`` (what ``decode_audio`` uses): the
Kaiser-windowed sinc FIR (beta 5, half length 10 * max(up, down) taps at the upsampled rate,
unit DC gain) evaluated as a polyphase filter. Its coefficients depend on the file's rate, so
they are computed in the graph too: one table row per polyphase phase, then every output
sample is a dot product of a gathered input window with its phase's row.
"""

from __future__ import annotations

import tensorflow as tf

# soundfile/libsndfile scale integer PCM by 1 / 2^(bits - 1).
_PCM_SCALE = {8: 1.0 / 128.0, 16: 1.0 / 32768.0, 24: 1.0 / 8388608.0, 32: 1.0 / 2147483648.0}
KAISER_BETA = 5.0
MIN_SAMPLE_RATE = 1000
MAX_SAMPLE_RATE = 384000
# Output samples resampled per step: bounds the gathered [block, taps] windows in memory.
RESAMPLE_BLOCK = 32768

_FORMAT_PCM = 1
_FORMAT_FLOAT = 3
_FORMAT_EXTENSIBLE = 0xFFFE


def _check(condition: tf.Tensor, message: str, label: tf.Tensor | None) -> tf.Operation:
    text = tf.constant(message) if label is None else tf.strings.join([label, ": ", message])
    return tf.debugging.Assert(condition, [text], name="wav_check")


def _read_uint(contents: tf.Tensor, pos: tf.Tensor, size: int) -> tf.Tensor:
    """Little-endian unsigned integer of ``size`` bytes at ``pos`` as int64; 0 past the end."""
    total = tf.cast(tf.strings.length(contents), tf.int64)
    start = tf.clip_by_value(tf.cast(pos, tf.int64), 0, total)
    width = tf.constant(size, tf.int64)
    raw = tf.strings.substr(contents, start, width) + tf.constant(b"\0" * size)
    data = tf.io.decode_raw(tf.strings.substr(raw, tf.constant(0, tf.int64), width), tf.uint8)
    weights = tf.constant([256**i for i in range(size)], tf.int64)
    return tf.reduce_sum(tf.cast(data, tf.int64) * weights)


def _read_tag(contents: tf.Tensor, pos: tf.Tensor) -> tf.Tensor:
    total = tf.cast(tf.strings.length(contents), tf.int64)
    start = tf.clip_by_value(tf.cast(pos, tf.int64), 0, total)
    return tf.strings.substr(contents, start, tf.constant(4, tf.int64))


def _find_chunks(contents: tf.Tensor):
    """Offsets and sizes of the ``fmt `` and ``data`` chunks (-1 when absent)."""
    total = tf.cast(tf.strings.length(contents), tf.int64)
    minus_one = tf.constant(-1, tf.int64)

    def cond(pos, fmt_pos, fmt_size, data_pos, data_size):
        return (pos + 8 <= total) & ((fmt_pos < 0) | (data_pos < 0))

    def body(pos, fmt_pos, fmt_size, data_pos, data_size):
        tag = _read_tag(contents, pos)
        size = _read_uint(contents, pos + 4, 4)
        is_fmt = tf.equal(tag, "fmt ") & (fmt_pos < 0)
        is_data = tf.equal(tag, "data") & (data_pos < 0)
        fmt_pos = tf.where(is_fmt, pos + 8, fmt_pos)
        fmt_size = tf.where(is_fmt, size, fmt_size)
        data_pos = tf.where(is_data, pos + 8, data_pos)
        # Streaming writers leave the data size at 0 or 0xFFFFFFFF: read to the end then.
        available = total - (pos + 8)
        unknown = tf.equal(size, 0) | tf.equal(size, 0xFFFFFFFF) | (size > available)
        data_size = tf.where(is_data, tf.where(unknown, available, size), data_size)
        # Chunks are word aligned: odd sizes carry a pad byte.
        return pos + 8 + size + size % 2, fmt_pos, fmt_size, data_pos, data_size

    start = tf.constant(12, tf.int64)
    _, fmt_pos, fmt_size, data_pos, data_size = tf.while_loop(
        cond, body, [start, minus_one, minus_one, minus_one, minus_one]
    )
    return fmt_pos, fmt_size, data_pos, data_size


def _int24_to_float(data: tf.Tensor) -> tf.Tensor:
    triples = tf.cast(tf.reshape(tf.io.decode_raw(data, tf.uint8), [-1, 3]), tf.int32)
    value = triples[:, 0] + triples[:, 1] * 256 + triples[:, 2] * 65536
    value = tf.where(value >= 2**23, value - 2**24, value)
    return tf.cast(value, tf.float32) * _PCM_SCALE[24]


def decode_wav(contents: tf.Tensor, label: tf.Tensor | None = None) -> tuple[tf.Tensor, tf.Tensor]:
    """One encoded WAV file (scalar string) to a mono float32 waveform ``[samples]`` and its
    sample rate (int32 scalar). Invalid input raises InvalidArgumentError naming the problem,
    prefixed with ``label`` (a string scalar naming the input) when given."""
    contents = tf.convert_to_tensor(contents, tf.string)
    total = tf.cast(tf.strings.length(contents), tf.int64)
    is_riff = (total >= 12) & tf.equal(_read_tag(contents, 0), "RIFF")
    is_riff &= tf.equal(_read_tag(contents, 8), "WAVE")
    header_ok = _check(is_riff, "audio is not a WAV file: no RIFF/WAVE header", label)
    with tf.control_dependencies([header_ok]):
        fmt_pos, fmt_size, data_pos, data_size = _find_chunks(contents)
    chunks_ok = [
        _check(fmt_pos >= 0, "WAV file has no fmt chunk", label),
        _check(data_pos >= 0, "WAV file has no data chunk", label),
        _check(fmt_size >= 16, "WAV fmt chunk is shorter than 16 bytes", label),
    ]
    with tf.control_dependencies(chunks_ok):
        format_tag = _read_uint(contents, fmt_pos, 2)
    channels = _read_uint(contents, fmt_pos + 2, 2)
    rate = _read_uint(contents, fmt_pos + 4, 4)
    block_align = _read_uint(contents, fmt_pos + 12, 2)
    bits = _read_uint(contents, fmt_pos + 14, 2)
    # WAVE_FORMAT_EXTENSIBLE: the real format is the first two bytes of the sub-format GUID.
    extensible = tf.equal(format_tag, _FORMAT_EXTENSIBLE) & (fmt_size >= 40)
    format_tag = tf.where(extensible, _read_uint(contents, fmt_pos + 24, 2), format_tag)

    is_pcm = tf.equal(format_tag, _FORMAT_PCM)
    is_float = tf.equal(format_tag, _FORMAT_FLOAT)
    # Branch order: u8, s16, s24, s32, f32, f64.
    branch = tf.where(
        is_pcm,
        tf.where(
            tf.equal(bits, 8),
            0,
            tf.where(tf.equal(bits, 16), 1, tf.where(tf.equal(bits, 24), 2, 3)),
        ),
        tf.where(tf.equal(bits, 32), 4, 5),
    )
    supported = (is_pcm & ((bits == 8) | (bits == 16) | (bits == 24) | (bits == 32))) | (
        is_float & ((bits == 32) | (bits == 64))
    )
    format_ok = [
        _check(
            supported,
            "unsupported WAV encoding: only PCM 8/16/24/32-bit and IEEE float 32/64-bit",
            label,
        ),
        _check(channels >= 1, "WAV file declares 0 channels", label),
        _check(
            tf.equal(block_align, channels * (bits // 8)),
            "WAV block alignment does not match channels * bytes per sample",
            label,
        ),
        _check(
            (rate >= MIN_SAMPLE_RATE) & (rate <= MAX_SAMPLE_RATE),
            f"WAV sample rate must be between {MIN_SAMPLE_RATE} and {MAX_SAMPLE_RATE} Hz",
            label,
        ),
    ]
    with tf.control_dependencies(format_ok):
        num_frames = data_size // tf.maximum(block_align, 1)
    data_ok = _check(num_frames > 0, "WAV file has no audio samples (empty data chunk)", label)
    with tf.control_dependencies([data_ok]):
        data = tf.strings.substr(contents, data_pos, num_frames * block_align)
        branch = tf.cast(tf.identity(branch), tf.int32)

    def pcm(dtype, scale):
        return lambda: tf.cast(tf.io.decode_raw(data, dtype), tf.float32) * scale

    samples = tf.switch_case(
        branch,
        [
            lambda: (tf.cast(tf.io.decode_raw(data, tf.uint8), tf.float32) - 128.0) * _PCM_SCALE[8],
            pcm(tf.int16, _PCM_SCALE[16]),
            lambda: _int24_to_float(data),
            pcm(tf.int32, _PCM_SCALE[32]),
            pcm(tf.float32, 1.0),
            lambda: tf.cast(tf.io.decode_raw(data, tf.float64), tf.float32),
        ],
    )
    frames = tf.reshape(samples, tf.stack([num_frames, channels]))
    waveform = tf.reduce_mean(frames, axis=1)
    finite_ok = _check(
        tf.reduce_all(tf.math.is_finite(waveform)),
        "WAV audio contains NaN or infinite samples",
        label,
    )
    with tf.control_dependencies([finite_ok]):
        return tf.identity(waveform), tf.cast(rate, tf.int32)


def _gcd(a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
    g, _ = tf.while_loop(lambda x, y: y > 0, lambda x, y: (y, x % y), [a, b])
    return g


def _polyphase_table(up: tf.Tensor, down: tf.Tensor):
    """``scipy.signal.resample_poly``'s filter split into its ``up`` phases.

    Returns ``(table [up, 2 * reach] float64, reach)``: output sample m (upsampled position
    m * down, phase p = m * down % up, base b = m * down // up) is
    ``sum_t table[p, t] * x[b + reach - t]``, x being zero outside the signal.
    """
    max_rate = tf.maximum(up, down)
    half_len = 10 * max_rate
    reach = (half_len + up - 1) // up + 1
    phases = tf.range(up, dtype=tf.int64)[:, None]
    taps = tf.range(2 * reach, dtype=tf.int64)[None, :] - reach
    # Upsampled-rate distance from the filter centre; every distance in [-half_len, half_len]
    # occurs in exactly one (phase, tap) cell, so the table's sum is the whole filter's sum.
    offset = phases + taps * up
    inside = tf.abs(offset) <= half_len
    q = tf.cast(offset, tf.float64)
    cutoff = 1.0 / tf.cast(max_rate, tf.float64)
    x = q * cutoff
    safe_x = tf.where(tf.equal(x, 0.0), tf.ones_like(x), x)
    pi = tf.constant(3.141592653589793, tf.float64)
    sinc = tf.where(tf.equal(x, 0.0), tf.ones_like(x), tf.sin(pi * safe_x) / (pi * safe_x))
    ratio = q / tf.cast(half_len, tf.float64)
    arg = tf.sqrt(tf.maximum(1.0 - ratio * ratio, 0.0))
    beta = tf.constant(KAISER_BETA, tf.float64)
    window = tf.math.bessel_i0(beta * arg) / tf.math.bessel_i0(beta)
    taps_value = tf.where(inside, cutoff * sinc * window, tf.zeros_like(q))
    # firwin(scale=True) gives unit DC gain; resample_poly multiplies by `up`.
    return taps_value / tf.reduce_sum(taps_value) * tf.cast(up, tf.float64), reach


def resample(waveform: tf.Tensor, orig_rate: tf.Tensor, target_rate: int) -> tf.Tensor:
    """Resamples a float32 ``[samples]`` waveform from ``orig_rate`` (int scalar tensor) to
    ``target_rate`` Hz exactly as ``scipy.signal.resample_poly(x, up, down)`` does (zero
    padding outside the signal, ``ceil(n * up / down)`` output samples)."""
    waveform = tf.convert_to_tensor(waveform, tf.float32)
    orig = tf.cast(orig_rate, tf.int64)
    target = tf.constant(target_rate, tf.int64)

    def convert():
        g = _gcd(orig, target)
        up, down = target // g, orig // g
        table, reach = _polyphase_table(up, down)
        table = tf.cast(table, tf.float32)
        n = tf.size(waveform, out_type=tf.int64)
        n_out = (n * up + down - 1) // down
        width = 2 * reach
        padded = tf.pad(waveform, tf.stack([tf.stack([reach, reach + 1])]))
        window = tf.range(width, dtype=tf.int64)
        num_blocks = (n_out + RESAMPLE_BLOCK - 1) // RESAMPLE_BLOCK

        def body(i, out):
            m = tf.range(i * RESAMPLE_BLOCK, tf.minimum((i + 1) * RESAMPLE_BLOCK, n_out))
            position = m * down
            base, phase = position // up, position % up
            # padded[j] is x[j - reach], so tap t reads padded[base + 2 * reach - t].
            index = base[:, None] + (width - window)[None, :]
            windows = tf.gather(padded, index)
            weights = tf.gather(table, phase)
            return i + 1, out.write(tf.cast(i, tf.int32), tf.reduce_sum(windows * weights, 1))

        blocks = tf.TensorArray(tf.float32, size=tf.cast(num_blocks, tf.int32), infer_shape=False)
        _, blocks = tf.while_loop(
            lambda i, out: i < num_blocks, body, [tf.constant(0, tf.int64), blocks]
        )
        return tf.reshape(blocks.concat(), [-1])

    return tf.cond(tf.equal(orig, target), lambda: tf.identity(waveform), convert)


def decode_wav_batch(
    contents: tf.Tensor, target_rate: int, name: str = "wav_bytes"
) -> tuple[tf.Tensor, tf.Tensor]:
    """A batch of encoded WAV files (string ``[batch]``) to zero-padded float32 waveforms
    ``[batch, samples]`` at ``target_rate`` and their lengths (int32 ``[batch]``). Errors name
    the failing item as ``name[index]``."""

    def decode_one(item):
        contents, index = item
        label = tf.strings.join([f"{name}[", tf.strings.as_string(index), "]"])
        waveform, rate = decode_wav(contents, label)
        return resample(waveform, rate, target_rate)

    indices = tf.range(tf.size(contents))
    ragged = tf.map_fn(
        decode_one,
        (contents, indices),
        fn_output_signature=tf.RaggedTensorSpec([None], tf.float32, ragged_rank=0),
    )
    lengths = tf.cast(ragged.row_lengths(), tf.int32)
    return ragged.to_tensor(), lengths
