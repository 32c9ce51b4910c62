#!/usr/bin/env python3
"""Reference scores for tests/fixtures/text-metrics.json, the oracle of crates/core/src/metrics.rs.

Scores each (prediction, reference) pair the way LoraRetriever's summarize_results.py does, with
the real packages it imports:

    BLEU     nltk sentence_bleu([reference.split()], prediction.split()), default weights, no
             smoothing, x100
    ROUGE    rouge.Rouge().get_scores(prediction, reference)[0][m]["f"] x100 for rouge-1,
             rouge-2, rouge-l
    EM       text before the first "\\n\\n", then strip().lower().replace(".", ""), compared
             (applied to both sides; the paper's script cuts only the reference, see metrics.rs)

Where rouge raises (an empty hypothesis or reference after its '.' sentence split) the case
records null scores and the message in "rouge_raises"; metrics.rs scores those as zero.
Installs nothing and is not run by CI:

    python3 -m venv /tmp/mvenv && /tmp/mvenv/bin/pip install nltk==3.10.4 rouge==1.0.1
    /tmp/mvenv/bin/python scripts/make-metrics-oracle.py
"""
import json
import os
import platform
import warnings
from importlib.metadata import version

from nltk.translate.bleu_score import sentence_bleu
from rouge import Rouge

# nltk warns on every zero n-gram overlap; those are expected cases here.
warnings.filterwarnings("ignore")

