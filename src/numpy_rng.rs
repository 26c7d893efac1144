//! numpy's `np.random.default_rng(seed).integers(low, high, size)` for a u64 seed, bit for bit.
//!
//! Responsible for one thing: drawing the same int64 values as numpy's default `Generator`, so
//! `data.sampling = "random"` picks the batch offsets of the seed's MLX script
//! (`rng.integers(0, n - L - 1, size=(B,))` each step) and a run sees the same batches.
//! Nothing else in numpy is reproduced (no floats, no other dtypes, no spawning).
//!
//! The pieces, as numpy 2.x does them (checked against numpy 2.4.6 by `tests/numpy_rng.rs` and
//! the fixture that `scripts/make_numpy_offsets.py` writes):
//!
//! - [`SeedSequence`]: the seed becomes little-endian 32-bit words (0 is one word `[0]`), which
//!   are hashed into a pool of four words and cross-mixed; `generate_state(4, uint64)` hashes
//!   the pool out again as eight 32-bit words and pairs them, low word first.
//! - [`Pcg64`]: the 128-bit LCG with the XSL-RR output. Words 0 and 1 of that state are the
//!   initial state (high, low), words 2 and 3 the stream; the increment is `stream << 1 | 1`
//!   and seeding steps once before and once after adding the initial state. A 32-bit draw
//!   returns the low half of a fresh 64-bit output and keeps the high half for the next 32-bit
//!   draw. That kept half belongs to the bit generator, not to one `integers` call: it carries
//!   over from call to call (numpy: four `integers(0, 100, 1)` calls equal one with size 4).
//! - [`Generator::integers`]: numpy's bounded fill for the inclusive range `rng = high - 1 - low`:
//!   `rng == 0` draws nothing, `rng < 2^32 - 1` uses Lemire's multiply-and-reject on 32-bit
//!   draws, `rng == 2^32 - 1` takes 32-bit draws as they are, larger ranges use the 64-bit
//!   Lemire with a 128-bit product, and the full 64-bit range takes 64-bit draws as they are.

/// numpy's `SeedSequence(seed)` with the default pool of four 32-bit words and no spawn key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedSequence {
    pool: [u32; 4],
}

// The hash constants of numpy's SeedSequence (bit_generator.pyx).
const INIT_A: u32 = 0x43b0_d7e5;
const MULT_A: u32 = 0x931e_8875;
const INIT_B: u32 = 0x8b51_f9dd;
const MULT_B: u32 = 0x58f3_8ded;
const MIX_MULT_L: u32 = 0xca01_f9dd;
const MIX_MULT_R: u32 = 0x4973_f715;
const XSHIFT: u32 = 16;

/// One hash of the entropy mixing; `hash_const` is advanced on every use.
fn hashmix(value: u32, hash_const: &mut u32) -> u32 {
    let mut v = value ^ *hash_const;
    *hash_const = hash_const.wrapping_mul(MULT_A);
    v = v.wrapping_mul(*hash_const);
    v ^ (v >> XSHIFT)
}

/// Combines two pool words.
fn mix(x: u32, y: u32) -> u32 {
    let r = MIX_MULT_L
        .wrapping_mul(x)
        .wrapping_sub(MIX_MULT_R.wrapping_mul(y));
    r ^ (r >> XSHIFT)
}

impl SeedSequence {
    pub fn new(seed: u64) -> Self {
        // A Python int becomes its 32-bit words, least significant first, without leading
        // zero words; 0 is the single word 0. A u64 therefore gives one or two words, never
        // more than the pool, so numpy's third loop (entropy beyond the pool) never runs.
        let entropy: Vec<u32> = if seed >> 32 == 0 {
            vec![seed as u32]
        } else {
            vec![seed as u32, (seed >> 32) as u32]
        };
        let mut hash_const = INIT_A;
        let mut pool = [0u32; 4];
        for (i, word) in pool.iter_mut().enumerate() {
            *word = hashmix(entropy.get(i).copied().unwrap_or(0), &mut hash_const);
        }
        for src in 0..pool.len() {
            for dst in 0..pool.len() {
                if src != dst {
                    let h = hashmix(pool[src], &mut hash_const);
                    pool[dst] = mix(pool[dst], h);
                }
            }
        }
        Self { pool }
    }

