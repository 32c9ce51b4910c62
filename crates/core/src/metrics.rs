//! Scoring of generated answers for `ramole eval tasks`: exact match, BLEU and ROUGE, computed
//! exactly as LoraRetriever's `summarize_results.py` does, so that our numbers are comparable
//! with the paper's tables.
//!
//! - [`exact_match`]: the script's `cal_correct` (plain Python string methods).
//! - [`bleu`]: NLTK 3.10.4 `sentence_bleu([reference.split()], prediction.split())` with the
//!   default weights and no smoothing, ×100.
//! - [`rouge`]: the PyPI `rouge` package 1.0.1 (pltrdy/rouge)
//!   `Rouge().get_scores(prediction, reference)[0][m]["f"]` for m in rouge-1, rouge-2 and
//!   rouge-l, ×100.
//! - [`answer`]: how the paper's `main.py` cuts the answer out of the decoded generation.
//!
//! `tests/fixtures/text-metrics.json`, written by `scripts/make-metrics-oracle.py` with the real
//! packages, pins all of these.
//!
//! Scores are per pair. The script averages per-pair scores per task (`np.mean` of BLEU; rouge's
//! `avg=True`, which is the mean of the per-pair scores) and rounds only the final mean to one
//! decimal, so callers should average these unrounded values.

use std::collections::{HashMap, HashSet};

/// ROUGE F-scores in percent (0..=100).
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize)]
pub struct Rouge {
    pub rouge1: f64,
    pub rouge2: f64,
    pub rouge_l: f64,
}

/// The answer inside a decoded generation that still contains its Alpaca prompt: the text after
/// the last `"### Response:\n"`, or the whole text when there is none.
///
/// Like the paper's `generated.strip().split('### Response:\n')[-1]`, the text is stripped
/// (Python whitespace) *before* the cut, so the answer keeps any leading whitespace but loses
/// the trailing one. That matters: ROUGE turns whitespace after a final '.' into an extra
/// empty token.
pub fn answer(generated: &str) -> &str {
    let text = py_strip(generated);
    // Python's left-to-right split and this right-to-left search agree because the marker has
    // no border (no proper prefix equal to a suffix), so its occurrences cannot overlap.
    text.rsplit_once("### Response:\n")
        .map_or(text, |(_, after)| after)
}

/// The paper's exact-match rule (`summarize_results.py`): the reference is cut before its first
/// `"\n\n"`; then each side is stripped (Python whitespace), lowercased (full Unicode mapping, as
/// Python's `str.lower`) and stripped of every '.'; the results must be equal. The prediction is
/// not cut: a generation that answers and then runs on after a blank line does not match, as in
/// the paper.
pub fn exact_match(prediction: &str, reference: &str) -> bool {
    let reference = reference
        .find("\n\n")
        .map_or(reference, |i| &reference[..i]);
    em_normalise(prediction) == em_normalise(reference)
}

fn em_normalise(text: &str) -> String {
    py_strip(text).to_lowercase().replace('.', "")
}

/// Sentence BLEU-4 in percent, exactly NLTK 3.10.4
/// `sentence_bleu([reference.split()], prediction.split())`.
///
/// No smoothing (`method0`) means any n-gram order without a match contributes
/// `log(sys.float_info.min)`, so a hypothesis without a matching 4-gram (in particular one of
/// fewer than 4 tokens) scores about 1e-75 or less rather than exactly 0; the score is exactly 0
/// only when no unigram matches. Tokens are case- and punctuation-sensitive.
pub fn bleu(prediction: &str, reference: &str) -> f64 {
    let hyp = py_split(prediction);
    let refr = py_split(reference);
    let mut terms = [0.0; 4];
    for (n, term) in (1..=4).zip(terms.iter_mut()) {
        let (numerator, denominator) = modified_precision(&hyp, &refr, n);
        if numerator == 0 && n == 1 {
            return 0.0;
        }
        let p = if numerator == 0 {
            f64::MIN_POSITIVE // sys.float_info.min
        } else {
            numerator as f64 / denominator as f64
        };
        *term = 0.25 * p.ln();
    }
    // NLTK sums the weighted logs with math.fsum, whose correctly rounded sum can differ from a
    // naive one in the last bit.
    brevity_penalty(refr.len(), hyp.len()) * fsum(&terms).exp() * 100.0
}

