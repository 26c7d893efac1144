//! Text generation with a KV cache (`ternlab generate`): the prompt is forwarded once, then
//! each new token alone against the cached keys and values of the earlier ones. Greedy at
//! temperature 0, else sampled from the softmax at `temperature` within the nucleus `top_p`,
//! seeded.

use crate::model::{KvCache, Pass, Qwen3, Rope};
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

/// Greedy continuations of several prompts in one batch (a run's samples): the prompts left
/// padded to the longest, each row at its own positions (0 at its first token, as alone) and
/// masked from the padding, then one new token per row per step against the KV cache, until
/// every row met one of `eos` or `max_new` tokens. The rows' arithmetic is that of one prompt
/// at a time up to the rounding of products over more rows; one forward per token for all rows
/// instead of one per row and token (decoding is bound by launches, not arithmetic).
pub fn generate_greedy_batch(
    model: &Qwen3,
    prompts: &[Vec<u32>],
    max_new: usize,
    eos: &[u32],
) -> Result<Vec<Vec<u32>>> {
    anyhow::ensure!(
        prompts.iter().all(|p| !p.is_empty()),
        "a prompt has no tokens"
    );
    let b = prompts.len();
    let mut out = vec![Vec::new(); b];
    if b == 0 || max_new == 0 {
        return Ok(out);
    }
    let model = model.frozen()?;
    let dev = model.device().clone();
    let (cd, ops) = (model.compute_dtype, model.ops());
    let p = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let pads: Vec<usize> = prompts.iter().map(|q| p - q.len()).collect();
    let table = Rope::new(&model.cfg, p + max_new, &dev)?;
    let ids: Vec<u32> = prompts
        .iter()
        .zip(&pads)
        .flat_map(|(q, &pad)| std::iter::repeat_n(0, pad).chain(q.iter().copied()))
        .collect();
    let positions: Vec<Vec<u32>> = pads
        .iter()
        .map(|&pad| (0..p).map(|i| i.saturating_sub(pad) as u32).collect())
        .collect();
    // (a padding query sees itself, so that its row of the softmax is not all -inf)
    let visible = |r: usize, i: usize, j: usize| j <= i && (j >= pads[r] || j == i);
    let pass = Pass::rows(&table, &positions, p, visible, cd, ops)?;
    let mut kv = KvCache::default();
    let ids = Tensor::from_vec(ids, (b, p), &dev)?;
    let mut logits = model.forward_pass_cached(&ids, &pass, &mut kv)?;
    let mut done = vec![false; b];
    for step in 0..max_new {
        let l = logits.dim(1)?;
        let last = logits
            .narrow(1, l - 1, 1)?
            .squeeze(1)?
            .to_dtype(DType::F32)?;
        let next = last.argmax(D::Minus1)?.to_vec1::<u32>()?;
        for r in 0..b {
            if done[r] {
                continue;
            }
            if eos.contains(&next[r]) {
                done[r] = true;
            } else {
                out[r].push(next[r]);
            }
        }
        if done.iter().all(|&d| d) || step + 1 == max_new {
            break;
        }
        // The new tokens at cache position p + step, row r's at its own position.
        let positions: Vec<Vec<u32>> = pads
            .iter()
            .map(|&pad| vec![(p + step - pad) as u32])
            .collect();
        let pass = Pass::rows(
            &table,
            &positions,
            p + step + 1,
            |r, _, j| j >= pads[r],
            cd,
            ops,
        )?;
        logits =
            model.forward_pass_cached(&Tensor::from_vec(next, (b, 1), &dev)?, &pass, &mut kv)?;
    }
    Ok(out)
}