    /// The mixed entropy pool (numpy's `SeedSequence.pool`).
    pub fn pool(&self) -> [u32; 4] {
        self.pool
    }

    /// `generate_state(n_words, np.uint32)`.
    pub fn generate_state_u32(&self, n_words: usize) -> Vec<u32> {
        let mut hash_const = INIT_B;
        (0..n_words)
            .map(|i| {
                let mut v = self.pool[i % self.pool.len()] ^ hash_const;
                hash_const = hash_const.wrapping_mul(MULT_B);
                v = v.wrapping_mul(hash_const);
                v ^ (v >> XSHIFT)
            })
            .collect()
    }

    /// `generate_state(n_words, np.uint64)`: twice as many 32-bit words, paired low word first.
    pub fn generate_state_u64(&self, n_words: usize) -> Vec<u64> {
        self.generate_state_u32(2 * n_words)
            .chunks_exact(2)
            .map(|w| u64::from(w[0]) | (u64::from(w[1]) << 32))
            .collect()
    }
}

/// The LCG multiplier of numpy's PCG64 (PCG's default 128-bit multiplier).
const PCG_MULTIPLIER: u128 = (2_549_297_995_355_413_924u128 << 64) | 4_865_540_595_714_422_341;

/// numpy's `PCG64` bit generator: PCG XSL-RR 128/64 plus the kept half of a 64-bit output
/// for 32-bit draws.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pcg64 {
    state: u128,
    inc: u128,
    has_uint32: bool,
    uinteger: u32,
}

impl Pcg64 {
    /// numpy's `PCG64(seed_seq)`.
    pub fn from_seed_sequence(seq: &SeedSequence) -> Self {
        let w = seq.generate_state_u64(4);
        let initstate = (u128::from(w[0]) << 64) | u128::from(w[1]);
        let initseq = (u128::from(w[2]) << 64) | u128::from(w[3]);
        let mut rng = Self {
            state: 0,
            inc: (initseq << 1) | 1,
            has_uint32: false,
            uinteger: 0,
        };
        rng.step();
        rng.state = rng.state.wrapping_add(initstate);
        rng.step();
        rng
    }

    fn step(&mut self) {
        self.state = self
            .state
            .wrapping_mul(PCG_MULTIPLIER)
            .wrapping_add(self.inc);
    }

    /// The next 64-bit output (numpy's `next_uint64`, also `random_raw`): step, then XSL-RR of
    /// the new state.
    pub fn next_u64(&mut self) -> u64 {
        self.step();
        let xored = ((self.state >> 64) as u64) ^ (self.state as u64);
        xored.rotate_right((self.state >> 122) as u32)
    }

    /// The next 32-bit output: the kept high half if there is one, else the low half of a
    /// fresh 64-bit output (whose high half is kept).
    pub fn next_u32(&mut self) -> u32 {
        if self.has_uint32 {
            self.has_uint32 = false;
            return self.uinteger;
        }
        let next = self.next_u64();
        self.has_uint32 = true;
        self.uinteger = (next >> 32) as u32;
        next as u32
    }

    /// The LCG state and increment, as numpy's `bit_generator.state["state"]`.
    pub fn state(&self) -> (u128, u128) {
        (self.state, self.inc)
    }

    /// The kept 32-bit half, if any (numpy's `has_uint32` and `uinteger` while it is set).
    pub fn pending_u32(&self) -> Option<u32> {
        self.has_uint32.then_some(self.uinteger)
    }

    /// The generator at a state read with `state` and `pending_u32` (a checkpoint's sampler).
    pub fn from_state(state: u128, inc: u128, pending_u32: Option<u32>) -> Self {
        Self {
            state,
            inc,
            has_uint32: pending_u32.is_some(),
            uinteger: pending_u32.unwrap_or(0),
        }
    }
}

/// numpy's `Generator` over [`Pcg64`], reduced to `integers` with the int64 dtype.
#[derive(Debug, Clone)]
pub struct Generator {
    bit_generator: Pcg64,
}

