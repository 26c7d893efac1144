//! Corpus -> paragraphs -> train / held-out token streams -> batches, exactly as the seed:
//! paragraphs are split on blank lines and stripped, the last `val_fraction` of them are held
//! out, each side is joined with "\n\n" and tokenized without added special tokens.
//! Random batches are the seed's too: numpy's `default_rng(seed).integers(0, n - L - 1, B)`
//! each step (src/numpy_rng.rs), so a run trains on the same windows as the MLX script.

use crate::choice::{serde_by_name, Choice};
use crate::numpy_rng::{default_rng, Generator, Pcg64};
use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use std::path::Path;
use tokenizers::Tokenizer;

/// Train and held-out token ids of one corpus.
pub struct Corpus {
    pub train: Vec<u32>,
    pub val: Vec<u32>,
    pub n_paragraphs: usize,
    pub n_val_paragraphs: usize,
}

/// The seed's split: paragraphs on "\n\n", stripped, empty ones dropped.
pub fn paragraphs(text: &str) -> Vec<&str> {
    text.split("\n\n")
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect()
}

/// How many trailing paragraphs are held out: floor(n * fraction), at least 1
/// (the seed's `max(1, len // 10)` for fraction 0.1).
pub fn n_held_out(n_paragraphs: usize, val_fraction: f64) -> usize {
    // The epsilon keeps 0.1 * 30 = 3.0000000000000004 and 0.1 * 70 from rounding the wrong way.
    ((n_paragraphs as f64 * val_fraction + 1e-9).floor() as usize).max(1)
}

/// Corpora this process has tokenized, by file (path, length, modification time), tokenizer
/// (its JSON) and split: a sweep's runs share one tokenization of their corpus.
type CorpusKey = (
    std::path::PathBuf,
    u64,
    Option<std::time::SystemTime>,
    u64,
    u64,
);
static TOKENIZED: std::sync::Mutex<Vec<(CorpusKey, std::sync::Arc<Corpus>)>> =
    std::sync::Mutex::new(Vec::new());

impl Corpus {
    /// `load`, once per process for each (file as it is now, tokenizer, val_fraction).
    pub fn load_shared(
        path: &Path,
        tokenizer: &Tokenizer,
        val_fraction: f64,
    ) -> Result<std::sync::Arc<Self>> {
        use std::hash::{Hash, Hasher};
        let meta =
            std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
        let mut h = std::collections::hash_map::DefaultHasher::new();
        tokenizer
            .to_string(false)
            .map_err(|e| anyhow::anyhow!("serializing the tokenizer: {e}"))?
            .hash(&mut h);
        let key = (
            std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf()),
            meta.len(),
            meta.modified().ok(),
            h.finish(),
            val_fraction.to_bits(),
        );
        let mut cache = TOKENIZED.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, c)) = cache.iter().find(|(k, _)| *k == key) {
            return Ok(c.clone());
        }
        let c = std::sync::Arc::new(Self::load(path, tokenizer, val_fraction)?);
        cache.push((key, c.clone()));
        Ok(c)
    }

    pub fn load(path: &Path, tokenizer: &Tokenizer, val_fraction: f64) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let text = String::from_utf8(bytes)
            .map_err(|e| anyhow::anyhow!("{}: not UTF-8 text ({e})", path.display()))?;
        Self::from_text(&text, tokenizer, val_fraction)
            .with_context(|| format!("corpus {}", path.display()))
    }

    pub fn from_text(text: &str, tokenizer: &Tokenizer, val_fraction: f64) -> Result<Self> {
        let paras = paragraphs(text);
        anyhow::ensure!(
            paras.len() >= 2,
            "has {} paragraph(s); at least 2 blank-line-separated paragraphs are needed \
             (one to train on, one to hold out)",
            paras.len()
        );
        let n_val = n_held_out(paras.len(), val_fraction).min(paras.len() - 1);
        let (train, val) = paras.split_at(paras.len() - n_val);
        let encode = |ps: &[&str]| -> Result<Vec<u32>> {
            let joined = ps.join("\n\n");
            let enc = tokenizer
                .encode(joined.as_str(), false)
                .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
            Ok(enc.get_ids().to_vec())
        };
        Ok(Self {
            train: encode(train)?,
            val: encode(val)?,
            n_paragraphs: paras.len(),
            n_val_paragraphs: n_val,
        })
    }
}

/// How training windows are chosen (`data.sampling`: "random" or "sequential").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sampling {
    /// The seed's recipe: each step, numpy's `default_rng(seed).integers(0, n - L - 1, B)`
    /// (one generator for the whole run), so the offsets equal the MLX script's for the seed.
    Random,
    /// Non-overlapping windows in order: window k = tokens[k*L .. k*L + L + 1]; batch i holds
    /// windows (i*B + b) mod K for K = (n - 1) / L. Token-for-token comparable across tools.
    Sequential,
}

