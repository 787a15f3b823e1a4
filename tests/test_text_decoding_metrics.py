"""Tokenizer, CTC decoding (greedy, in-graph greedy, beam) and WER/CER."""

import itertools

import numpy as np
import pytest
import tensorflow as tf

from qn_keras.decoding import (
    beam_decode_ids,
    greedy_decode_batch,
    greedy_decode_ids,
    tf_greedy_decode,
)
from qn_keras.metrics import cer, char_errors, edit_distance, wer, word_errors
from qn_keras.tokenizer import ENGLISH_LABELS, CharTokenizer

# --------------------------------------------------------------------------- tokenizer


def test_english_labels_are_nemos():
    tok = CharTokenizer()
    assert tok.labels == ENGLISH_LABELS
    assert "".join(tok.labels) == " abcdefghijklmnopqrstuvwxyz'"
    assert tok.blank_id == 28 and tok.vocabulary_size == 29


def test_normalize_reports_what_it_dropped():
    tok = CharTokenizer()
    result = tok.normalize("  Hello,  World! It\u2019s a café-time: 42 ％ ")
    assert result.text == "hello world it's a cafe time"
    assert result.dropped == {",": 1, "!": 1, ":": 1, "4": 1, "2": 1, "％": 1}
    assert tok.normalize("plain text").dropped == {}


def test_encode_decode_round_trip_and_errors():
    tok = CharTokenizer()
    ids = tok.encode("hi there")
    assert ids == [8, 9, 0, 20, 8, 5, 18, 5]
    assert tok.decode(ids) == "hi there"
    assert tok.decode(ids + [tok.blank_id]) == "hi there"  # the blank is not a character
    with pytest.raises(ValueError, match=r"outside the vocabulary: \['!', 'H'\]"):
        tok.encode("Hi!")
    with pytest.raises(ValueError, match="unique"):
        CharTokenizer("abca")
    with pytest.raises(ValueError, match="single characters"):
        CharTokenizer(["a", "bc"])


def test_label_files(tmp_path):
    german = [" ", *"abcdefghijklmnopqrstuvwxyz", "ä", "ö", "ü", "ß"]
    text_file = tmp_path / "labels.txt"
    text_file.write_text("<space>\n" + "\n".join(german[1:]) + "\n", encoding="utf-8")
    tok = CharTokenizer.from_file(text_file)
    assert list(tok.labels) == german and tok.vocabulary_size == 32  # spec 10: de has 32
    assert tok.normalize("Größe Übel").text == "größe übel"
    json_file = tmp_path / "labels.json"
    tok.save(json_file)
    assert CharTokenizer.from_file(json_file).labels == tok.labels
    assert CharTokenizer.from_dict(tok.to_dict()).labels == tok.labels
    crlf = tmp_path / "crlf.txt"
    crlf.write_bytes(b" \r\na\r\nb\r\n")
    assert CharTokenizer.from_file(crlf).labels == (" ", "a", "b")


# --------------------------------------------------------------------------- greedy decoding


def _one_hot_logprobs(path, classes):
    logits = np.full((len(path), classes), -5.0)
    logits[np.arange(len(path)), path] = 5.0
    return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


def _collapse(path, blank):
    """The CTC many-to-one map, written independently: merge repeats, then drop blanks."""
    return [k for k, _ in itertools.groupby(path) if k != blank]


def test_greedy_decoding_hand_example():
    b = 4  # blank
    path = [b, 1, 1, b, 1, 2, 2, 2, b, b, 3, 0, 0]
    logprobs = _one_hot_logprobs(path, 5)
    assert greedy_decode_ids(logprobs, len(path), b) == [1, 1, 2, 3, 0]
    assert greedy_decode_ids(logprobs, 5, b) == [1, 1]  # frames past the length are ignored
    assert greedy_decode_ids(logprobs, 0, b) == []


def test_greedy_batch_and_tf_greedy_match_the_collapse_rule():
    rng = np.random.default_rng(0)
    labels = list(" abc")
    blank = len(labels)
    logprobs = rng.normal(size=(6, 17, blank + 1)).astype(np.float32)
    lengths = np.array([17, 0, 1, 9, 16, 5], np.int32)
    expected = [
        _collapse(np.argmax(lp[:n], -1).tolist(), blank)
        for lp, n in zip(logprobs, lengths, strict=True)
    ]
    assert greedy_decode_batch(logprobs, lengths, blank) == expected
    texts = tf_greedy_decode(tf.constant(logprobs), tf.constant(lengths), labels).numpy()
    assert [t.decode() for t in texts] == ["".join(labels[i] for i in ids) for ids in expected]


# --------------------------------------------------------------------------- beam decoding