CASES = [
    # Translation (WMT-style).
    ("The cat sat on the mat.", "The cat sat on the mat."),
    (
        "The European Parliament has adopted the resolution today.",
        "Today, the European Parliament adopted the resolution.",
    ),
    ("Resumption of the session", "Resumption of the session"),
    (
        "I declare resumed the session of the European Parliament adjourned on Friday 17 December 1999.",
        "I declare resumed the session of the European Parliament adjourned on Friday, 17 December "
        "1999, and I would like once again to wish you a happy new year.",
    ),
    ("Das Haus ist groß.", "Das Haus ist groß."),
    ("Le chat est sur la table.", "Le chat est sous la table."),
    # Data-to-text (E2E, WebNLG, CommonGen, DART).
    (
        "The Eagle is a coffee shop near Burger King in the riverside area. It has a high customer "
        "rating and is not family-friendly.",
        "The Eagle coffee shop is located in the riverside area near Burger King. It is not "
        "family-friendly but has a high customer rating.",
    ),
    (
        "Aarhus Airport serves the city of Aarhus, Denmark.",
        "The city of Aarhus in Denmark is served by Aarhus Airport.",
    ),
    (
        "A dog runs across the field to catch a frisbee.",
        "The dog is running to catch the frisbee in the field.",
    ),
    (
        "Alan Bean was born in Wheeler, Texas and was a crew member of Apollo 12.",
        "Alan Bean, born in Wheeler, Texas, served as a crew member on Apollo 12.",
    ),
    # Summaries (Gigaword, AESLC).
    ("us stocks close higher on tech rally", "wall street stocks close higher as tech shares rally"),
    (
        "Meeting moved to Thursday",
        "Please note the meeting has been moved to Thursday at 3 pm.",
    ),
    # Short labels.
    ("positive", "positive"),
    ("Positive.", "positive"),
    ("negative", "positive"),
    ("yes", "yes"),
    ("Yes", "no"),
    ("(A)", "(A)"),
    ("(B)", "(A)"),
    ("A", "(A)"),
    ("it is not possible to tell", "it is not possible to tell"),
    ("It is not possible to tell", "no"),
    ("The answer is (C). Because water boils at 100 degrees.", "(C)"),
    # Numbers: rouge splits "3.14" into two sentences; EM drops the '.'.
    ("42", "42"),
    ("3.14", "3.14"),
    ("3.14", "314"),
    ("1,000", "1000"),
    # Empty and whitespace-only sides.
    ("", "positive"),
    ("", ""),
    ("   ", "positive"),
    ("  \n\t ", "  "),
    ("positive", ""),
    (".", "yes"),
    ("...", "..."),
    ("a. ", "a."),
    # One to three tokens against a longer reference (BLEU has no 4-grams: ~0 without smoothing).
    ("Paris", "Paris is the capital of France."),
    ("the capital", "Paris is the capital of France."),
    ("Paris is the", "Paris is the capital of France."),
    ("Paris is the capital", "Paris is the capital"),
    ("the cat sat down", "the cat sat on the mat"),
    # Repeated words: BLEU clips counts, rouge counts distinct n-grams.
    ("the the the the the the the", "the cat is on the mat"),
    ("the cat the cat the cat", "the cat sat on the mat with the cat"),
    ("no no no", "no"),
    # Several '.'-separated sentences (rouge-L is summary-level over sentence pairs).
    ("He left. She stayed. They argued.", "She stayed. He left."),
    ("the cat sat. on the mat", "the cat sat on the mat"),
    ("a b c d", "b a d c"),
    ("a b. c a.", "a c. b a d."),
    ("x y z. z y x. y x z", "z y x w. x z y"),
    ("Mr. Smith went to Washington.", "Mister Smith went to Washington."),
    ("Well... maybe", "Well, maybe"),
    # Generation that ran on past the answer, and references with a trailing explanation.
    ("positive\n\n### Instruction:\nClassify the sentiment", "positive"),
    ("yes", "yes\n\nExplanation: the premise entails the hypothesis."),
    ("\n\npositive", "positive"),
    ("no\n\n\nmore", "no"),
    # Unicode and case.
    ("ÉCOLE", "école"),
    # Python lowercases a word-final capital sigma to ς, not σ.
    ("ΟΔΟΣ", "οδος"),
    ("ΟΔΟΣ", "οδοσ"),
    ("İstanbul", "i\u0307stanbul"),
    ("我喜欢猫", "我喜欢狗"),
    ("I love it 😀", "i love it 😀"),
    ("The Cat Sat", "the cat sat"),
    # Punctuation and odd whitespace (Python's str.split() whitespace includes \x1c-\x1f).
    ("Hello, world!", "Hello world"),
    ("yes.", "yes"),
    ("no!", "no"),
    ("New\u00a0York", "New York"),
    ("a\x1cb c", "a b c"),
    ("a\u200bb", "a b"),
    ("The\tcat\nsat", "The cat sat"),
    # Length and brevity penalty.
    (
        "The quick brown fox jumps over the lazy dog near the river bank today",
        "The quick brown fox jumps over the lazy dog",
    ),
    ("a b c d e f", "a b c d e f g h i j"),
    ("completely different words here", "nothing in common at all"),
]


def em(prediction, reference):
    # summarize_results.py: only the reference is cut at its first blank line.
    def norm(s):
        return s.strip().lower().replace(".", "")

    return norm(prediction) == norm(reference.split("\n\n")[0])


def main():
    rouge = Rouge()
    cases = []
    for prediction, reference in CASES:
        case = {
            "prediction": prediction,
            "reference": reference,
            "em": em(prediction, reference),
            "bleu": sentence_bleu([reference.split()], prediction.split()) * 100,
        }
        try:
            scores = rouge.get_scores(prediction, reference)[0]
            case["rouge1"] = scores["rouge-1"]["f"] * 100
            case["rouge2"] = scores["rouge-2"]["f"] * 100
            case["rouge_l"] = scores["rouge-l"]["f"] * 100
        except ValueError as e:
            case.update(rouge1=None, rouge2=None, rouge_l=None, rouge_raises=str(e))
        cases.append(case)

    out = {
        "generator": f"scripts/make-metrics-oracle.py with nltk=={version('nltk')} "
        f"rouge=={version('rouge')} on Python {platform.python_version()}",
        "cases": cases,
    }
    path = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "text-metrics.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"{len(cases)} cases -> {os.path.normpath(path)}")


if __name__ == "__main__":
    main()
