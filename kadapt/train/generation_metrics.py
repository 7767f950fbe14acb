"""Text-generation metrics over several references per source: corpus BLEU (sacrebleu), ROUGE-L (rouge-score)
and METEOR (nltk, only when its WordNet data is installed).

Every score is on a 0-100 scale, as the E2E and WebNLG papers report them. A metric that cannot be computed
here is ``None`` with the reason under ``"<name>_unavailable"``, never a silent zero:

    scores = generation_metrics(["a b c d"], [["a b c d e f", "a b c d x"]])
    scores["bleu"], scores["rouge_l"], scores["meteor"], scores.get("meteor_unavailable")
"""
from __future__ import annotations

from typing import Sequence

__all__ = ["bleu", "check_metric_packages", "generation_metrics", "meteor", "meteor_unavailable_reason", "rouge_l"]

_INSTALL = "install it with `pip install {package}` (or kadapt's `train` extra)"
REQUIRED = {"sacrebleu": "sacrebleu", "rouge_score": "rouge-score"}  # module -> package (BLEU, ROUGE-L)


def check_metric_packages() -> None:
    """ImportError naming the packages to install when BLEU or ROUGE-L cannot be computed (METEOR is optional)."""
    import importlib.util

    missing = [package for module, package in REQUIRED.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise ImportError(f"BLEU and ROUGE-L need {', '.join(missing)}: install with `pip install "
                          f"{' '.join(missing)}` (or kadapt's `train` extra)")


def _check(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"references: expected one list of references per hypothesis ({len(hypotheses)}), "
                         f"got {len(references)}")
    for i, refs in enumerate(references):
        if isinstance(refs, str) or not refs:
            raise ValueError(f"references[{i}]: expected a non-empty list of reference strings, got {refs!r}")


def bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU (sacrebleu, 13a tokenisation, cased) with every hypothesis scored against all its references;
    sources may have different numbers of references."""
    _check(hypotheses, references)
    try:
        import sacrebleu
    except ImportError as err:  # pragma: no cover - the train extra installs it
        raise ImportError(f"BLEU needs sacrebleu: {_INSTALL.format(package='sacrebleu')}") from err
    width = max(len(refs) for refs in references)
    # sacrebleu takes reference *streams* (stream j = the j-th reference of every source); None pads the
    # sources that have fewer references and is ignored.
    streams = [[refs[j] if j < len(refs) else None for refs in references] for j in range(width)]
    return float(sacrebleu.corpus_bleu(list(hypotheses), streams).score)


def rouge_l(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """ROUGE-L F-measure (rouge-score, Porter stemming): per hypothesis the best over its references, averaged."""
    _check(hypotheses, references)
    try:
        from rouge_score import rouge_scorer
    except ImportError as err:  # pragma: no cover
        raise ImportError(f"ROUGE-L needs rouge-score: {_INSTALL.format(package='rouge-score')}") from err
    if not hypotheses:
        return 0.0
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    total = sum(scorer.score_multi(list(refs), hyp)["rougeL"].fmeasure for hyp, refs in zip(hypotheses, references))
    return 100.0 * total / len(hypotheses)


def meteor_unavailable_reason() -> str | None:
    """Why METEOR cannot be computed here (nltk or its WordNet data missing), or None when it can."""
    try:
        import nltk
    except ImportError:
        return f"nltk is not installed; {_INSTALL.format(package='nltk')}"
    for resource in ("corpora/wordnet", "corpora/wordnet.zip"):
        try:
            nltk.data.find(resource)
            break
        except LookupError:
            continue
    else:
        return ("nltk's WordNet data is not installed (METEOR's synonym matching needs it; "
                "run `python -m nltk.downloader wordnet`)")
    try:
        from nltk.corpus import wordnet
        wordnet.ensure_loaded()
    except Exception as err:  # noqa: BLE001 - a corrupt or partial download
        return f"nltk's WordNet data could not be loaded: {type(err).__name__}: {err}"
    return None


def meteor(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean sentence METEOR (nltk; lower-cased whitespace tokens, all references of a source at once).
    Raises RuntimeError naming the reason when nltk or its WordNet data is missing."""
    _check(hypotheses, references)
    reason = meteor_unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"METEOR unavailable: {reason}")
    from nltk.translate.meteor_score import meteor_score
    if not hypotheses:
        return 0.0
    total = sum(meteor_score([r.lower().split() for r in refs], hyp.lower().split())
                for hyp, refs in zip(hypotheses, references))
    return 100.0 * total / len(hypotheses)


def generation_metrics(hypotheses: Sequence[str], references: Sequence[Sequence[str]]
                       ) -> dict[str, float | str | None]:
    """``{"bleu", "rouge_l", "meteor"}`` on a 0-100 scale; ``"meteor"`` is None and ``"meteor_unavailable"``
    says why when METEOR cannot be computed in this environment."""
    scores: dict[str, float | str | None] = {"bleu": bleu(hypotheses, references),
                                            "rouge_l": rouge_l(hypotheses, references)}
    reason = meteor_unavailable_reason()
    if reason is None:
        scores["meteor"] = meteor(hypotheses, references)
    else:
        scores["meteor"] = None
        scores["meteor_unavailable"] = reason
    return scores
