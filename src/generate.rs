//! Text generation with a KV cache (`ternlab generate`): the prompt is forwarded once, then
//! each new token alone against the cached keys and values of the earlier ones. Greedy at
//! temperature 0, else sampled from the softmax at `temperature` within the nucleus `top_p`,
//! seeded.

use crate::model::{KvCache, Qwen3};
use anyhow::Result;
use candle_core::{DType, Tensor, D};
use rand::{Rng, SeedableRng};

/// How the next token is chosen.
#[derive(Debug, Clone, Copy)]
pub struct Sampler {
    /// 0: greedy (the largest logit).
    pub temperature: f64,
    /// Sample among the most likely tokens whose probabilities sum to `top_p` (1: all).
    pub top_p: f64,
    pub seed: u64,
}

impl Sampler {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

/// What `generate` produced.
#[derive(Debug, Clone)]
pub struct Generated {
    /// The new tokens (the stop token excluded).
    pub tokens: Vec<u32>,
    /// Seconds for the prompt's forward pass and for the new tokens after it.
    pub prefill_s: f64,
    pub decode_s: f64,
}

/// Continues `prompt` by up to `max_new` tokens, stopping before any of `eos`; with `cache`
/// off, every step forwards the whole sequence again (the reference the cache is tested
/// against).
pub fn generate(
    model: &Qwen3,
    prompt: &[u32],
    max_new: usize,
    eos: &[u32],
    sampler: Sampler,
    cache: bool,
) -> Result<Generated> {
    anyhow::ensure!(!prompt.is_empty(), "the prompt has no tokens");
    let model = model.frozen()?;
    let dev = model.device().clone();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(sampler.seed);
    let mut kv = KvCache::default();
    let mut seq: Vec<u32> = prompt.to_vec();
    let mut out = Vec::new();
    let start = std::time::Instant::now();
    let mut prefill_s = 0.0;
    for step in 0..max_new {
        let logits = if cache {
            let new = if step == 0 {
                &seq[..]
            } else {
                &seq[seq.len() - 1..]
            };
            model.forward_cached(&Tensor::new(new, &dev)?.unsqueeze(0)?, &mut kv)?
        } else {
            model.forward(&Tensor::new(&seq[..], &dev)?.unsqueeze(0)?)?
        };
        let last = logits.squeeze(0)?.get(logits.dim(1)? - 1)?;
        let next = pick(&last.to_dtype(DType::F32)?, sampler, &mut rng)?;
        if step == 0 {
            prefill_s = start.elapsed().as_secs_f64();
        }
        if eos.contains(&next) {
            break;
        }
        out.push(next);
        seq.push(next);
    }
    Ok(Generated {
        tokens: out,
        prefill_s,
        decode_s: start.elapsed().as_secs_f64() - prefill_s,
    })
}

/// The next token from one position's logits (V,).
fn pick(logits: &Tensor, s: Sampler, rng: &mut impl Rng) -> Result<u32> {
    if s.temperature <= 0.0 {
        return Ok(logits.argmax(D::Minus1)?.to_scalar::<u32>()?);
    }
    let probs = candle_nn::ops::softmax_last_dim(&(logits / s.temperature)?)?.to_vec1::<f32>()?;
    let mut order: Vec<usize> = (0..probs.len()).collect();
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
    let mut kept = Vec::new();
    let mut mass = 0f64;
    for i in order {
        kept.push(i);
        mass += probs[i] as f64;
        if mass >= s.top_p {
            break;
        }
    }
    let mut u = rng.random::<f64>() * mass;
    for &i in &kept {
        u -= probs[i] as f64;
        if u <= 0.0 {
            return Ok(i as u32);
        }
    }
    Ok(*kept.last().expect("at least one token") as u32)
}
