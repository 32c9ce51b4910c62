//! The usearch adapter index: search against a brute-force reference, exclusion, atomic save,
//! and rebuilds when the file is missing, damaged, stale or made for another spec.

use ramole_core::index::{AdapterIndex, IndexSpec, RebuildReason, normalized, open_or_rebuild};
use ramole_core::retrieve::score;
use ramole_core::vocab::Scoring;
use rand::{Rng, SeedableRng};

fn spec(scoring: Scoring, dims: usize) -> IndexSpec {
    IndexSpec {
        embedder: "mini:test".into(),
        dims,
        scoring,
        base: "base".into(),
    }
}

/// Raw (not normalised) means, like adapter profiles.
fn rows(n: usize, dims: usize, seed: u64) -> Vec<(u64, Vec<f32>)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n)
        .map(|i| {
            let len = rng.random_range(0.3f32..1.0);
            let v: Vec<f32> = (0..dims).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            let v = normalized(&v).iter().map(|x| x * len).collect();
            (i as u64 * 3 + 1, v)
        })
        .collect()
}

fn brute(rows: &[(u64, Vec<f32>)], q: &[f32], k: usize, scoring: Scoring) -> Vec<u64> {
    let mut s: Vec<(u64, f32)> = rows
        .iter()
        .map(|(k, v)| (*k, score(scoring, q, v)))
        .collect();
    s.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    s.into_iter().take(k).map(|x| x.0).collect()
}

#[test]
fn small_indexes_equal_the_brute_force_reference_for_both_scorings() {
    let data = rows(300, 32, 1);
    let queries = rows(20, 32, 2);
    for scoring in [Scoring::Cosine, Scoring::Ip] {
        let idx = AdapterIndex::build(spec(scoring, 32), 0, &data).unwrap();
        assert_eq!(idx.len(), 300);
        for (_, q) in &queries {
            let q = normalized(q);
            let got = idx.search(&q, 5, &|_| false).unwrap();
            assert_eq!(
                got.iter().map(|g| g.0).collect::<Vec<_>>(),
                brute(&data, &q, 5, scoring),
                "{scoring:?}"
            );
            // Scores are the similarity itself.
            let want = score(
                scoring,
                &q,
                &data.iter().find(|r| r.0 == got[0].0).unwrap().1,
            );
            assert!((got[0].1 - want).abs() < 1e-4, "{} vs {want}", got[0].1);
        }
    }
    // Skipping more keys than the exact scan's margin still yields k results, the right ones.
    let idx = AdapterIndex::build(spec(Scoring::Cosine, 32), 0, &data).unwrap();
    let q = normalized(&queries[1].1);
    let order = brute(&data, &q, 300, Scoring::Cosine);
    let skipped: std::collections::HashSet<u64> = order[..40].iter().copied().collect();
    let got: Vec<u64> = idx
        .search(&q, 3, &|k| skipped.contains(&k))
        .unwrap()
        .iter()
        .map(|g| g.0)
        .collect();
    assert_eq!(got, order[40..43]);
    // The two scorings rank differently on un-normalised means (why cosine is the default).
    let q = normalized(&queries[0].1);
    assert_ne!(
        brute(&data, &q, 10, Scoring::Cosine),
        brute(&data, &q, 10, Scoring::Ip)
    );
}

#[test]
fn the_exact_scan_equals_usearchs_exact_search_for_both_scorings() {
    let dims = 384;
    let data = rows(3000, dims, 11);
    let queries = rows(30, dims, 12);
    for scoring in [Scoring::Cosine, Scoring::Ip] {
        let idx = AdapterIndex::build(spec(scoring, dims), 0, &data).unwrap();
        for (i, (_, q)) in queries.iter().enumerate() {
            // Raw queries too: cosine must not depend on the query's length.
            let q: Vec<f32> = if i % 2 == 0 { normalized(q) } else { q.clone() };
            let skip = |k: u64| k.is_multiple_of(7);
            let got = idx.search(&q, 10, &skip).unwrap();
            let want = idx.search_reference(&q, 10, &skip).unwrap();
            assert_eq!(
                got.iter().map(|g| g.0).collect::<Vec<_>>(),
                want.iter().map(|g| g.0).collect::<Vec<_>>(),
                "{scoring:?} query {i}"
            );
            for (g, w) in got.iter().zip(&want) {
                assert!((g.1 - w.1).abs() < 1e-5, "{scoring:?}: {} vs {}", g.1, w.1);
            }
        }
    }
}

