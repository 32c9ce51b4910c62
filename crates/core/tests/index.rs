//! The usearch adapter index: search against a brute-force reference, exclusion, atomic save,
//! and rebuilds when the file is missing, damaged, stale or made for another spec.

use ramole_core::index::{AdapterIndex, IndexSpec, RebuildReason, Scoring, open_or_rebuild};
use ramole_core::retrieve::{normalized, score};
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
fn large_indexes_use_hnsw_and_agree_with_the_reference() {
    let data = rows(6000, 48, 3);
    let idx = AdapterIndex::build(spec(Scoring::Cosine, 48), 0, &data).unwrap();
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
