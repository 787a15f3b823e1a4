"""How close two computations of the same numbers must be, and why: one place for the suite's
parity tolerances.

Float32 results of one model from two graphs (Keras vs SavedModel vs TFLite, whole vs chunked,
oneDNN's AVX-512 kernels vs its AVX2 ones vs TensorFlow's own) differ by rounding only:
reassociated sums, fused ops, FFT and GEMM blockings. Rounding error is proportional to the size
of the values involved, not a fixed amount: in a log-softmax output every class of a frame
carries the error of that frame's logsumexp, which is about eps * max|logit|. So log-probs are
compared relative to the largest |log-prob| of their frame (at least 1). Measured: 3.05e-5 at
magnitude 65 between a reloaded SavedModel and its Keras model on an Intel Xeon (AVX-512), i.e.
4.7e-7 of the frame's scale, about 4 float32 ulps.

What the tolerances must still catch (each is made on purpose in
tests/test_parity_tolerances.py, on a small random QuartzNet with non-trivial BatchNorm
statistics; measured worst error over frame scale):

- a dropped sequence mask (padding leaks into valid frames): 6e-2;
- BatchNorm epsilon 1e-5 instead of NeMo's 1e-3: 2e-4;
- a missing residual connection: 3.5e-2.

``QN_PARITY_LOG=FILE`` appends every comparison's worst error to FILE (to see the margins a
machine leaves).
"""

from __future__ import annotations

import os

import numpy as np

FLOAT32_EPS = float(np.finfo(np.float32).eps)  # 1.19e-7

# Same float32 model, another graph or kernel set: 1e-5 of the frame's scale (~84 ulps),
# 20x the largest difference measured across the CPUs and runtimes here, 50x below the
# smallest real mistake above (BatchNorm epsilon).
SAME_MODEL_RTOL = 1e-5

# float32 against a float64 reference of the same arithmetic: a few ulps per layer over ~10
# layers; 1e-5 of scale as well.
FLOAT64_REFERENCE_RTOL = 1e-5


def frame_scale(logprobs: np.ndarray) -> np.ndarray:
    """``max(1, max_k |logprobs[..., k]|)`` for every frame: the size the error scales with."""
    return np.maximum(1.0, np.max(np.abs(logprobs), axis=-1, keepdims=True))


def worst_relative_error(actual, expected) -> float:
    """Largest ``|actual - expected|`` of a frame, over that frame's scale."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape:
        raise AssertionError(f"shapes differ: {actual.shape} vs {expected.shape}")
    if expected.size == 0:
        return 0.0
    return float(np.max(np.abs(actual - expected) / frame_scale(expected)))


def assert_logprobs_close(
    actual, expected, lengths=None, *, rtol=SAME_MODEL_RTOL, what="log-probs"
):
    """``actual`` equals ``expected`` within ``rtol`` of each frame's scale.

    ``actual``/``expected`` are ``[frames, classes]`` or ``[batch, frames, classes]``; with
    ``lengths`` (``[batch]``) only each item's valid frames are compared (padding is free).
    """
    actual, expected = np.asarray(actual), np.asarray(expected)
    if lengths is None:
        pairs = [(actual, expected)]
    else:
        pairs = [(actual[b, :n], expected[b, :n]) for b, n in enumerate(np.asarray(lengths))]
    worst = max(worst_relative_error(a, e) for a, e in pairs)
    if os.environ.get("QN_PARITY_LOG"):
        with open(os.environ["QN_PARITY_LOG"], "a") as log:
            log.write(
                f"{os.environ.get('PYTEST_CURRENT_TEST', '?')}\t{what}\t{worst:.3g}\t{rtol:.3g}\n"
            )
    if not np.isfinite(worst) or worst > rtol:
        raise AssertionError(
            f"{what} differ by {worst:.3g} of their frame's scale (max(1, max|log-prob|)); "
            f"allowed {rtol:.3g}"
        )
    return worst