#[test]
fn near_ties_below_f16_resolution_are_ranked_exactly() {
    // Vectors that differ by far less than an f16 step: the rounded scan cannot tell them
    // apart, the rescoring must.
    let dims = 64;
    let two = rows(2, dims, 21);
    let (base, q) = (normalized(&two[0].1), normalized(&two[1].1));
    let j = (0..dims)
        .max_by(|&a, &b| q[a].abs().total_cmp(&q[b].abs()))
        .unwrap();
    // Later keys score higher, by ~1e-6 each: a tie broken by key would pick the first ones.
    let data: Vec<(u64, Vec<f32>)> = (0..50u64)
        .map(|i| {
            let mut v = base.clone();
            v[j] += 1e-5 * (i as f32 + 1.0) * q[j].signum();
            (i + 1, v)
        })
        .collect();
    for scoring in [Scoring::Cosine, Scoring::Ip] {
        let idx = AdapterIndex::build(spec(scoring, dims), 0, &data).unwrap();
        let got: Vec<u64> = idx
            .search(&q, 5, &|_| false)
            .unwrap()
            .iter()
            .map(|g| g.0)
            .collect();
        assert_eq!(got, brute(&data, &q, 5, scoring), "{scoring:?}");
        assert_eq!(got, vec![50, 49, 48, 47, 46], "{scoring:?}");
    }
}

#[test]
fn a_loaded_index_scans_the_same_vectors_and_keeps_them_in_step() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("index.usearch");
    let data = rows(500, 32, 31);
    let mut idx = AdapterIndex::build(spec(Scoring::Ip, 32), 3, &data).unwrap();
    idx.remove(data[0].0).unwrap();
    idx.save(&path).unwrap();
    let mut loaded = AdapterIndex::load(&path).unwrap();
    let q = normalized(&data[1].1);
    assert_eq!(
        loaded.search(&q, 8, &|_| false).unwrap(),
        idx.search(&q, 8, &|_| false).unwrap()
    );
    // Edits after the load reach the scan.
    loaded.remove(data[1].0).unwrap();
    assert!(
        loaded
            .search(&q, 8, &|_| false)
            .unwrap()
            .iter()
            .all(|g| g.0 != data[1].0)
    );
    loaded.upsert(9999, &q).unwrap();
    assert_eq!(loaded.search(&q, 1, &|_| false).unwrap()[0].0, 9999);
    let (got, want) = (
        loaded.search(&q, 8, &|_| false).unwrap(),
        loaded.search_reference(&q, 8, &|_| false).unwrap(),
    );
    for (g, w) in got.iter().zip(&want) {
        assert!(
            g.0 == w.0 && (g.1 - w.1).abs() < 1e-5,
            "{got:?} vs {want:?}"
        );
    }
}

#[test]
fn large_indexes_use_hnsw_and_agree_with_the_reference() {
    let data = rows(6000, 48, 3);
    let mut idx = AdapterIndex::build(spec(Scoring::Cosine, 48), 0, &data).unwrap();
    idx.set_exact_limit(1000);
    let queries = rows(50, 48, 4);
    let mut agree = 0;
    for (_, q) in &queries {
        let q = normalized(q);
        let got: Vec<u64> = idx
            .search(&q, 3, &|_| false)
            .unwrap()
            .iter()
            .map(|g| g.0)
            .collect();
        if got[0] == brute(&data, &q, 1, Scoring::Cosine)[0] {
            agree += 1;
        }
        // Exclusion works on the approximate path too.
        let skip = got[0];
        let again = idx.search(&q, 3, &|k| k == skip).unwrap();
        assert_eq!(again.len(), 3);
        assert!(again.iter().all(|g| g.0 != skip));
    }
    assert!(
        agree >= 48,
        "HNSW found the true top-1 for only {agree} of 50 queries"
    );
}