def _ctc_log_prob(logprobs, labels, blank):
    """log P(labels | logprobs) by the CTC forward recursion (Graves 2006), float64."""
    ext = [blank]
    for label in labels:
        ext += [label, blank]
    alpha = np.full(len(ext), -np.inf)
    alpha[0] = logprobs[0, blank]
    if labels:
        alpha[1] = logprobs[0, ext[1]]
    for t in range(1, len(logprobs)):
        previous = alpha.copy()
        for s in range(len(ext)):
            terms = [previous[s]]
            if s >= 1:
                terms.append(previous[s - 1])
            if s >= 2 and ext[s] != blank and ext[s] != ext[s - 2]:
                terms.append(previous[s - 2])
            alpha[s] = np.logaddexp.reduce(terms) + logprobs[t, ext[s]]
    return np.logaddexp(alpha[-1], alpha[-2]) if labels else alpha[-1]


def _log_softmax(x):
    return (
        x
        - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - x.max(-1, keepdims=True)
    )


def test_ctc_forward_helper_agrees_with_tf_ctc_loss():
    rng = np.random.default_rng(1)
    logprobs = _log_softmax(rng.normal(size=(7, 4)))
    labels = [1, 1, 2]
    loss = tf.nn.ctc_loss(
        labels=tf.constant([labels]),
        logits=tf.constant(logprobs[:, None, :], tf.float32),
        label_length=[3],
        logit_length=[7],
        logits_time_major=True,
        blank_index=3,
    )
    assert abs(-float(loss[0]) - _ctc_log_prob(logprobs, labels, 3)) < 1e-4


def test_beam_search_finds_the_most_probable_labelling_by_brute_force():
    rng = np.random.default_rng(2)
    blank, classes, frames = 2, 3, 5
    for _ in range(5):
        logprobs = _log_softmax(rng.normal(size=(frames, classes)) * 2.0)
        labellings = {
            tuple(_collapse(p, blank)) for p in itertools.product(range(classes), repeat=frames)
        }
        scores = {lab: _ctc_log_prob(logprobs, list(lab), blank) for lab in labellings}
        best = max(scores, key=scores.get)
        beam = tuple(beam_decode_ids(logprobs, frames, blank, beam_width=64))
        assert scores[beam] == pytest.approx(scores[best], abs=1e-9)


def test_beam_is_at_least_as_probable_as_greedy():
    rng = np.random.default_rng(3)
    blank = 5
    for _ in range(20):
        frames = int(rng.integers(4, 12))
        logprobs = _log_softmax(rng.normal(size=(frames, blank + 1)) * 1.5)
        greedy = greedy_decode_ids(logprobs, frames, blank)
        beam = beam_decode_ids(logprobs, frames, blank, beam_width=8)
        assert _ctc_log_prob(logprobs, beam, blank) >= _ctc_log_prob(logprobs, greedy, blank) - 1e-9


def test_beam_respects_length_and_width_one_is_greedy_on_peaked_inputs():
    rng = np.random.default_rng(4)
    blank = 3
    path = rng.integers(0, blank + 1, size=15).tolist()
    logprobs = _one_hot_logprobs(path, blank + 1)
    assert beam_decode_ids(logprobs, 15, blank, beam_width=1) == _collapse(path, blank)
    assert beam_decode_ids(logprobs, 6, blank, beam_width=4) == _collapse(path[:6], blank)
    assert beam_decode_ids(logprobs, 0, blank, beam_width=4) == []
    with pytest.raises(ValueError, match="beam_width"):
        beam_decode_ids(logprobs, 15, blank, beam_width=0)


# --------------------------------------------------------------------------- metrics


def test_edit_distance_hand_examples():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("", "abc") == 3
    assert edit_distance(["a", "b"], []) == 2
    assert edit_distance("flaw", "lawn") == 2


def test_wer_and_cer_hand_examples():
    # one substitution (sat->sit) and one deletion (the) over 6 reference words
    assert word_errors("the cat sat on the mat", "the cat sit on mat") == (2, 6)
    assert wer(["the cat sat on the mat"], ["the cat sit on mat"]) == pytest.approx(2 / 6)
    # corpus rate: total edits / total reference words, not the mean of utterance rates
    assert wer(["a b c d", "e"], ["a b c d", "x"]) == pytest.approx(1 / 5)
    assert wer(["a b"], [""]) == 1.0
    assert wer(["a"], ["a b c"]) == 2.0  # insertions can exceed 100 %
    assert char_errors("ab  cd", " ab cd ") == (0, 5)  # spaces collapsed
    assert cer(["abcd"], ["abxd"]) == pytest.approx(1 / 4)
    assert cer(["hello world"], ["hello  wrld"]) == pytest.approx(1 / 11)
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        wer(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="references are all empty"):
        cer([""], ["x"])