/// Clipped n-gram matches over the number of hypothesis n-grams, the latter floored at 1 as
/// NLTK does for hypotheses shorter than `n`.
fn modified_precision(hyp: &[&str], refr: &[&str], n: usize) -> (usize, usize) {
    let hyp_counts = ngram_counts(hyp, n);
    let ref_counts = ngram_counts(refr, n);
    let numerator = hyp_counts
        .iter()
        .map(|(gram, &count)| count.min(ref_counts.get(gram).copied().unwrap_or(0)))
        .sum();
    let denominator = hyp_counts.values().sum::<usize>().max(1);
    (numerator, denominator)
}

fn ngram_counts<'a, 'b>(words: &'a [&'b str], n: usize) -> HashMap<&'a [&'b str], usize> {
    let mut counts = HashMap::new();
    for gram in words.windows(n) {
        *counts.entry(gram).or_insert(0) += 1;
    }
    counts
}

fn brevity_penalty(ref_len: usize, hyp_len: usize) -> f64 {
    if hyp_len > ref_len {
        1.0
    } else if hyp_len == 0 {
        0.0
    } else {
        (1.0 - ref_len as f64 / hyp_len as f64).exp()
    }
}

/// Python's `math.fsum` (Shewchuk's exact partials, then a correctly rounded total), for
/// finite inputs.
fn fsum(values: &[f64]) -> f64 {
    let mut partials: Vec<f64> = Vec::new();
    for &value in values {
        let mut x = value;
        let mut kept = 0;
        for j in 0..partials.len() {
            let mut y = partials[j];
            if x.abs() < y.abs() {
                std::mem::swap(&mut x, &mut y);
            }
            let hi = x + y;
            let lo = y - (hi - x);
            if lo != 0.0 {
                partials[kept] = lo;
                kept += 1;
            }
            x = hi;
        }
        partials.truncate(kept);
        if x != 0.0 {
            partials.push(x);
        }
    }
    let Some(mut n) = partials.len().checked_sub(1) else {
        return 0.0;
    };
    let mut hi = partials[n];
    let mut lo = 0.0;
    while n > 0 {
        let x = hi;
        n -= 1;
        let y = partials[n];
        hi = x + y;
        lo = y - (hi - x);
        if lo != 0.0 {
            break;
        }
    }
    // Half-even rounding of the total can depend on partials below the one that stopped the
    // loop: nudge when they push the same way as `lo`.
    if n > 0 && ((lo < 0.0 && partials[n - 1] < 0.0) || (lo > 0.0 && partials[n - 1] > 0.0)) {
        let y = lo * 2.0;
        let x = hi + y;
        if y == x - hi {
            hi = x;
        }
    }
    hi
}

