"""CTC beam search with an n-gram LM (shallow fusion), over log-probs from any model.

The search is pyctcdecode's (Kensho; the decoder NeMo and Hugging Face use for CTC models with
KenLM): prefix beam search over characters in which every completed word is scored by KenLM,
``score = log P_ctc + alpha * ln P_lm + beta * words``, partial words outside the word list are
penalised (``unk_score_offset``), hotwords get a bonus as they are spelled, and candidates are
pruned per frame (characters below ``token_min_logp`` unless they are the frame's best) and
per beam (``beam_prune_logp`` below the best). Word frames come out of the search itself, so
timestamps need no separate alignment.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np

from qn_keras.errors import UserInputError
from qn_keras.lm.folder import LMFolder, LMFolderError, load_lm_folder

DEFAULT_BEAM_WIDTH = 24


class LMNotInstalled(UserInputError):
    """The `lm` extra (kenlm, pyctcdecode) is missing."""


def _quiet_small_vocabulary(record) -> bool:
    # pyctcdecode warns about word lists under 1,000 words; small domain LMs are legitimate.
    return "unigrams passed as vocabulary" not in record.getMessage()


def _import_decoder_libraries(with_kenlm: bool):
    try:
        kenlm = __import__("kenlm") if with_kenlm else None
        from pyctcdecode.alphabet import Alphabet
        from pyctcdecode.decoder import BeamSearchDecoderCTC
        from pyctcdecode.language_model import LanguageModel
    except ImportError as e:
        raise LMNotInstalled(
            f"LM decoding needs the lm extra ({e.name} is missing): "
            "CMAKE_POLICY_VERSION_MINIMUM=3.5 pip install 'qn-keras[lm]' (kenlm compiles "
            "from source with cmake)"
        ) from None
    logger = logging.getLogger("pyctcdecode.language_model")
    if _quiet_small_vocabulary not in logger.filters:
        logger.addFilter(_quiet_small_vocabulary)
    return kenlm, Alphabet, BeamSearchDecoderCTC, LanguageModel


@dataclasses.dataclass(frozen=True)
class DecoderSettings:
    """Beam search settings. ``alpha``: LM weight; ``beta``: bonus per word (counters the LM's
    preference for few words); ``hotwords``: words (or phrases) to favour by
    ``hotword_weight`` per character, even outside the LM's vocabulary."""

    alpha: float = 0.5
    beta: float = 1.0
    beam_width: int = DEFAULT_BEAM_WIDTH
    beam_prune_logp: float = -10.0
    token_min_logp: float = -4.0
    hotwords: tuple[str, ...] = ()
    hotword_weight: float = 10.0
    unk_score_offset: float = -10.0

    def __post_init__(self):
        if int(self.beam_width) < 1:
            raise UserInputError(f"beam width must be >= 1 (got {self.beam_width})")
        for name in ("alpha", "beta", "beam_prune_logp", "token_min_logp", "hotword_weight"):
            value = getattr(self, name)
            if not np.isfinite(value):
                raise UserInputError(f"{name} must be a finite number (got {value})")
        if self.beam_prune_logp > 0 or self.token_min_logp > 0:
            raise UserInputError("beam_prune_logp and token_min_logp are log-probs, <= 0")
        object.__setattr__(self, "hotwords", tuple(self.hotwords))

    def replace(self, **changes) -> DecoderSettings:
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


@dataclasses.dataclass(frozen=True)
class DecodedText:
    """The best hypothesis: its text, its words with ``(first_frame, end_frame)`` output-frame
    spans (end exclusive), and its combined acoustic + LM score."""

    text: str
    word_frames: tuple[tuple[str, int, int], ...]
    score: float

    def words(self, frame_seconds: float) -> list[dict]:
        """Word timestamps in seconds, in the format of greedy decoding's."""
        return [
            {"word": w, "start": round(s * frame_seconds, 3), "end": round(e * frame_seconds, 3)}
            for w, s, e in self.word_frames
        ]


