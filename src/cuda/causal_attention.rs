//! Causal grouped-query attention by blocks of query positions, as the hand-written step runs
//! it: the score and mixing GEMMs (`gemm.rs`) around `attention.rs`'s softmax kernels.
//!
//! By (batch, key/value head) group: the R = H / K query heads of a group sit together,
//! position-major, q as (B, K, L, R, D), so that a block of query positions is one block of
//! rows for every head of the group. Scores (B, K, L * R, L) are computed block by block of
//! `chunk` positions, each against the keys up to the block's end only: from L = 512 on,
//! blocks of 256 positions skip 3/8 of the square's GEMM work (L = 1024) and its memory traffic.

use super::attention::{causal_softmax, causal_softmax_back};
use super::gemm::{gemm, Mat};
use super::launch::Gpu;
use candle_core::{Result, Tensor};

pub struct CausalAttention {
    /// batch, key/value heads, query heads per key/value head, positions, head dim
    pub b: usize,
    pub k: usize,
    pub r: usize,
    pub l: usize,
    pub d: usize,
    /// query positions per block
    pub chunk: usize,
    pub scale: f32,
}

impl CausalAttention {
    /// For `b` sequences of `l` positions, `h` query heads over `k` key/value heads of `d`, in
    /// blocks of `chunk` positions (None: 256 from L = 512 on, else the whole sequence).
    pub fn new(b: usize, l: usize, (h, k, d): (usize, usize, usize), chunk: Option<usize>) -> Self {
        let chunk = chunk
            .unwrap_or(if l >= 512 { 256 } else { l })
            .clamp(1, l.max(1));
        Self {
            b,
            k,
            r: h / k,
            l,
            d,
            chunk,
            scale: 1.0 / (d as f32).sqrt(),
        }
    }

    /// (first position, positions) of each block.
    fn blocks(&self) -> Vec<(usize, usize)> {
        (0..self.l)
            .step_by(self.chunk)
            .map(|c0| (c0, self.chunk.min(self.l - c0)))
            .collect()
    }

    /// Scores of query-major rows against keys, block by block: a (B*K, L*R, D) and keys
    /// (B*K, L, D) -> (B*K, L*R, L), each block's rows filled up to its last key.
    fn scores(&self, gpu: &Gpu, a: &Tensor, keys: &Tensor) -> Result<Tensor> {
        let (r, l, d, batch) = (self.r, self.l, self.d, self.b * self.k);
        let s = gpu.empty((batch, l * r, l), a.dtype())?;
        for (c0, cn) in self.blocks() {
            gemm(
                gpu,
                (cn * r, c0 + cn, d),
                Mat::of(a)?.at(c0 * r * d),
                Mat::of(keys)?.t(),
                Mat::of(&s)?.at(c0 * r * l).ld(l),
                0.,
                batch,
                (l * r * d, l * d, l * r * l),
            )?;
        }
        Ok(s)
    }

    /// Rows of weights over keys times per-key values, block by block: p (B*K, L*R, L) and
    /// values (B*K, L, D) -> (B*K, L*R, D).
    fn mix(&self, gpu: &Gpu, p: &Tensor, values: &Tensor) -> Result<Tensor> {
        let (r, l, d, batch) = (self.r, self.l, self.d, self.b * self.k);
        let y = gpu.empty((batch, l * r, d), p.dtype())?;
        for (c0, cn) in self.blocks() {
            gemm(
                gpu,
                (cn * r, d, c0 + cn),
                Mat::of(p)?.at(c0 * r * l).ld(l),
                Mat::of(values)?,
                Mat::of(&y)?.at(c0 * r * d),
                0.,
                batch,
                (l * r * l, l * d, l * r * d),
            )?;
        }
        Ok(y)
    }

    /// The per-key sum `p^T @ g` over all query rows: p (B*K, L*R, L), g (B*K, L*R, D) ->
    /// (B*K, L, D). The last block sees every key, so it goes first and sets the result; the
    /// others add to their leading keys.
    fn per_key(&self, gpu: &Gpu, p: &Tensor, g: &Tensor) -> Result<Tensor> {
        let (r, l, d, batch) = (self.r, self.l, self.d, self.b * self.k);
        let y = gpu.empty((batch, l, d), p.dtype())?;
        for (i, (c0, cn)) in self.blocks().into_iter().rev().enumerate() {
            gemm(
                gpu,
                (c0 + cn, d, cn * r),
                Mat::of(p)?.t().at(c0 * r * l).ld(l),
                Mat::of(g)?.at(c0 * r * d),
                Mat::of(&y)?,
                if i == 0 { 0. } else { 1. },
                batch,
                (l * r * l, l * r * d, l * d),
            )?;
        }
        Ok(y)
    }

    /// (probabilities (B*K, L*R, L), output (B*K, L*R, D)) from qr (B*K, L*R, D) and kr, vt
    /// (B*K, L, D).
    pub fn forward(
        &self,
        gpu: &Gpu,
        qr: &Tensor,
        kr: &Tensor,
        vt: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let probs = self.probs(gpu, qr, kr)?;
        let att = self.mix(gpu, &probs, vt)?;
        Ok((probs, att))
    }

    /// The attention probabilities (B*K, L*R, L), the softmax in place over the scores.
    pub fn probs(&self, gpu: &Gpu, qr: &Tensor, kr: &Tensor) -> Result<Tensor> {
        let probs = self.scores(gpu, qr, kr)?;
        causal_softmax(gpu, &probs, &probs, (self.r, self.chunk), self.scale)?;
        Ok(probs)
    }

    /// (dqr, dkr, dvt) from the output's gradient datt (B*K, L*R, D).
    pub fn backward(
        &self,
        gpu: &Gpu,
        (qr, kr, vt): (&Tensor, &Tensor, &Tensor),
        probs: &Tensor,
        datt: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let dp = self.scores(gpu, datt, vt)?;
        let dvt = self.per_key(gpu, probs, datt)?;
        // The softmax backward overwrites dP with the scores' gradient dS.
        causal_softmax_back(gpu, probs, &dp, &dp, (self.r, self.chunk), self.scale)?;
        let dqr = self.mix(gpu, &dp, kr)?;
        let dkr = self.per_key(gpu, &dp, qr)?;
        Ok((dqr, dkr, dvt))
    }
}
