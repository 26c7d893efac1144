//! src/numpy_rng.rs against numpy itself: every number here comes from
//! tests/fixtures/numpy_offsets.json, written by scripts/make_numpy_offsets.py (numpy 2.4.6,
//! the version the fixture names).

use serde::Deserialize;
use ternlab::numpy_rng::{default_rng, Generator, Pcg64, SeedSequence};

#[derive(Deserialize)]
struct Fixture {
    made_by: String,
    numpy: String,
    seeds: Vec<SeedStages>,
    grid: Vec<GridCase>,
    mixed: Vec<MixedCase>,
}

/// What numpy gives at each stage of `default_rng(seed)`.
#[derive(Deserialize)]
struct SeedStages {
    seed: u64,
    pool: [u32; 4],
    state_words: [u64; 4],
    state: String,
    inc: String,
    raw: Vec<u64>,
}

/// The bit generator after the last call.
#[derive(Deserialize)]
struct End {
    state: String,
    has_uint32: u8,
    uinteger: Option<u32>,
}

/// Consecutive `integers(0, high, size=(size,))` calls from a fresh `default_rng(seed)`.
#[derive(Deserialize)]
struct GridCase {
    seed: u64,
    high: i64,
    size: usize,
    calls: Vec<Vec<i64>>,
    end: End,
    words: u64,
}

#[derive(Deserialize)]
struct Call {
    low: i64,
    high: i64,
    size: usize,
    endpoint: bool,
    out: Vec<i64>,
}

/// A sequence of calls with different ranges from a fresh `default_rng(seed)`.
#[derive(Deserialize)]
struct MixedCase {
    seed: u64,
    calls: Vec<Call>,
    end: End,
    words: u64,
}

fn fixture() -> Fixture {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/numpy_offsets.json"
    );
    let text = std::fs::read_to_string(path).expect("reading the numpy fixture");
    let f: Fixture = serde_json::from_str(&text).expect("parsing the numpy fixture");
    assert_eq!(f.made_by, "scripts/make_numpy_offsets.py");
    assert!(!f.numpy.is_empty());
    f
}

fn u128_of(s: &str) -> u128 {
    s.parse().expect("a decimal u128")
}

/// The generator's bit generator is where numpy's was after the same calls, and numpy's
/// count of 64-bit outputs used takes a fresh `PCG64(seed)` exactly there.
fn assert_end(g: &Generator, seed: u64, end: &End, words: u64, what: &str) {
    let bg = g.bit_generator();
    let target = u128_of(&end.state);
    assert_eq!(bg.state().0, target, "{what}: LCG state");
    let numpy_pending = (end.has_uint32 == 1).then(|| end.uinteger.expect("uinteger"));
    assert_eq!(bg.pending_u32(), numpy_pending, "{what}: kept 32-bit half");
    let mut fresh = Pcg64::from_seed_sequence(&SeedSequence::new(seed));
    for _ in 0..words {
        fresh.next_u64();
    }
    assert_eq!(fresh.state().0, target, "{what}: {words} outputs used");
}

#[test]
fn seeding_matches_numpy_stage_by_stage() {
    let f = fixture();
    assert_eq!(f.seeds.len(), 6);
    for s in &f.seeds {
        let seq = SeedSequence::new(s.seed);
        assert_eq!(seq.pool(), s.pool, "seed {}: SeedSequence pool", s.seed);
        assert_eq!(
            seq.generate_state_u64(4),
            s.state_words,
            "seed {}: generate_state(4, uint64)",
            s.seed
        );
        let mut bg = Pcg64::from_seed_sequence(&seq);
        assert_eq!(
            bg.state(),
            (u128_of(&s.state), u128_of(&s.inc)),
            "seed {}: PCG64 state and increment",
            s.seed
        );
        assert_eq!(bg.pending_u32(), None);
        let raw: Vec<u64> = (0..s.raw.len()).map(|_| bg.next_u64()).collect();
        assert_eq!(raw, s.raw, "seed {}: random_raw", s.seed);
    }
}

#[test]
fn consecutive_calls_match_numpy_for_every_seed_range_and_size() {
    let f = fixture();
    // 6 seeds x 13 ranges x sizes 1, 4, 7.
    assert_eq!(f.grid.len(), 6 * 13 * 3);
    for c in &f.grid {
        let mut g = default_rng(c.seed);
        for (i, want) in c.calls.iter().enumerate() {
            let got = g.integers(0, c.high, c.size);
            assert_eq!(
                &got, want,
                "seed {} integers(0, {}, {}) call {i}",
                c.seed, c.high, c.size
            );
        }
        let what = format!("seed {} high {} size {}", c.seed, c.high, c.size);
        assert_end(&g, c.seed, &c.end, c.words, &what);
    }
}

#[test]
fn mixed_ranges_share_the_kept_half_like_numpy() {
    let f = fixture();
    for c in &f.mixed {
        let mut g = default_rng(c.seed);
        for (i, call) in c.calls.iter().enumerate() {
            let got = if call.endpoint {
                g.integers_closed(call.low, call.high, call.size)
            } else {
                g.integers(call.low, call.high, call.size)
            };
            assert_eq!(
                got, call.out,
                "seed {} call {i}: integers({}, {}, {}, endpoint={})",
                c.seed, call.low, call.high, call.size, call.endpoint
            );
        }
        assert_end(
            &g,
            c.seed,
            &c.end,
            c.words,
            &format!("seed {} mixed", c.seed),
        );
    }
}

/// 64-bit outputs that `values` draws from a fresh generator use if nothing is rejected, for
/// the inclusive range `rng`: none for a single value, half a word per value for ranges that
/// fit in 32 bits, one word per value above.
fn words_without_rejection(rng: u64, values: u64) -> u64 {
    if rng == 0 {
        0
    } else if rng <= u64::from(u32::MAX) {
        values.div_ceil(2)
    } else {
        values
    }
}

#[test]
fn the_fixture_exercises_both_rejection_loops() {
    // Both Lemire loops are taken: some grid case in each width used more 64-bit outputs
    // than its values need (numpy's count, which the Rust generator matches through its end
    // state in the tests above). 3 * 2^30 and 3 * 2^61 reject a quarter and an eighth.
    let f = fixture();
    let (mut rejected32, mut rejected64) = (false, false);
    for c in &f.grid {
        let values = (c.calls.len() * c.size) as u64;
        let min = words_without_rejection((c.high - 1) as u64, values);
        assert!(
            c.words >= min,
            "seed {} high {}: fewer words",
            c.seed,
            c.high
        );
        if c.words > min {
            if c.high - 1 <= i64::from(u32::MAX) {
                rejected32 = true;
            } else {
                rejected64 = true;
            }
        }
    }
    assert!(rejected32, "no 32-bit rejection in the fixture");
    assert!(rejected64, "no 64-bit rejection in the fixture");
}

#[test]
fn the_kept_half_outlives_a_call() {
    // numpy (see the module docs): the high half of a 64-bit output waits in the bit generator
    // for the next 32-bit draw, so n calls of size 1 give the same values as one call of size n.
    let mut one = default_rng(7);
    let mut many = default_rng(7);
    let singles: Vec<i64> = (0..9).flat_map(|_| one.integers(0, 1000, 1)).collect();
    assert_eq!(singles, many.integers(0, 1000, 9));
    assert_eq!(one.bit_generator(), many.bit_generator());
    // A single value (rng == 0) draws nothing.
    let before = one.bit_generator().clone();
    assert_eq!(one.integers(-3, -2, 4), vec![-3; 4]);
    assert_eq!(one.bit_generator(), &before);
}