def _frames_that_matter(logprobs: np.ndarray, blank: int, token_min_logp: float) -> np.ndarray:
    """Indices of the frames the search needs: all but the second and later frames of each run
    of frames where only the blank passes ``token_min_logp``. On such a frame the search only
    adds the blank's log-prob to every beam, and after the run's first frame that is the same
    constant for all beams: dropping those frames changes no ranking, pruning or result (only
    the reported score, by a constant). Timestamps are mapped back through these indices."""
    best = np.argmax(logprobs, axis=-1)
    others = np.delete(logprobs, blank, axis=-1).max(axis=-1)
    blank_only = (best == blank) & (others < token_min_logp)
    repeat = blank_only.copy()
    repeat[1:] &= blank_only[:-1]
    repeat[0] = False
    return np.flatnonzero(~repeat)


class LMDecoder:
    """Beam search with a KenLM n-gram LM over a model's log-probs (blank = last class).

    Example:
        >>> decoder = LMDecoder(tokenizer.labels, "lms/fortunes-4")   # tuned settings, if any
        >>> decoder.decode(logprobs, length).text
        'hello world'
    """

    def __init__(
        self,
        labels: Sequence[str],
        lm: LMFolder | str | None = None,
        settings: DecoderSettings | None = None,
    ):
        self.labels = tuple(labels)
        self.folder = lm if lm is None or isinstance(lm, LMFolder) else load_lm_folder(lm)
        kenlm, Alphabet, BeamSearchDecoderCTC, LanguageModel = _import_decoder_libraries(
            with_kenlm=self.folder is not None
        )
        if settings is None:  # the folder's tuned settings (decoder.json), if it has any
            settings = DecoderSettings().replace(**(self.folder.tuned if self.folder else {}))
        self.settings = settings.replace(hotwords=self._check_hotwords(settings.hotwords))
        language_model = None
        if self.folder is not None:
            self.folder.check_labels(self.labels)
            try:
                model = kenlm.Model(str(self.folder.lm_file))
            except (OSError, RuntimeError) as e:
                raise LMFolderError(f"{self.folder.lm_file}: KenLM cannot load it ({e})") from None
            language_model = LanguageModel(
                model,
                self.folder.unigrams,
                alpha=float(self.settings.alpha),
                beta=float(self.settings.beta),
                unk_score_offset=float(self.settings.unk_score_offset),
                score_boundary=True,
            )
        # Our labels are exact (blank appended last); pyctcdecode's own alphabet heuristics
        # ("_" or "|" substitutions) must not apply.
        alphabet = Alphabet([*self.labels, ""], is_bpe=False)
        self._decoder = BeamSearchDecoderCTC(alphabet, language_model)

    def __del__(self):
        # pyctcdecode keeps each decoder's LM in a class-level dict until told to let it go.
        decoder = getattr(self, "_decoder", None)
        if decoder is not None:
            decoder.cleanup()

    @classmethod
    def from_folder(cls, labels, lm_dir, **settings) -> LMDecoder:
        """The folder's tuned settings (``decoder.json``), overridden by those given here
        (None: keep)."""
        folder = load_lm_folder(lm_dir)
        return cls(labels, folder, DecoderSettings().replace(**folder.tuned).replace(**settings))

    def _check_hotwords(self, hotwords) -> tuple[str, ...]:
        allowed = set(self.labels)
        out = []
        for phrase in hotwords:
            phrase = " ".join(str(phrase).split())
            outside = sorted(set(phrase) - allowed)
            if outside:
                raise UserInputError(
                    f"hotword {phrase!r} has characters outside the model's labels: {outside}"
                )
            if phrase:
                out.append(phrase)
        return tuple(out)

    def set_weights(self, alpha: float, beta: float) -> None:
        """Changes the LM weight and word bonus in place (tuning reuses one loaded LM)."""
        self.settings = self.settings.replace(alpha=float(alpha), beta=float(beta))
        if self._decoder._language_model is not None:
            self._decoder.reset_params(alpha=float(alpha), beta=float(beta))

    def decode(self, logprobs: np.ndarray, length: int | None = None) -> DecodedText:
        """The best hypothesis for one utterance's ``[frames, classes]`` log-probs."""
        logprobs = np.asarray(logprobs, dtype=np.float32)
        if logprobs.ndim != 2 or logprobs.shape[-1] != len(self.labels) + 1:
            raise UserInputError(
                f"log-probs of shape {logprobs.shape} do not fit {len(self.labels)} labels + "
                f"blank: expected [frames, {len(self.labels) + 1}]"
            )
        if length is not None:
            logprobs = logprobs[: int(length)]
        if len(logprobs) == 0:
            return DecodedText("", (), 0.0)
        if not np.all(np.isfinite(logprobs)):
            raise UserInputError("log-probs hold NaN or infinite values; nothing to decode")
        s = self.settings
        kept = _frames_that_matter(logprobs, len(self.labels), s.token_min_logp)
        beams = self._decoder.decode_beams(
            logprobs[kept],
            beam_width=int(s.beam_width),
            beam_prune_logp=float(s.beam_prune_logp),
            token_min_logp=float(s.token_min_logp),
            prune_history=True,  # only the best beam is used
            hotwords=list(s.hotwords) or None,
            hotword_weight=float(s.hotword_weight),
        )
        text, _, word_frames, _, score = beams[0]
        return DecodedText(
            text=text,
            word_frames=tuple((w, int(kept[a]), int(kept[b - 1]) + 1) for w, (a, b) in word_frames),
            score=float(score),
        )

    def decode_texts(self, logprobs, lengths) -> list[str]:
        """Texts of a padded batch ``[batch, frames, classes]``."""
        return [self.decode(logprobs[b], lengths[b]).text for b in range(len(logprobs))]


