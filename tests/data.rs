//! The data pipeline against the seed: paragraph split, held-out tail, and both samplers.

use candle_core::Device;
use ternlab::data::{eval_starts, n_held_out, paragraphs, Batcher, Sampling};

#[test]
fn paragraphs_split_on_blank_lines_and_strip() {
    let text = "  One.\n\n\nTwo a\nTwo b \n\n \n\nThree\n";
    // Python: [p.strip() for p in text.split("\n\n") if p.strip()]
    assert_eq!(paragraphs(text), vec!["One.", "Two a\nTwo b", "Three"]);
}

#[test]
fn held_out_count_is_the_seeds() {
    // The seed: n_val = max(1, len(paragraphs) // 10) for the 10% default.
    for n in 1..500 {
        assert_eq!(n_held_out(n, 0.1), (n / 10).max(1), "n = {n}");
    }
    assert_eq!(n_held_out(117, 0.25), 29);
}

#[test]
fn sequential_batches_follow_the_documented_rule() {
    // K = (n - 1) / L windows; batch i holds windows (i*B + b) mod K.
    let tokens: Vec<u32> = (0..53).collect(); // K = 52 / 10 = 5
    let mut b = Batcher::new(&tokens, 10, 3, Sampling::Sequential, 0).unwrap();
    assert_eq!(b.next_starts(), vec![0, 10, 20]);
    assert_eq!(b.next_starts(), vec![30, 40, 0]);
    assert_eq!(b.next_starts(), vec![10, 20, 30]);
    let (x, y) = b.next_batch(&Device::Cpu).unwrap();
    let (x, y) = (x.to_vec2::<u32>().unwrap(), y.to_vec2::<u32>().unwrap());
    assert_eq!(x[0], (40..50).collect::<Vec<u32>>());
    assert_eq!(y[0], (41..51).collect::<Vec<u32>>());
    assert_eq!(x[1], (0..10).collect::<Vec<u32>>());
}

#[test]
fn random_batches_are_seeded_and_in_range() {
    let tokens: Vec<u32> = (0..1000).collect();
    let draw = |seed| {
        let mut b = Batcher::new(&tokens, 64, 4, Sampling::Random, seed).unwrap();
        (0..50).flat_map(|_| b.next_starts()).collect::<Vec<_>>()
    };
    let (a, a2, c) = (draw(0), draw(0), draw(1));
    assert_eq!(a, a2, "same seed, same offsets");
    assert_ne!(a, c, "another seed, other offsets");
    // numpy's integers(0, n - L - 1): every start leaves room for the shifted target.
    assert!(a.iter().all(|&s| s < 1000 - 64 - 1));
    assert!(a.iter().any(|&s| s > 800) && a.iter().any(|&s| s < 100));
}

#[test]
fn random_batches_are_numpys_offsets() {
    // tests/fixtures/numpy_offsets.json (scripts/make_numpy_offsets.py, numpy 2.4.6): three
    // consecutive default_rng(seed).integers(0, high, size=(B,)) per case. A corpus of
    // n = high + L + 1 tokens gives the seed's max_start = n - L - 1 = high.
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/numpy_offsets.json"
    );
    let fixture: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut checked = 0;
    for case in fixture["grid"].as_array().unwrap() {
        let (high, size) = (
            case["high"].as_u64().unwrap(),
            case["size"].as_u64().unwrap(),
        );
        // B = 4 is the seed's; an odd B also carries a 32-bit half from step to step.
        if !(high == 24_000 || high == 175_000) || !(size == 4 || size == 7) {
            continue;
        }
        let seed = case["seed"].as_u64().unwrap();
        let seq_len = if high == 24_000 { 64 } else { 256 };
        let tokens: Vec<u32> = (0..high as u32 + seq_len as u32 + 1).collect();
        let mut b = Batcher::new(&tokens, seq_len, size as usize, Sampling::Random, seed).unwrap();
        for (step, call) in case["calls"].as_array().unwrap().iter().enumerate() {
            let want: Vec<usize> = call
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as usize)
                .collect();
            if step == 0 {
                // The batch itself: token ids equal positions here, so row b starts at want[b].
                let (x, y) = b.next_batch(&Device::Cpu).unwrap();
                let (x, y) = (x.to_vec2::<u32>().unwrap(), y.to_vec2::<u32>().unwrap());
                for (row, &s) in want.iter().enumerate() {
                    assert_eq!(x[row][0] as usize, s, "seed {seed} high {high} row {row}");
                    assert_eq!(y[row][seq_len - 1] as usize, s + seq_len);
                }
            } else {
                assert_eq!(b.next_starts(), want, "seed {seed} high {high} step {step}");
            }
        }
        checked += 1;
    }
    assert_eq!(checked, 24, "6 seeds x 2 corpus sizes x 2 batch sizes");
}

#[test]
fn eval_windows_are_the_seeds() {
    // n = 10, L = 3: n_windows = 9 / 3 = 3; windows start 0, 3, 6 (6 + 3 < 10).
    assert_eq!(eval_starts(10, 3), vec![0, 3, 6]);
    // n = 9: n_windows = 8 / 3 = 2; windows 0 and 3 both have full targets.
    assert_eq!(eval_starts(9, 3), vec![0, 3]);
    // Too short for one window: none (the run is refused before training).
    assert!(eval_starts(3, 3).is_empty());
}

#[test]
fn a_corpus_is_tokenized_once_per_file_tokenizer_and_split() {
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("corpus.txt");
    std::fs::write(&path, "one two three\n\nfour five six\n\nseven eight\n").unwrap();
    let tok = tokenizers::Tokenizer::from_bytes(ternlab::run::TINY_TOKENIZER).unwrap();
    let a = ternlab::data::Corpus::load_shared(&path, &tok, 0.1).unwrap();
    let b = ternlab::data::Corpus::load_shared(&path, &tok, 0.1).unwrap();
    assert!(
        Arc::ptr_eq(&a, &b),
        "the same file, tokenizer and split: one tokenization"
    );
    let other_split = ternlab::data::Corpus::load_shared(&path, &tok, 0.5).unwrap();
    assert!(!Arc::ptr_eq(&a, &other_split));
    // The file changes (its length here): tokenized again, with the new text.
    std::fs::write(&path, "one two three\n\nfour five six seven\n\nnine\n").unwrap();
    let c = ternlab::data::Corpus::load_shared(&path, &tok, 0.1).unwrap();
    assert!(!Arc::ptr_eq(&a, &c));
    let fresh = ternlab::data::Corpus::load(&path, &tok, 0.1).unwrap();
    assert_eq!((&c.train, &c.val), (&fresh.train, &fresh.val));
}
