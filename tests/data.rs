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
fn eval_windows_are_the_seeds() {
    // n = 10, L = 3: n_windows = 9 / 3 = 3; windows start 0, 3, 6 (6 + 3 < 10).
    assert_eq!(eval_starts(10, 3), vec![0, 3, 6]);
    // n = 9: n_windows = 8 / 3 = 2; windows 0 and 3 both have full targets.
    assert_eq!(eval_starts(9, 3), vec![0, 3]);
    // Too short for one window: none (the run is refused before training).
    assert!(eval_starts(3, 3).is_empty());
}
