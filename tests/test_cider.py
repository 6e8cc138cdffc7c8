"""CIDEr-D against pycocoevalcap's reference code, two cases worked out by hand, and the
pure-Python tokenizer against the Java PTBTokenizer COCO runs (where java is installed)."""

import json
import math
import pathlib
import random
import shutil

import numpy as np
import pytest

from transfusion_jax.evaluation.cider import cider, cider_scores, tokenize_caption

ROOT = pathlib.Path(__file__).resolve().parents[1]
FLICKR = ROOT.parent / "shared" / "data" / "flickr8k_1k" / "metadata.jsonl"

# (candidate, references): an exact copy of a reference, no overlap, partial overlap, a much
# shorter and a much longer candidate, repeated words (the "-D" clipping), an empty candidate.
FIXTURE = [
    (
        "a dog runs on the grass",
        ["a dog runs on the grass", "a brown dog running on grass", "the dog is in a field"],
    ),
    (
        "an airplane in the sky",
        [
            "two cats sleep on a sofa",
            "cats sleeping together",
            "a pair of cats on a couch",
            "two kittens asleep",
        ],
    ),
    (
        "a man rides a red bicycle down the street",
        [
            "a man riding a bike",
            "a person on a red bicycle in the street",
            "a cyclist rides down a city street",
            "man on a bicycle",
            "a red bike and its rider",
        ],
    ),
    (
        "dog",
        ["a black dog jumps over a log", "a dog leaping", "a black dog in the air"],
    ),
    (
        "a girl a girl a girl a girl in a pink dress climbs the stairs of a wooden house today",
        [
            "a girl in a pink dress climbs stairs",
            "a little girl going into a wooden building",
            "a girl climbing stairs",
        ],
    ),
    ("", ["a child plays with a ball", "a kid and a ball", "child playing ball"]),
]


def pycoco_scores(candidates, references):
    """pycocoevalcap's Cider, fed the same whitespace-tokenized strings."""
    cider_module = pytest.importorskip(
        "pycocoevalcap.cider.cider", reason="pycocoevalcap (the reference implementation)"
    )
    gts = {i: list(refs) for i, refs in enumerate(references)}
    res = {i: [candidate] for i, candidate in enumerate(candidates)}
    mean, scores = cider_module.Cider().compute_score(gts, res)
    return float(mean), np.asarray(scores)


def random_corpus(seed=0, images=50):
    rng = random.Random(seed)
    vocab = "a the dog cat man woman runs sits on in grass red blue ball with two".split()

    def caption():
        return " ".join(rng.choice(vocab) for _ in range(rng.randint(1, 12)))

    candidates = [caption() for _ in range(images)]
    references = [[caption() for _ in range(rng.randint(1, 5))] for _ in range(images)]
    return candidates, references


@pytest.mark.parametrize("corpus", ["fixture", "random"])
def test_equals_pycocoevalcap(corpus):
    if corpus == "fixture":
        candidates = [c for c, _ in FIXTURE]
        references = [r for _, r in FIXTURE]
    else:
        candidates, references = random_corpus()
    expected_mean, expected = pycoco_scores(candidates, references)
    scores = cider_scores(candidates, references, tokenize=False)
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-9)
    assert cider(candidates, references, tokenize=False) == pytest.approx(expected_mean, abs=1e-9)
    if corpus == "fixture":  # a copy of a reference beats partial overlap beats none
        assert scores[0] > scores[2] > scores[1] == 0.0


def test_tokenized_path_equals_pycocoevalcap_on_tokenized_text():
    candidates = ["A dog's ball, on the grass.", "Two cats (sleeping) on a sofa!"]
    references = [
        ["A dog plays with its ball.", "The dog's red ball is on the grass."],
        ["Cats sleep on the couch.", "Two cats are sleeping; one is black."],
    ]
    tokenized_candidates = [" ".join(tokenize_caption(c)) for c in candidates]
    tokenized_references = [[" ".join(tokenize_caption(r)) for r in refs] for refs in references]
    _, expected = pycoco_scores(tokenized_candidates, tokenized_references)
    np.testing.assert_allclose(cider_scores(candidates, references), expected, rtol=0, atol=1e-9)


def test_ngrams_in_every_image_weigh_nothing():
    """idf = log(N) - log(df) is 0 for an n-gram all N images' references contain, so a caption
    made only of such n-grams scores 0 even when it equals every reference (CIDEr's known
    behaviour: consensus across the whole set carries no information about one image)."""
    caption = "a dog runs"
    assert cider_scores([caption] * 3, [[caption]] * 3, tokenize=False).tolist() == [0, 0, 0]
    # one image is a corpus where everything is in every image: CIDEr is 0 for anything
    assert cider([caption], [[caption, "a dog"]], tokenize=False) == 0.0


