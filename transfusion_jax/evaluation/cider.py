"""CIDEr-D, the COCO caption metric, in pure Python (no Java, no pycocoevalcap at run time).

CIDEr (Vedantam, Zitnick and Parikh, 2015, arXiv:1411.5726) scores a candidate caption by its
consensus with an image's human references: each caption becomes, for n = 1..4, a vector of its
n-grams weighted by term frequency x inverse document frequency, and the score is the cosine
similarity of the candidate's vector with each reference's, averaged over the references and over
n. The "-D" variant, the one COCO reports and `pycocoevalcap.cider` computes, adds two guards
against gaming: a Gaussian penalty on the difference in length (sigma = 6) and clipping of the
candidate's n-gram weights by the reference's (repeating a good word does not pay). Scores are
scaled by 10, so a good captioner scores around 1 on COCO.

The document frequencies come from the references given: an n-gram is counted once per image
whose references contain it, and idf = log(number of images) - log(df). Scores therefore depend
on the evaluation set, exactly as in COCO: the same caption scores differently against a different
set of images, and an n-gram that every image's references contain weighs nothing.

`cider_scores` reproduces `pycocoevalcap.cider.cider_scorer.CiderScorer` number for number
(tests/test_cider.py checks it to 1e-9), including its quirks: the length in the penalty is the
candidate's number of bigrams (words - 1), and an n-gram absent from the references gets
df = 1. `tokenize_caption` stands in for the Java PTBTokenizer that COCO runs first.
"""

import math
import re
from collections import Counter

import numpy as np

# The tokens pycocoevalcap/tokenizer/ptbtokenizer.py drops after Stanford's PTBTokenizer. Its
# tokenizer runs with -lowerCase, so the bracket tokens come out as "-lrb-" etc. and are NOT in
# this (upper-case) list: COCO keeps brackets as words, and so does `tokenize_caption`.
PUNCTUATIONS = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--",
     "...", ";"]
)  # fmt: skip

BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}

# Characters mapped one to one before tokenizing, as the Java lexer normalizes them: double curly
# quotes to '"', the left single one to "`" (a quote, never an apostrophe), euro to "$" and pound
# to "#" (PTB's currency convention). The right single quote is an apostrophe to the lexer
# ("don’t" -> do n't) but an apostrophe word keeps it ("o’clock"), so it is mapped for
# lexing only. Dashes and "…" are matched as tokens below.
_NORMALIZE = str.maketrans(
    {"\u2018": "`", "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u20ac": "$", "\u00a3": "#",
     "\u00a0": " "}
)  # fmt: skip
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u201b": "'", "\u00b4": "'"})

# Abbreviations that keep their period, after Stanford's PTBLexer (version 3.4.1, the jar COCO
# uses). Matched caselessly except for the capitalised state names, which the lexer only takes
# capitalised ("Ill." stays one token, "ill." is a word and a period).
_ABBREVIATIONS_CASELESS = (
    # titles
    "mr|mrs|ms|drs?|profs?|sens?|reps?|attys?|lt|col|gen|messrs|govs?|adm|rev|maj|sgt|cpl|pvt|mt|"
    "capt|ste?|ave|pres|lieut|hon|brig|co?mdr|pfc|spc|supts?|det|mme|mmes|mlle|mlles|"
    # months, days, states
    "jan|feb|mar|apr|jun|jul|aug|sep|sept|oct|nov|dec|mon|tues?|wed|thu|thurs|fri|"
    "ala|ariz|calif|colo|conn|ct|dak|fla|ga|ind|kans?|ky|md|mich|minn|mo|mont|neb|nev|okla|penn|"
    "tenn|va|vt|wis|wyo|"
    # companies, name suffixes, others
    "inc|cos?|corp|pp?tys?|ltd|plc|bancorp|dept|bhd|assn|univ|intl|sys|jr|sr|bros|ed\\.d|ph\\.d|"
    "blvd|rd|esq|etc|al|seq|vs|alex|wm|jos|cie|cf|treas|invt|elec|natl|m[ft]g"
)
_ABBREVIATIONS_CAPITALISED = "Ark|Del|Ill|La|Mass|Miss|Ore|Pa|Wash|Tex"
# only before a number: "No. 5", "fig. 3"
_ABBREVIATIONS_BEFORE_NUMBER = "ca|figs?|prop|nos?|art|bldg|pp|op|tel|est|ext|sq|ft"