# A decoder per worker process, built once by _init_worker (spawned processes share nothing).
_WORKER_DECODER: list = []


def _init_worker(labels, lm_path, settings) -> None:
    import signal

    # Ctrl-C reaches the whole process group: the parent stops the pool; workers stay quiet.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _WORKER_DECODER[:] = [LMDecoder(labels, lm_path, settings)]


def _decode_in_worker(logprobs, length) -> DecodedText:
    return _WORKER_DECODER[0].decode(logprobs, length)


def _ready() -> bool:
    return bool(_WORKER_DECODER)


class ParallelLMDecoder:
    """An :class:`LMDecoder` in worker processes: ``decode_async`` returns a future, so the
    search (Python, GIL-bound) runs beside the model instead of after it. Workers are spawned
    (no TensorFlow in them) and start loading the LM at once, while the caller loads its model.

    Example:
        >>> with ParallelLMDecoder(LMDecoder(labels, "lms/en-4"), processes=1) as decoder:
        ...     future = decoder.decode_async(logprobs, length)
        ...     future.result().text
    """

    def __init__(self, decoder: LMDecoder, processes: int = 1):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self.decoder = decoder
        self.labels = decoder.labels
        self.settings = decoder.settings
        lm_path = str(decoder.folder.path) if decoder.folder is not None else None
        self._pool = ProcessPoolExecutor(
            max_workers=max(1, int(processes)),
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(decoder.labels, lm_path, decoder.settings),
        )
        self._warm = [self._pool.submit(_ready) for _ in range(max(1, int(processes)))]

    def decode_async(self, logprobs, length=None):
        return self._pool.submit(_decode_in_worker, np.asarray(logprobs, np.float32), length)

    def decode(self, logprobs, length=None) -> DecodedText:
        return self.decode_async(logprobs, length).result()

    def decode_texts(self, logprobs, lengths) -> list[str]:
        futures = [self.decode_async(logprobs[b], lengths[b]) for b in range(len(logprobs))]
        return [f.result().text for f in futures]

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
