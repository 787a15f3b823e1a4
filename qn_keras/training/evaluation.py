"""Greedy-decoding evaluation of a CTC model over a dataset: loss, WER, CER, per utterance."""

from __future__ import annotations

import dataclasses

import tensorflow as tf

from qn_keras.data import schema
from qn_keras.decoding import greedy_decode_batch
from qn_keras.errors import UserInputError
from qn_keras.metrics import char_errors, word_errors
from qn_keras.training.losses import ctc_per_utterance


@dataclasses.dataclass
class EvaluationResult:
    """Corpus metrics and, if kept, one dict per utterance (``utt_id``, ``reference``,
    ``hypothesis``, ``word_errors``, ``words``, ``char_errors``, ``chars``, ``wer``, ``cer``,
    ``loss``). ``loss`` is NeMo's ``mean_batch`` reduction over the whole set. ``rejected``
    lists the utterances the reader found unusable (``utt_id``, ``reference``, ``error``),
    which are not scored. ``logprobs``, if kept, holds each scored utterance's
    ``[frames, classes]`` log-probs, in the order of ``utterances``."""

    loss: float
    wer: float
    cer: float
    num_utterances: int
    utterances: list = dataclasses.field(default_factory=list)
    rejected: list = dataclasses.field(default_factory=list)
    logprobs: list = dataclasses.field(default_factory=list)

    def metrics(self) -> dict:
        return {
            "loss": self.loss,
            "wer": self.wer,
            "cer": self.cer,
            "utterances": self.num_utterances,
        }


def make_eval_step(model):
    """A ``tf.function`` returning (logprobs, logprob_lengths, per-utterance CTC loss)."""

    num_features = model.inputs[0].shape[-1]
    signature = [
        tf.TensorSpec([None, None, num_features], tf.float32),
        tf.TensorSpec([None], tf.int32),
        tf.TensorSpec([None, None], tf.int32),
        tf.TensorSpec([None], tf.int32),
    ]

    @tf.function(input_signature=signature)
    def step(features, feature_lengths, labels, label_lengths):
        logprobs, logprob_lengths = model([features, feature_lengths], training=False)
        losses = ctc_per_utterance(labels, label_lengths, logprobs, logprob_lengths)
        return logprobs, logprob_lengths, losses

    return step


def evaluate(
    model,
    dataset,
    tokenizer,
    *,
    keep_utterances: bool = True,
    keep_logprobs: bool = False,
    decoder=None,
    step=None,
    progress=None,
):
    """Evaluates ``model`` on batches of ``((features, lengths), (labels, label_lengths)[,
    metadata])``; references are the metadata transcripts when present, else the decoded
    labels. Utterances whose metadata ``problem`` is set (a reader with
    ``bad_records="keep"``) are listed in ``rejected`` instead of scored. ``step`` reuses a
    :func:`make_eval_step` function across calls. Hypotheses are greedy, or ``decoder``'s
    (anything with ``decode_texts(logprobs, lengths)``, e.g. an LM beam search)."""
    step = step or make_eval_step(model)
    blank = model.output_shape[0][-1] - 1 if hasattr(model, "output_shape") else tokenizer.blank_id
    if blank != tokenizer.blank_id:
        raise UserInputError(
            f"The model has {blank + 1} output classes but the tokenizer "
            f"{tokenizer.vocabulary_size}; they must agree (labels + blank)."
        )
    total_loss, count = 0.0, 0
    word_err = word_total = char_err = char_total = 0
    rows, rejected, result_logprobs = [], [], []
    for element in dataset:
        (features, feature_lengths), (labels, label_lengths) = element[0], element[1]
        meta = element[2] if len(element) > 2 else None
        logprobs, lengths, losses = step(features, feature_lengths, labels, label_lengths)
        logprobs, lengths = logprobs.numpy(), lengths.numpy()
        if decoder is not None:
            hyps = decoder.decode_texts(logprobs, lengths)
        else:
            hyps = [tokenizer.decode(ids) for ids in greedy_decode_batch(logprobs, lengths, blank)]
        if meta is not None:
            refs = [t.decode("utf-8") for t in meta[schema.TRANSCRIPT].numpy()]
            ids = [u.decode("utf-8") for u in meta[schema.UTT_ID].numpy()]
        else:
            lab, lab_len = labels.numpy(), label_lengths.numpy()
            refs = [tokenizer.decode(lab[i, : lab_len[i]].tolist()) for i in range(len(lab))]
            ids = [str(count + len(rejected) + i) for i in range(len(refs))]
        problems = [""] * len(refs)
        if meta is not None and schema.PROBLEM in meta:
            problems = [p.decode("utf-8") for p in meta[schema.PROBLEM].numpy()]
        losses = losses.numpy()
        scored = 0
        for i, (ref, hyp) in enumerate(zip(refs, hyps, strict=True)):
            if problems[i]:
                rejected.append({"utt_id": ids[i], "reference": ref, "error": problems[i]})
                continue
            scored += 1
            total_loss += float(losses[i])
            if keep_logprobs:
                result_logprobs.append(logprobs[i, : int(lengths[i])].copy())
            we, wn = word_errors(ref, hyp)
            ce, cn = char_errors(ref, hyp)
            word_err, word_total, char_err, char_total = (
                word_err + we,
                word_total + wn,
                char_err + ce,
                char_total + cn,
            )
            if keep_utterances:
                rows.append(
                    {
                        "utt_id": ids[i],
                        "reference": ref,
                        "hypothesis": hyp,
                        "word_errors": we,
                        "words": wn,
                        "wer": we / wn if wn else float(we > 0),
                        "char_errors": ce,
                        "chars": cn,
                        "cer": ce / cn if cn else float(ce > 0),
                        "loss": float(losses[i]),
                    }
                )
        count += scored
        if progress is not None:
            progress.update(len(refs))
    if count == 0:
        detail = f" ({len(rejected)} utterances rejected as unusable)" if rejected else ""
        raise UserInputError(f"Evaluation data is empty{detail}.")
    if word_total == 0:
        raise UserInputError("Every reference transcript is empty; WER is undefined.")
    return EvaluationResult(
        loss=total_loss / count,
        wer=word_err / word_total,
        cer=char_err / max(char_total, 1),
        num_utterances=count,
        utterances=rows,
        rejected=rejected,
        logprobs=result_logprobs,
    )


def evaluation_dataset(source, bundle, batch_size: int):
    """Batches (with metadata, unusable records kept and flagged) of a manifest, LibriSpeech
    folder or `qn features` folder, for :func:`evaluate` with ``bundle``'s (a model folder's)
    tokenizer and featurizer; and the number of utterances when known in advance."""
    from pathlib import Path

    from qn_keras.data import reader

    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"Evaluation data not found: {source}")
    if source.is_dir() and (source / reader.DATASET_INFO).exists():
        from qn_keras.training.data import from_tfrecords

        data = from_tfrecords(source)
        data.check_compatible(bundle.tokenizer, bundle.featurizer)
        dataset = data.dataset(
            batch_size,
            training=False,
            with_metadata=True,
            num_labels=len(bundle.tokenizer.labels),
            bad_records="keep",
        )
        return dataset, data.num_utterances
    dataset = reader.manifest_dataset(
        str(source),
        bundle.tokenizer,
        bundle.featurizer,
        batch_size,
        shuffle=False,
        bucket_boundaries=None,
        deterministic=True,
        cache=False,
        with_metadata=True,
        bad_records="keep",
    )
    return dataset, None