_REDUCED_AUXILIARY = r"'(?:s|m|d|ll|re|ve)"  # "dog's", "I'm", "we'd", "we'll", "you're", "I've"

# Candidate tokens, tried at each position; the longest match wins and ties go to the earlier
# pattern, as in the JFlex lexer. "word" tokens have their contractions split, "smiley" ones their
# brackets renamed; the rest stand as matched.
_TOKEN_PATTERNS = [
    ("url", r"https?://[^\s\"<>|()]*[^\s\"<>|.!?(){},-]"),
    ("url", r"www\.(?:[^\s\"<>|.!?(){},]+\.)+[a-zA-Z]{2,4}(?:/[^\s\"<>|()]*[^\s\"<>|.!?(){},-])?"),
    ("url", r"(?:[^\s\"`'<>|.!?(){},\-_$]+\.)+(?:com|net|org|edu)(?![A-Za-z])"),
    ("email", r"[A-Za-z0-9][^\s\"<>|()]*@(?:[^\s\"<>|().]+\.)*[^\s\"<>|().]+"),
    ("keep", r"@[A-Za-z_][A-Za-z_0-9]*|#[^\W\d_]\w*"),  # Twitter names and hashtags
    ("keep", r"</?[A-Za-z!][^>]*>"),  # SGML tags
    ("smiley", r"[<>]?[:;=][-o*']?[()DPdpO\\{@|\[\]](?![A-Za-z])"),
    ("keep", r"[-^x=~<>']_[-^x=~<>']"),  # "^_^"
    ("keep", r"[^\W\d_]+(?:[?!][^\W\d_]+)+"),  # the lexer keeps "a?b", "dogs!cats" whole
    ("keep", r"[A-Za-z](?:\.[A-Za-z])*\."),  # acronyms and initials: "U.S.", "p.m.", "J."
    ("keep", rf"(?i:{_ABBREVIATIONS_CASELESS})\.|(?:{_ABBREVIATIONS_CAPITALISED})\."),
    ("keep", rf"(?i:{_ABBREVIATIONS_BEFORE_NUMBER})\.(?=\s*\d)"),
    ("keep", r"[A-Z]+(?:[+&][A-Z]+)+"),  # "AT&T", "R&B"
    ("keep", r"[A-Z]+\$"),  # "US$"
    ("keep", r"[-+]?(?:\d*(?:[.:,]\d+)+|\d+)"),  # numbers: "-5", "3.5", "1,000", "5:30", ".5"
    ("keep", r"[^\W\d_]\w*(?:\.[^\W\d_]\w*)+"),  # dotted words: "a.m", "dog.a"
    ("word", r"\w+(?:[-/]\w+)*(?:'\w+(?:[-/]\w+)*)*"),  # words, with hyphens, slashes, apostrophes
    ("keep", r"'(?:cause|til|till|em|[2-9]0s|n'|n)(?![A-Za-z])|(?i:ol)'"),  # 'cause, 'n', ol'
    ("keep", r"'t(?=(?:is|was)(?![A-Za-z]))"),  # 'tis -> 't is, 'twas -> 't was
    ("keep", rf"(?i:{_REDUCED_AUXILIARY}|n't)(?![A-Za-z])"),  # detached: "dog 's", "do n't"
    ("keep", r"``|''|\.\.+|\u2026|[?!]+|[-\u2013\u2014\u2015]+"),  # quotes, ellipses, ?!, dashes
    ("keep", r"\S"),  # any other symbol stands alone
]
_COMPILED_PATTERNS = [(kind, re.compile(pattern)) for kind, pattern in _TOKEN_PATTERNS]
_SPACE = re.compile(r"\s+")