#[test]
fn exclusion_upsert_and_remove() {
    let data = rows(10, 8, 5);
    let mut idx = AdapterIndex::build(spec(Scoring::Cosine, 8), 0, &data).unwrap();
    let q = normalized(&data[3].1);
    let top = idx.search(&q, 1, &|_| false).unwrap();
    assert_eq!(top[0].0, data[3].0);
    let next = idx.search(&q, 2, &|k| k == data[3].0).unwrap();
    assert!(next.iter().all(|g| g.0 != data[3].0) && next.len() == 2);
    idx.remove(data[3].0).unwrap();
    assert_eq!(idx.len(), 9);
    assert_ne!(idx.search(&q, 1, &|_| false).unwrap()[0].0, data[3].0);
    // Re-adding under the same key replaces, never duplicates.
    idx.upsert(data[3].0, &data[3].1).unwrap();
    idx.upsert(data[3].0, &data[3].1).unwrap();
    assert_eq!(idx.len(), 10);
    assert!(idx.upsert(99, &[1.0, 2.0]).is_err(), "wrong dims accepted");
    assert!(idx.search(&q, 0, &|_| false).unwrap().is_empty());
}

#[test]
fn the_saved_index_is_reused_or_rebuilt_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("index.usearch");
    let data = rows(40, 16, 6);
    let s = spec(Scoring::Cosine, 16);
    let rows_fn = || Ok(data.clone());

    let (idx, why) = open_or_rebuild(&path, &s, 7, rows_fn).unwrap();
    assert_eq!(why, Some(RebuildReason::Missing));
    assert_eq!(idx.len(), 40);
    let q = normalized(&data[5].1);
    let before = idx.search(&q, 3, &|_| false).unwrap();

    // Same spec and generation: loaded as is (the rows closure is not called).
    let (idx, why) = open_or_rebuild(&path, &s, 7, || panic!("should not rebuild")).unwrap();
    assert_eq!(why, None);
    assert_eq!(idx.search(&q, 3, &|_| false).unwrap(), before);

    // The catalog moved on.
    let (_, why) = open_or_rebuild(&path, &s, 8, rows_fn).unwrap();
    assert_eq!(
        why,
        Some(RebuildReason::Stale {
            found: 7,
            expected: 8
        })
    );

    // Another embedder.
    let mut other = s.clone();
    other.embedder = "other:16".into();
    let (_, why) = open_or_rebuild(&path, &other, 8, rows_fn).unwrap();
    assert_eq!(why, Some(RebuildReason::OtherSpec));

    // Damage: a flipped byte in the payload, then a truncated file, then garbage.
    let mut bytes = std::fs::read(&path).unwrap();
    let n = bytes.len();
    bytes[n - 100] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    let (idx, why) = open_or_rebuild(&path, &other, 8, rows_fn).unwrap();
    assert!(matches!(why, Some(RebuildReason::Corrupt(_))), "{why:?}");
    assert_eq!(idx.search(&q, 3, &|_| false).unwrap(), before);
    std::fs::write(&path, &bytes[..n / 2]).unwrap();
    assert!(AdapterIndex::load(&path).is_err());
    std::fs::write(&path, b"not an index").unwrap();
    let (_, why) = open_or_rebuild(&path, &other, 8, rows_fn).unwrap();
    assert!(matches!(why, Some(RebuildReason::Corrupt(_))), "{why:?}");
    // The save left no temp files behind.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("index.usearch")]);
}