/// ROUGE-1, ROUGE-2 and summary-level ROUGE-L F-scores in percent, exactly the `rouge` 1.0.1
/// package's `Rouge().get_scores(prediction, reference)[0]`, whose quirks this keeps:
///
/// - Text is cut into sentences at every '.' (also inside "3.14" or "Mr."); pieces that are
///   empty are dropped, but a whitespace-only piece (as after "a. ") stays as a sentence whose
///   single token is the empty string.
/// - Tokens are whitespace-separated and case- and punctuation-sensitive; n-grams run across
///   sentence boundaries.
/// - With the default `exclusive=True` the package counts *distinct* n-grams (sets, not
///   multisets): "no no no" against "no" has ROUGE-1 precision 1.
/// - ROUGE-L is the size of the union, as a set of words, of the LCSs of every (reference
///   sentence, prediction sentence) pair, over the distinct word counts; which LCS is taken
///   follows the package's backtracking tie-break.
/// - F = 2PR / (P + R + 1e-8), so identical texts score 99.9999995, not 100.
///
/// Where the package raises ("Hypothesis is empty." / "Reference is empty.": a side with no
/// non-empty '.'-piece, such as "", "." or "...") this returns all zeros. Where Python would
/// exceed its recursion limit backtracking an LCS (sentence pairs of roughly 1000 words) this
/// still returns the score.
pub fn rouge(prediction: &str, reference: &str) -> Rouge {
    let hyp = rouge_sentences(prediction);
    let refr = rouge_sentences(reference);
    if hyp.is_empty() || refr.is_empty() {
        return Rouge::default();
    }
    let hyp_words: Vec<&str> = hyp.concat();
    let ref_words: Vec<&str> = refr.concat();
    Rouge {
        rouge1: rouge_n(&hyp_words, &ref_words, 1) * 100.0,
        rouge2: rouge_n(&hyp_words, &ref_words, 2) * 100.0,
        rouge_l: rouge_l(&hyp, &ref_words, &refr) * 100.0,
    }
}

fn rouge_sentences(text: &str) -> Vec<Vec<&str>> {
    text.split('.')
        .filter(|piece| !piece.is_empty())
        .map(|piece| {
            // The package re-joins a piece's words with single spaces and then splits on " ",
            // which turns a whitespace-only piece into one empty token.
            let words = py_split(piece);
            if words.is_empty() { vec![""] } else { words }
        })
        .collect()
}

fn rouge_n(hyp: &[&str], refr: &[&str], n: usize) -> f64 {
    let hyp_grams: HashSet<&[&str]> = hyp.windows(n).collect();
    let ref_grams: HashSet<&[&str]> = refr.windows(n).collect();
    let overlap = hyp_grams.intersection(&ref_grams).count();
    f_score(
        ratio(overlap, hyp_grams.len()),
        ratio(overlap, ref_grams.len()),
    )
}

fn rouge_l(hyp: &[Vec<&str>], ref_words: &[&str], refr: &[Vec<&str>]) -> f64 {
    let distinct_hyp = hyp.iter().flatten().collect::<HashSet<_>>().len();
    let distinct_ref = ref_words.iter().collect::<HashSet<_>>().len();
    let mut union: HashSet<&str> = HashSet::new();
    for r in refr {
        for h in hyp {
            lcs_words(r, h, &mut union);
        }
    }
    // Every sentence has at least one token, so both distinct counts are at least 1.
    let llcs = union.len();
    f_score(ratio(llcs, distinct_hyp), ratio(llcs, distinct_ref))
}

/// Adds the words of one longest common subsequence of `x` (reference) and `y` (hypothesis) to
/// `out`, choosing among equal-length LCSs exactly as the package's `_recon_lcs` does: take a
/// match when the last words agree, otherwise step back in `x` only if that keeps a strictly
/// longer LCS, else step back in `y`.
fn lcs_words<'a>(x: &[&'a str], y: &[&'a str], out: &mut HashSet<&'a str>) {
    let cols = y.len() + 1;
    let mut table = vec![0u32; (x.len() + 1) * cols];
    for i in 1..=x.len() {
        for j in 1..=y.len() {
            table[i * cols + j] = if x[i - 1] == y[j - 1] {
                table[(i - 1) * cols + j - 1] + 1
            } else {
                table[(i - 1) * cols + j].max(table[i * cols + j - 1])
            };
        }
    }
    let (mut i, mut j) = (x.len(), y.len());
    while i > 0 && j > 0 {
        if x[i - 1] == y[j - 1] {
            out.insert(x[i - 1]);
            i -= 1;
            j -= 1;
        } else if table[(i - 1) * cols + j] > table[i * cols + j - 1] {
            i -= 1;
        } else {
            j -= 1;
        }
    }
}