# Words the lexer splits whole: "cannot" -> "can not", "gonna" -> "gon na".
_WHOLE_WORD_SPLITS = {
    "cannot": ("can", "not"),
    "gonna": ("gon", "na"),
    "gotta": ("got", "ta"),
    "wanna": ("wan", "na"),
    "lemme": ("lem", "me"),
    "gimme": ("gim", "me"),
}
_NOT_SUFFIX = re.compile(r"(?i)((?:.*[^\W\d_])?)(n't)")  # "do|n't", a lone "n't"
_AUXILIARY_SUFFIX = re.compile(rf"(?i)(.+?)({_REDUCED_AUXILIARY}|'n)")
_NOT_OR_AUXILIARY = re.compile(rf"(?i)n't|{_REDUCED_AUXILIARY}")
_DASHES = frozenset("-\u2013\u2014\u2015")
# Words kept whole despite an apostrophe: "o'clock", "O'Neil", "d'you" (one letter other than i
# or y, then two or more letters), "ma'am", "ne'er" (vowel, apostrophe, vowel), "c'mon".
_APOSTROPHE_WORD = re.compile(
    r"(?i)[a-hj-xz]'[^\W\d_]{2,}|[^\W\d_]+[aeiouy]'[aeiou][^\W\d_]*|c'mon"
)


def _split_word(word: str) -> list[str]:
    """Splits a word's contractions the PTB way: "don't" -> do n't, "dog's" -> dog 's."""
    if "'" not in word:
        return list(_WHOLE_WORD_SPLITS.get(word.lower(), (word,)))
    suffixes = []
    while True:
        if m := _NOT_SUFFIX.fullmatch(word):
            word, suffix = m.group(1), m.group(2)
        elif m := _AUXILIARY_SUFFIX.fullmatch(word):
            word, suffix = m.group(1), m.group(2)
        else:
            break
        suffixes.insert(0, suffix)
        if not word:
            return suffixes
        if "'" not in word:
            break
    if "'" not in word or _APOSTROPHE_WORD.fullmatch(word):
        head = [word]
    elif word[:2].lower() == "y'":  # "y'all" -> y' all
        head = [word[:2], *_split_word(word[2:])]
    elif "'n'" in word.lower():  # "rock'n'roll" -> rock 'n' roll
        i = word.lower().index("'n'")
        head = [*_split_word(word[:i]), word[i : i + 3], *_split_word(word[i + 3 :])]
    else:  # any other apostrophe is a quote or a foot mark: "5'6" -> 5 ' 6
        head = []
        for i, part in enumerate(word.split("'")):
            head += ["'"] if i else []
            head += _split_word(part) if part else []
    return head + suffixes


def _lex(text: str) -> list[str]:
    """The PTB tokens of one line, case kept, punctuation still in."""
    text = text.translate(_NORMALIZE)
    lexed = text.translate(_APOSTROPHES)  # same length: spans index both
    tokens = []
    pos = 0
    while pos < len(lexed):
        if space := _SPACE.match(lexed, pos):
            pos = space.end()
            continue
        best_kind, best = None, None
        for kind, pattern in _COMPILED_PATTERNS:
            m = pattern.match(lexed, pos)
            if m and m.end() > pos and (best is None or m.end() > best.end()):
                best_kind, best = kind, m
        token = best.group()
        pos = best.end()
        if best_kind == "word":
            start = best.start()
            for piece in _split_word(token):
                # a contraction is written with ASCII apostrophes, an apostrophe word as given
                contraction = _NOT_OR_AUXILIARY.fullmatch(piece) or piece == "'"
                tokens.append(piece if contraction else text[start : start + len(piece)])
                start += len(piece)
        elif best_kind == "smiley":
            tokens.append("".join(BRACKETS.get(c, c) for c in token))
        elif token in BRACKETS:
            tokens.append(BRACKETS[token])
        elif _NOT_OR_AUXILIARY.fullmatch(token):
            tokens.append(token)
        elif set(token) <= _DASHES:
            tokens.append("--")  # a dash of any length: dropped with the punctuation
        elif token.startswith("..") or token == "\u2026":
            tokens.append("...")
        elif token == '"':
            tokens.append("''")
        elif set(token) <= {"'", "`"}:
            tokens.append(token)  # a quote, dropped
        else:
            tokens.append(text[best.start() : best.end()])
    return tokens