def test_two_images_worked_out_by_hand():
    """Image 0: candidate "a dog dog", references "a dog runs" and "a dog"; image 1: candidate
    "a cat runs", reference "a cat". N = 2 images, L = log 2. Document frequency: "a" in both
    images (idf 0), every other n-gram in one image or none (an n-gram no reference has gets
    df 1 too), so its idf is L. Lengths are counted in bigrams (words - 1), as pycocoevalcap
    does; the Gaussian penalty is exp(-delta^2 / 72)."""
    penalty_1 = math.exp(-1 / 72)  # length 2 against length 1
    # Image 0, candidate tf-idf: unigrams {a: 0, dog: 2L}, bigrams {a dog: L, dog dog: L},
    # trigram {a dog dog: L}.
    # vs "a dog runs" {a: 0, dog: L, runs: L} / {a dog: L, dog runs: L} / {a dog runs: L}, same
    # length: n=1 min(2L, L) * L / (2L * sqrt2 L); n=2 L*L / (sqrt2 L * sqrt2 L); n=3 no match.
    vs_first = np.array([1 / (2 * np.sqrt(2)), 1 / 2, 0, 0])
    # vs "a dog" {a: 0, dog: L} / {a dog: L}, length 1: n=1 min(2L, L) * L / (2L * L);
    # n=2 L*L / (sqrt2 L * L); n=3 the reference has no trigram (norm 0): 0.
    vs_second = np.array([1 / 2, 1 / np.sqrt(2), 0, 0]) * penalty_1
    image_0 = 10 * np.mean(vs_first + vs_second) / 2
    # Image 1: {a: 0, cat: L, runs: L} / {a cat: L, cat runs: L} / {a cat runs: L} vs
    # "a cat" {a: 0, cat: L} / {a cat: L}: n=1 L*L / (sqrt2 L * L); n=2 the same.
    image_1 = 10 * np.mean(np.array([1 / np.sqrt(2), 1 / np.sqrt(2), 0, 0]) * penalty_1)

    candidates = ["a dog dog", "a cat runs"]
    references = [["a dog runs", "a dog"], ["a cat"]]
    scores = cider_scores(candidates, references, tokenize=False)
    np.testing.assert_allclose(scores, [image_0, image_1], rtol=1e-12)
    assert image_1 == pytest.approx(5 * penalty_1 / np.sqrt(2))
    # two identical two-word captions in a two-image corpus: (1 + 1 + 0 + 0) / 4 * 10
    assert cider_scores(["a cat", "a dog"], [["a cat"], ["a dog"]], tokenize=False)[0] == (
        pytest.approx(5.0)
    )


@pytest.mark.parametrize(
    "candidates, references, message",
    [
        (["a"], [["a"], ["b"]], "1 candidates but 2 reference lists"),
        (["a", "b"], [["a"], []], "image 1 has no references"),
        (["a", "b"], [["a"], "b"], r"references\[1\] must be a list"),
        (["a", 3], [["a"], ["b"]], "candidate 1 is a int"),
        (["a"], [["a", None]], r"references\[0\]\[1\] is a NoneType"),
        ([], [], "at least one image"),
        ("a dog", [["a dog"]], "candidates must be a list"),
    ],
)
def test_bad_inputs_name_the_index(candidates, references, message):
    with pytest.raises(ValueError, match=message):
        cider_scores(candidates, references)


@pytest.mark.parametrize(
    "text, tokens",
    [
        ("A man riding a wave on top of a surfboard.",
         "a man riding a wave on top of a surfboard"),
        ("It's a dog's life, isn't it?", "it 's a dog 's life is n't it"),
        ("DON'T STOP. Can't. WON'T! Ain't.", "do n't stop ca n't wo n't ai n't"),
        ("I'll go; you'd stay: we've won, they're here, I'm fine.",
         "i 'll go you 'd stay we 've won they 're here i 'm fine"),
        ("The dogs' toys -- and the cat's -- are here...", "the dogs toys and the cat 's are here"),
        ('He said "hello" (twice) to Mr. Smith.', "he said hello -lrb- twice -rrb- to mr. smith"),
        ("A 3-year-old in a t-shirt at 5:30 p.m. in the U.S.",
         "a 3-year-old in a t-shirt at 5:30 p.m. in the u.s."),
        ("It costs $5.50, or 1,000 for 50%!", "it costs $ 5.50 or 1,000 for 50 %"),
        ("Wait... what?! Really??", "wait what ?! really ??"),
        ("We cannot; gonna go at one o'clock", "we can not gon na go at one o'clock"),
        ("don\u2019t \u201cquote\u201d it\u2019s \u2014 ok\u2026", "do n't quote it 's ok"),
        ("Caf\u00e9 NA\u00cfVE\tTabs\nand lines ", "caf\u00e9 na\u00efve tabs and lines"),
        ("A dog 's bone .", "a dog 's bone"),  # already tokenized (Flickr8k style)
        ("", ""),
    ],
)  # fmt: skip
def test_tokenizer_examples(text, tokens):
    assert tokenize_caption(text) == tokens.split()


RAW_CAPTIONS = [
    "A man riding a wave on top of a surfboard.",
    "Two dogs' toys, a cat's bowl and a child's shoe.",
    "A woman isn't holding an umbrella; it's raining!",
    'A sign reads "STOP" (in red).',
    "People standing around at 5:30 p.m. in the U.S.",
    "A black-and-white photo of a 3-year-old -- wow...",
    "They're waiting for the bus, aren't they?",
]


@pytest.mark.skipif(shutil.which("java") is None, reason="java (for pycocoevalcap's tokenizer)")
def test_tokenizer_equals_java_ptbtokenizer():
    tokenizer = pytest.importorskip(
        "pycocoevalcap.tokenizer.ptbtokenizer", reason="pycocoevalcap (its Java PTBTokenizer)"
    )
    captions = list(RAW_CAPTIONS)
    if FLICKR.is_file():
        with FLICKR.open() as f:
            flickr = [json.loads(line)["text"] for _, line in zip(range(12), f, strict=False)]
        captions += flickr
        captions += [c.replace(" .", ".").replace(" ,", ",").replace(" 's", "'s") for c in flickr]
    java = tokenizer.PTBTokenizer().tokenize(
        {i: [{"caption": caption}] for i, caption in enumerate(captions)}
    )
    for i, caption in enumerate(captions):
        assert tokenize_caption(caption) == java[i][0].split(), caption