/// The package's `overlap / count`, defined as 0 for an empty count.
fn ratio(overlap: usize, count: usize) -> f64 {
    if count == 0 {
        0.0
    } else {
        overlap as f64 / count as f64
    }
}

/// The package's smoothed F1; the operation order matches so the result is bit-identical.
fn f_score(precision: f64, recall: f64) -> f64 {
    2.0 * ((precision * recall) / (precision + recall + 1e-8))
}

/// Python's `str.isspace`, which `str.split()` and `str.strip()` use: Unicode White_Space plus
/// the information separators U+001C..=U+001F, which Python treats as whitespace (bidi classes B
/// and S) and Rust does not.
fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `str.split()` with no argument.
fn py_split(text: &str) -> Vec<&str> {
    text.split(is_py_space).filter(|w| !w.is_empty()).collect()
}

/// Python's `str.strip()` with no argument.
fn py_strip(text: &str) -> &str {
    text.trim_matches(is_py_space)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROUGE_IDENTICAL: f64 = 2.0 / (2.0 + 1e-8) * 100.0;

    #[test]
    fn identical_texts_score_full_marks() {
        let text = "The cat sat on the mat.";
        assert!(exact_match(text, text));
        assert_eq!(bleu(text, text), 100.0);
        let r = rouge(text, text);
        for f in [r.rouge1, r.rouge2, r.rouge_l] {
            assert!((f - ROUGE_IDENTICAL).abs() < 1e-9, "{r:?}");
        }
    }

    #[test]
    fn disjoint_texts_score_zero() {
        let (p, r) = (
            "completely different words here",
            "nothing in common at all",
        );
        assert!(!exact_match(p, r));
        assert_eq!(bleu(p, r), 0.0);
        assert_eq!(rouge(p, r), Rouge::default());
    }

    #[test]
    fn short_hypotheses_get_almost_no_bleu_without_smoothing() {
        // Unigram matches keep it off exactly 0, the missing 4-grams push it to ~1e-229.
        let b = bleu("positive", "positive");
        assert!(b > 0.0 && b < 1e-200, "{b}");
        let b = bleu("Paris is the", "Paris is the capital of France.");
        assert!(b > 0.0 && b < 1e-70, "{b}");
        assert_eq!(bleu("Paris is the capital", "Paris is the capital"), 100.0);
        assert_eq!(bleu("", "positive"), 0.0);
        assert_eq!(bleu("Positive", "positive"), 0.0);
    }

    #[test]
    fn bleu_clips_repeated_words() {
        // Unigram precision 2/7 for "the" x7 against a reference holding two; no bigram match.
        let b = bleu("the the the the the the the", "the cat is on the mat");
        let expected = (0.25 * (2.0f64 / 7.0).ln() + 0.75 * f64::MIN_POSITIVE.ln()).exp() * 100.0;
        assert!(
            (b - expected).abs() <= expected * 1e-12,
            "{b} vs {expected}"
        );
    }

    #[test]
    fn rouge_counts_distinct_ngrams_and_splits_at_periods() {
        let r = rouge("no no no", "no");
        assert!((r.rouge1 - ROUGE_IDENTICAL).abs() < 1e-9, "{r:?}");
        assert_eq!(r.rouge2, 0.0);
        // "3.14" is two sentences, "3" and "14".
        let r = rouge("3.14", "3.14");
        assert!((r.rouge2 - ROUGE_IDENTICAL).abs() < 1e-9, "{r:?}");
        // Trailing whitespace after the last '.' adds an empty token: 1 of 2 distinct words.
        let r = rouge("a. ", "a.");
        assert!(
            (r.rouge1 - 2.0 * 0.5 / (1.5 + 1e-8) * 100.0).abs() < 1e-9,
            "{r:?}"
        );
    }

    #[test]
    fn rouge_is_zero_where_the_package_raises() {
        for (p, r) in [
            ("", "yes"),
            ("yes", ""),
            (".", "yes"),
            ("...", "..."),
            ("", ""),
        ] {
            assert_eq!(rouge(p, r), Rouge::default(), "{p:?} / {r:?}");
        }
        // Whitespace-only is not empty to the package: one empty token on each side matches.
        let r = rouge("  \n", " ");
        assert!((r.rouge1 - ROUGE_IDENTICAL).abs() < 1e-9, "{r:?}");
    }

    #[test]
    fn exact_match_follows_the_paper_rule() {
        assert!(exact_match("Positive.", "positive"));
        assert!(exact_match("  yes \n", "Yes"));
        assert!(!exact_match(
            "positive\n\n### Instruction:\nmore",
            "positive"
        ));
        assert!(exact_match("yes", "yes\n\nExplanation: because."));
        assert!(exact_match("\n\npositive", "positive"));
        assert!(exact_match("3.14", "314"));
        assert!(!exact_match("(A)", "A"));
        // Python lowercases a final capital sigma to the final form.
        assert!(exact_match("ΟΔΟΣ", "οδος"));
        assert!(!exact_match("ΟΔΟΣ", "οδοσ"));
    }

    #[test]
    fn answer_is_the_text_after_the_last_response_marker() {
        let generated = "### Instruction:\nSay yes.\n\n### Response:\nno\n\n### Response:\n yes\n";
        assert_eq!(answer(generated), " yes");
        assert_eq!(answer("  just text \n"), "just text");
        assert_eq!(answer("### Response:\n"), "### Response:");
    }

    #[test]
    fn python_whitespace_includes_the_information_separators() {
        assert_eq!(
            py_split("a\u{1c}b\u{a0}c\u{200b}d"),
            ["a", "b", "c\u{200b}d"]
        );
        assert_eq!(py_strip("\u{1f} x \u{3000}"), "x");
    }

    #[test]
    fn fsum_is_correctly_rounded() {
        assert_eq!(fsum(&[0.1; 10]), 1.0);
        assert_eq!(fsum(&[1e100, 1.0, -1e100]), 1.0);
        assert_eq!(fsum(&[1.0, 1e-16, 1e-16]), 1.0000000000000002);
        assert_eq!(fsum(&[]), 0.0);
    }

    /// Every case of the oracle written with the real nltk and rouge packages.
    #[test]
    fn matches_python_oracle() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/text-metrics.json"
        );
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let fixture: serde_json::Value = serde_json::from_str(&text).unwrap();
        let cases = fixture["cases"].as_array().unwrap();
        assert!(cases.len() >= 50, "only {} cases", cases.len());
        let mut failures = Vec::new();
        for (i, case) in cases.iter().enumerate() {
            let prediction = case["prediction"].as_str().unwrap();
            let reference = case["reference"].as_str().unwrap();
            // A null ROUGE is where the package raises, which we score as zero.
            let expected = |key: &str| case[key].as_f64().unwrap_or(0.0);
            let r = rouge(prediction, reference);
            let scores = [
                ("bleu", bleu(prediction, reference), expected("bleu")),
                ("rouge1", r.rouge1, expected("rouge1")),
                ("rouge2", r.rouge2, expected("rouge2")),
                ("rouge_l", r.rouge_l, expected("rouge_l")),
            ];
            for (name, got, want) in scores {
                // The relative bound also pins NLTK's ~1e-229 scores, which 1e-6 alone would
                // let slip to 0.
                let close = (got - want).abs() <= 1e-6
                    && (got == want || (got - want).abs() <= want.abs() * 1e-12);
                if !close {
                    failures.push(format!(
                        "case {i} {prediction:?} / {reference:?}: {name} {got:e}, want {want:e}"
                    ));
                }
            }
            let em = exact_match(prediction, reference);
            if Some(em) != case["em"].as_bool() {
                failures.push(format!(
                    "case {i} {prediction:?} / {reference:?}: em {em}, want {}",
                    case["em"]
                ));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }
}