def tokenize_caption(text: str) -> list[str]:
    """A pure-Python stand-in for the COCO evaluation's tokenizer: Stanford CoreNLP 3.4.1's
    PTBTokenizer (Java) with -preserveLines -lowerCase, then pycocoevalcap's removal of the
    `PUNCTUATIONS` tokens.

    What it does: maps curly quotes to straight ones, dashes to "--", "…" to "...", "€" to "$" and
    "£" to "#"; splits the line into PTB tokens (longest match first, like the Java lexer): words
    with inner hyphens, slashes and apostrophes ("t-shirt", "and/or", "o'clock"), numbers ("3.5",
    "1,000", "-5", "5:30"), URLs, e-mail addresses, acronyms and the lexer's abbreviations with
    their period ("u.s.", "p.m.", "mr.", "st.", "etc.", single letters "a."), and every other
    symbol alone ("$ 5", "50 %"); splits contractions as PTB does ("don't" -> do n't, "can't" ->
    ca n't, "dog's" -> dog 's, "I'll" -> i 'll, "dogs'" -> dogs '), and "cannot", "gonna",
    "gotta", "wanna", "lemme", "gimme" ("can not", "gon na", ...); turns brackets into
    -lrb- -rrb- -lsb- -rsb- -lcb- -rcb- and smileys ":)" into ":-rrb-"; lowercases; drops the
    punctuation tokens COCO drops (".", ",", "?", "!", ":", ";", quotes, "-", "--", "...").
    Brackets survive as "-lrb-" etc. because COCO's punctuation list is upper case while its
    tokenizer lowercases; "?!", "!!" and "??" survive too, as in COCO.

    Where it is known to differ from the Java tokenizer: it is a regular-expression approximation
    of a large JFlex lexer, so rare forms can come out differently: contractions stacked or glued
    to odd words ("you'ven't", "onn't", "t-shirtn't": Java leaves some of these unsplit), the
    curly-apostrophe spellings of "c'mon" and "'tis" (Java: "c 'm on", "tis"), "j.r.r." (loses its
    final period here), apostrophe words and abbreviations outside the lists above (e.g.
    "nor'easter"), numbers run into words without spaces ("1,000e-mail"), HTML entities ("&amp;"
    is not decoded), the lexer's other Unicode normalizations (other currency signs, fractions,
    soft hyphens), and Java's locale rules for lower case. Checked against the Java tokenizer
    on the 8,543 Flickr8k and emoji captions in ../shared/data, the same captions un-tokenized
    ("dog's", "end."), and 3,000 random captions of words with quotes, brackets, dashes and
    punctuation attached: identical, token for token.
    """
    tokens = (token.lower() for token in _lex(text.replace("\n", " ")))
    return [token for token in tokens if token not in PUNCTUATIONS]


def _ngram_counts(words: list[str], max_n: int) -> Counter:
    return Counter(
        tuple(words[i : i + k]) for k in range(1, max_n + 1) for i in range(len(words) - k + 1)
    )