impl Choice for Sampling {
    const ALL: &'static [Self] = &[Sampling::Random, Sampling::Sequential];
    fn name(self) -> &'static str {
        match self {
            Sampling::Random => "random",
            Sampling::Sequential => "sequential",
        }
    }
}

serde_by_name!(Sampling);

/// Where a `Batcher` stands: the batches drawn so far and the random generator's state (the
/// 128-bit numbers as decimal strings, which JSON numbers cannot hold), so that a resumed run
/// draws the windows the uninterrupted one would have.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SamplerState {
    pub batches: usize,
    pub pcg64_state: String,
    pub pcg64_inc: String,
    pub pending_u32: Option<u32>,
}

/// Produces the (inputs, targets) windows of each training step.
pub struct Batcher<'a> {
    tokens: &'a [u32],
    seq_len: usize,
    batch_size: usize,
    sampling: Sampling,
    rng: Generator,
    step: usize,
}

impl<'a> Batcher<'a> {
    pub fn new(
        tokens: &'a [u32],
        seq_len: usize,
        batch_size: usize,
        sampling: Sampling,
        seed: u64,
    ) -> Result<Self> {
        anyhow::ensure!(
            tokens.len() > seq_len + 1,
            "the training split has {} tokens; seq_len = {seq_len} needs at least {}",
            tokens.len(),
            seq_len + 2
        );
        Ok(Self {
            tokens,
            seq_len,
            batch_size,
            sampling,
            rng: default_rng(seed),
            step: 0,
        })
    }

    pub fn state(&self) -> SamplerState {
        let bg = self.rng.bit_generator();
        let (state, inc) = bg.state();
        SamplerState {
            batches: self.step,
            pcg64_state: state.to_string(),
            pcg64_inc: inc.to_string(),
            pending_u32: bg.pending_u32(),
        }
    }

    /// Continues from `s` (a state this batcher's run saved).
    pub fn restore(&mut self, s: &SamplerState) -> Result<()> {
        let num = |x: &str| {
            x.parse::<u128>()
                .map_err(|e| anyhow::anyhow!("sampler state {x:?} is not a 128-bit number: {e}"))
        };
        let bg = Pcg64::from_state(num(&s.pcg64_state)?, num(&s.pcg64_inc)?, s.pending_u32);
        self.rng = Generator::from_bit_generator(bg);
        self.step = s.batches;
        Ok(())
    }

    /// Start offsets of the next batch's windows.
    pub fn next_starts(&mut self) -> Vec<usize> {
        let (l, b) = (self.seq_len, self.batch_size);
        let starts = match self.sampling {
            Sampling::Random => {
                // The seed's `rng.integers(0, n - L - 1, size=(B,))`: the last start leaves room
                // for the shifted target. `new` checked n > L + 1, so the range is not empty.
                let max_start = (self.tokens.len() - l - 1) as i64;
                self.rng
                    .integers(0, max_start, b)
                    .into_iter()
                    .map(|s| s as usize)
                    .collect()
            }
            Sampling::Sequential => {
                let k = (self.tokens.len() - 1) / l;
                (0..b).map(|j| ((self.step * b + j) % k) * l).collect()
            }
        };
        self.step += 1;
        starts
    }

    /// The next batch as (inputs, targets), each (B, L) of u32 token ids.
    pub fn next_batch(&mut self, device: &Device) -> Result<(Tensor, Tensor)> {
        let starts = self.next_starts();
        windows(self.tokens, &starts, self.seq_len, device)
    }
}

/// Stacks windows `tokens[s .. s+L]` (inputs) and `tokens[s+1 .. s+L+1]` (targets).
pub fn windows(
    tokens: &[u32],
    starts: &[usize],
    seq_len: usize,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let mut x = Vec::with_capacity(starts.len() * seq_len);
    let mut y = Vec::with_capacity(starts.len() * seq_len);
    for &s in starts {
        x.extend_from_slice(&tokens[s..s + seq_len]);
        y.extend_from_slice(&tokens[s + 1..s + seq_len + 1]);
    }
    let shape = (starts.len(), seq_len);
    Ok((
        Tensor::from_vec(x, shape, device)?,
        Tensor::from_vec(y, shape, device)?,
    ))
}

/// Start offsets of the held-out windows, as the seed: max(1, (n - 1) / L) non-overlapping
/// windows, stopping at the first that would run past the end.
pub fn eval_starts(n_tokens: usize, seq_len: usize) -> Vec<usize> {
    let n_windows = ((n_tokens.saturating_sub(1)) / seq_len).max(1);
    (0..n_windows)
        .map(|i| i * seq_len)
        .take_while(|s| s + seq_len < n_tokens)
        .collect()
}