/// `np.random.default_rng(seed)`.
pub fn default_rng(seed: u64) -> Generator {
    Generator {
        bit_generator: Pcg64::from_seed_sequence(&SeedSequence::new(seed)),
    }
}

impl Generator {
    pub fn bit_generator(&self) -> &Pcg64 {
        &self.bit_generator
    }

    /// A generator continuing from `bit_generator`'s state.
    pub fn from_bit_generator(bit_generator: Pcg64) -> Self {
        Self { bit_generator }
    }

    /// `integers(low, high, size=size)`: `size` values uniform in `[low, high)`, int64.
    ///
    /// # Panics
    /// If `low >= high` (numpy raises `ValueError`).
    pub fn integers(&mut self, low: i64, high: i64, size: usize) -> Vec<i64> {
        assert!(low < high, "integers: low ({low}) >= high ({high})");
        self.integers_closed(low, high - 1, size)
    }

    /// `integers(low, high, size=size, endpoint=True)`: `size` values uniform in `[low, high]`.
    /// The only way to ask for the whole int64 range (`integers(-2**63, 2**63)` in numpy).
    ///
    /// # Panics
    /// If `low > high` (numpy raises `ValueError`).
    pub fn integers_closed(&mut self, low: i64, high: i64, size: usize) -> Vec<i64> {
        assert!(low <= high, "integers: low ({low}) > high ({high})");
        // numpy: rng = <uint64>(high - low) (closed), off = <uint64>low, out = off + draw (mod 2^64).
        let rng = (i128::from(high) - i128::from(low)) as u64;
        let off = low as u64;
        let mut out = vec![0u64; size];
        self.bounded_fill(rng, &mut out);
        out.into_iter()
            .map(|x| off.wrapping_add(x) as i64)
            .collect()
    }

    /// numpy's `random_bounded_uint64_fill` with `use_masked = False` and no offset: every
    /// value uniform in `[0, rng]`.
    fn bounded_fill(&mut self, rng: u64, out: &mut [u64]) {
        let bg = &mut self.bit_generator;
        if rng == 0 {
            out.fill(0);
        } else if rng == u64::from(u32::MAX) {
            // Lemire's 32-bit form cannot represent rng + 1 = 2^32; every 32-bit draw fits.
            out.iter_mut().for_each(|o| *o = u64::from(bg.next_u32()));
        } else if rng < u64::from(u32::MAX) {
            out.iter_mut()
                .for_each(|o| *o = u64::from(lemire_u32(bg, rng as u32)));
        } else if rng == u64::MAX {
            out.iter_mut().for_each(|o| *o = bg.next_u64());
        } else {
            out.iter_mut().for_each(|o| *o = lemire_u64(bg, rng));
        }
    }
}

/// Lemire's nearly divisionless method on 32-bit draws: uniform in `[0, rng]`,
/// `rng < 2^32 - 1`. The remainder is computed only when the cheap bound says a rejection
/// is possible.
fn lemire_u32(bg: &mut Pcg64, rng: u32) -> u32 {
    let rng_excl = rng + 1;
    let mut m = u64::from(bg.next_u32()) * u64::from(rng_excl);
    let mut leftover = m as u32;
    if leftover < rng_excl {
        let threshold = (u32::MAX - rng) % rng_excl;
        while leftover < threshold {
            m = u64::from(bg.next_u32()) * u64::from(rng_excl);
            leftover = m as u32;
        }
    }
    (m >> 32) as u32
}

/// The same on 64-bit draws with a 128-bit product: uniform in `[0, rng]`, `rng < 2^64 - 1`.
fn lemire_u64(bg: &mut Pcg64, rng: u64) -> u64 {
    let rng_excl = rng + 1;
    let mut m = u128::from(bg.next_u64()) * u128::from(rng_excl);
    let mut leftover = m as u64;
    if leftover < rng_excl {
        let threshold = (u64::MAX - rng) % rng_excl;
        while leftover < threshold {
            m = u128::from(bg.next_u64()) * u128::from(rng_excl);
            leftover = m as u64;
        }
    }
    (m >> 64) as u64
}