def _validate(candidates, references) -> None:
    if isinstance(candidates, str) or not isinstance(candidates, (list, tuple)):
        raise ValueError(f"candidates must be a list of strings, got {type(candidates).__name__}")
    if len(candidates) != len(references):
        raise ValueError(
            f"{len(candidates)} candidates but {len(references)} reference lists: give one list "
            f"of references per candidate"
        )
    if not candidates:
        raise ValueError("CIDEr needs at least one image (document frequencies need a corpus)")
    for i, (candidate, refs) in enumerate(zip(candidates, references, strict=True)):
        if not isinstance(candidate, str):
            raise ValueError(f"candidate {i} is a {type(candidate).__name__}, not a string")
        if isinstance(refs, str) or not isinstance(refs, (list, tuple)):
            raise ValueError(f"references[{i}] must be a list of strings, not a single string")
        if not refs:
            raise ValueError(f"image {i} has no references: CIDEr needs at least one per image")
        for j, ref in enumerate(refs):
            if not isinstance(ref, str):
                raise ValueError(f"references[{i}][{j}] is a {type(ref).__name__}, not a string")


def cider_scores(
    candidates: list[str],
    references: list[list[str]],
    tokenize: bool = True,
    *,
    max_n: int = 4,
    sigma: float = 6.0,
) -> np.ndarray:
    """CIDEr-D of each candidate against its image's references, as pycocoevalcap computes it.

    candidates[i] is the caption for image i, references[i] that image's reference captions (at
    least one). With tokenize=True every caption goes through `tokenize_caption` first (what COCO
    does with PTBTokenizer); with tokenize=False they are split on whitespace as given. The
    document frequencies come from all the references passed, so scores depend on the set.
    """
    _validate(candidates, references)
    split = tokenize_caption if tokenize else str.split
    candidate_counts = [_ngram_counts(split(c), max_n) for c in candidates]
    reference_counts = [[_ngram_counts(split(r), max_n) for r in refs] for refs in references]

    document_frequency = Counter()
    for refs in reference_counts:  # each n-gram once per image
        document_frequency.update(set().union(*refs))
    log_num_images = math.log(float(len(references)))

    def tfidf(counts: Counter):
        """Per n: {ngram: tf x idf}, the vector's norm, and the length the penalty uses."""
        vectors = [{} for _ in range(max_n)]
        norms = [0.0] * max_n
        for ngram, term_freq in counts.items():
            idf = log_num_images - math.log(max(1.0, document_frequency[ngram]))
            weight = float(term_freq) * idf
            vectors[len(ngram) - 1][ngram] = weight
            norms[len(ngram) - 1] += weight**2
        # pycocoevalcap counts the bigrams here (`if n == 1` on a 0-based n): words - 1
        length = sum(t for ngram, t in counts.items() if len(ngram) == 2)
        return vectors, [math.sqrt(x) for x in norms], length

    scores = np.zeros(len(candidates))
    for i, (counts, refs) in enumerate(zip(candidate_counts, reference_counts, strict=True)):
        vec, norm, length = tfidf(counts)
        total = np.zeros(max_n)
        for ref in refs:
            vec_ref, norm_ref, length_ref = tfidf(ref)
            penalty = math.exp(-(float(length - length_ref) ** 2) / (2 * sigma**2))
            for n in range(max_n):
                # the "-D" clipping: a candidate n-gram counts at most as much as in the reference
                value = sum(
                    min(w, vec_ref[n].get(g, 0.0)) * vec_ref[n].get(g, 0.0)
                    for g, w in vec[n].items()
                )
                if norm[n] != 0 and norm_ref[n] != 0:
                    value /= norm[n] * norm_ref[n]
                total[n] += value * penalty
        scores[i] = np.mean(total) / len(refs) * 10.0
    return scores


def cider(
    candidates: list[str],
    references: list[list[str]],
    tokenize: bool = True,
    *,
    max_n: int = 4,
    sigma: float = 6.0,
) -> float:
    """Corpus CIDEr-D: the mean of `cider_scores`, the number COCO reports (x100 in papers)."""
    scores = cider_scores(candidates, references, tokenize, max_n=max_n, sigma=sigma)
    return float(np.mean(scores))
