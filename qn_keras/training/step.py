"""One training step on every replica: NeMo's recipe, as a ``tf.function`` per element spec.

Per replica: SpecAugment/SpecCutout on the batch (seeded by ``(seed, step, replica)``, so a
resumed run draws the same masks), forward, per-utterance CTC losses in float32, this
replica's share of NeMo's ``mean_batch`` loss (its sum over the *global* batch size, so the
all-reduced gradient is the gradient of the global mean), the optimizer's update (loss-scaled
under ``mixed_float16``). Returns the all-reduced ``[loss, utterances, frames, stop votes,
gradient norm]``.
"""

from __future__ import annotations

import tensorflow as tf

from qn_keras.training.losses import ctc_per_utterance


def make_train_step(model, optimizer, strategy, variables, *, augment, augment_config, seed):
    """``element_spec -> tf.function(batch, step, stop_flag)`` updating ``variables``."""
    scaled = isinstance(optimizer, tf.keras.mixed_precision.LossScaleOptimizer)

    def replica_step(batch, step, stop_flag):
        (features, feature_lengths), (labels, label_lengths) = batch
        ctx = tf.distribute.get_replica_context()
        local_count = tf.cast(tf.shape(features)[0], tf.float32)
        global_count = ctx.all_reduce("sum", local_count)
        replica_seed = tf.random.experimental.stateless_fold_in(
            tf.stack([tf.constant(seed, tf.int64), step]),
            tf.cast(ctx.replica_id_in_sync_group, tf.int64),
        )
        features = augment(features, feature_lengths, augment_config, replica_seed)
        with tf.GradientTape() as tape:
            logprobs, logprob_lengths = model([features, feature_lengths], training=True)
            losses = ctc_per_utterance(labels, label_lengths, logprobs, logprob_lengths)
            loss = tf.reduce_sum(losses) / tf.maximum(global_count, 1.0)
            objective = optimizer.get_scaled_loss(loss) if scaled else loss
        grads = tape.gradient(objective, variables)
        if scaled:
            grads = optimizer.get_unscaled_gradients(grads)
        optimizer.apply_gradients(zip(grads, variables, strict=True))
        frames = tf.cast(tf.reduce_sum(feature_lengths), tf.float32)
        # Summed over replicas, so a NaN or infinite gradient on any replica shows.
        grad_norm = tf.cast(tf.linalg.global_norm(grads), tf.float32)
        totals = ctx.all_reduce("sum", tf.stack([loss, local_count, frames, stop_flag, grad_norm]))
        return totals

    def train_step(batch, step, stop_flag):
        totals = strategy.run(replica_step, args=(batch, step, stop_flag))
        return strategy.experimental_local_results(totals)[0]

    def compile_for(element_spec):
        # One trace for the dataset's element spec (time lengths vary batch to batch).
        signature = [
            element_spec,
            tf.TensorSpec([], tf.int64),
            tf.TensorSpec([], tf.float32),
        ]
        return tf.function(train_step, input_signature=signature)

    return compile_for
