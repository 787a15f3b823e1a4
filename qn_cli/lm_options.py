"""The decoding options `qn transcribe`, `qn evaluate` and `qn client` share: --beam, --lm and
the LM beam search's settings."""

from __future__ import annotations

import argparse

LM_HELP = """greedy by default; --beam N for CTC prefix beam search; --lm DIR (an LM
folder from `qn lm build`) for beam search with the n-gram LM, with the folder's tuned
settings (`qn lm tune`) unless --alpha/--beta/--beam are given"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("decoding", LM_HELP)
    group.add_argument(
        "--beam",
        type=int,
        metavar="N",
        help="beam width (without --lm default 1: greedy; with --lm: tuned, else 24)",
    )
    group.add_argument("--lm", metavar="DIR", help="n-gram LM folder (qn lm build)")
    group.add_argument("--alpha", type=float, help="LM weight (default: tuned, else 0.5)")
    group.add_argument("--beta", type=float, help="word insertion bonus (default: tuned, else 1)")
    group.add_argument(
        "--beam-prune", type=float, metavar="LOGP", help="drop beams this far below the best (-10)"
    )
    group.add_argument(
        "--hotword",
        action="append",
        metavar="WORD",
        help="favour this word or phrase (repeatable; works with or without --lm)",
    )
    group.add_argument("--hotword-weight", type=float, help="hotword bonus per character (10)")


def decoder_from_args(args, labels, plain_beam: bool = True):
    """An LM decoder (``--lm`` or ``--hotword``), a prefix beam search (``--beam N``; None
    without ``plain_beam``, for callers with their own), or None for greedy decoding."""
    from qn_cli.main import UserError

    if args.beam is not None and args.beam < 1:
        raise UserError(f"--beam must be >= 1 (got {args.beam})")
    if not args.lm and not args.hotword:
        given = [f"--{n.replace('_', '-')}" for n in ("alpha", "beta", "beam_prune") if
                 getattr(args, n) is not None]  # fmt: skip
        if given:
            raise UserError(f"{', '.join(given)} need --lm DIR")
        if plain_beam and args.beam and args.beam > 1:
            from qn_keras.decoding import PrefixBeamSearch

            return PrefixBeamSearch(labels, args.beam)
        return None
    from qn_keras.lm.decoder import DecoderSettings, LMDecoder
    from qn_keras.lm.folder import load_lm_folder
    from qn_keras.tokenizer import CharTokenizer

    folder = load_lm_folder(args.lm) if args.lm else None
    tokenizer = CharTokenizer(labels)
    hotwords = [tokenizer.normalize(h).text for h in args.hotword or []]
    settings = DecoderSettings().replace(**(folder.tuned if folder else {}))
    settings = settings.replace(
        alpha=args.alpha,
        beta=args.beta,
        beam_width=args.beam,
        beam_prune_logp=args.beam_prune,
        hotwords=tuple(hotwords) or None,
        hotword_weight=args.hotword_weight,
    )
    return LMDecoder(labels, folder, settings)
