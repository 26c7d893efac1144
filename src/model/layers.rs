//! The blocks of Qwen3, each built from its checkpoint weights by `new(cfg, vb)` as in
//! candle's `candle-transformers` models, and run by `forward` with the ops of `super::ops`.
//!
//! Legend for shape notes: B batch, L sequence length, E hidden size, H query heads,
//! K key/value heads, R = H / K, D head dim, F intermediate size, V vocabulary.

use super::config::{Projection, Qwen3Config};
use super::ops::{self, Ops};
use super::ternary::{self as tq, ternarize_at, Quant, ScaleRule};
use super::weights::WeightSource;
use crate::choice::Choice;
use candle_core::{DType, Device, Result, Tensor, D};

/// What every block of one forward pass needs: the batch shape, the RoPE tables and causal
/// mask for its length, the compute dtype and the ops.
pub struct Pass {
    /// Sequences.
    pub b: usize,
    /// Tokens per sequence.
    pub l: usize,
    pub rope: Rope,
    pub mask: Tensor,
    /// dtype of activations and matmuls.
    pub cd: DType,
    pub ops: Ops,
    /// The rotary tables are per sequence ((B, 1, L, D): each row at its own positions) and
    /// the mask too ((B, 1, L, T), for the composed softmax, which broadcasts it): see
    /// `Pass::rows`, `ops::qk_norm_rope_rows`.
    pub per_row: bool,
}

impl Pass {
    pub fn new(
        cfg: &Qwen3Config,
        (b, l): (usize, usize),
        device: &Device,
        cd: DType,
        ops: Ops,
    ) -> Result<Self> {
        Ok(Self {
            b,
            l,
            rope: Rope::new(cfg, l, device)?,
            mask: ops::causal_mask(l, device)?,
            cd,
            ops,
            per_row: false,
        })
    }
}

impl Pass {
    /// The pass of `l` new tokens after `offset` cached ones (generation with a `KvCache`):
    /// RoPE at positions offset..offset+l and a (l, offset + l) causal mask.
    pub fn at(
        cfg: &Qwen3Config,
        (b, l): (usize, usize),
        offset: usize,
        device: &Device,
        cd: DType,
        ops: Ops,
    ) -> Result<Self> {
        let full = Rope::new(cfg, offset + l, device)?;
        let rope = Rope {
            cos: full.cos.narrow(0, offset, l)?,
            sin: full.sin.narrow(0, offset, l)?,
        };
        let t = offset + l;
        let mask: Vec<f32> = (0..l)
            .flat_map(|i| {
                (0..t).map(move |j| {
                    if j > offset + i {
                        f32::NEG_INFINITY
                    } else {
                        0.0
                    }
                })
            })
            .collect();
        Ok(Self {
            b,
            l,
            rope,
            mask: Tensor::from_vec(mask, (l, t), device)?,
            cd,
            ops,
            per_row: false,
        })
    }

    /// A pass of `b` sequences of `l` new tokens after `t - l` cached positions each, the
    /// tokens of row `r` at positions `positions[r]` (taken from `table`, a `Rope` long enough)
    /// and attending to the cached and new positions `visible(r, i, j)` says (query i of the
    /// new tokens, key j of all t): batched generation of prompts of different lengths, left
    /// padded (`crate::generate::generate_greedy_batch`).
    pub fn rows(
        table: &Rope,
        positions: &[Vec<u32>],
        t: usize,
        visible: impl Fn(usize, usize, usize) -> bool,
        cd: DType,
        ops: Ops,
    ) -> Result<Self> {
        let (b, l) = (positions.len(), positions.first().map_or(0, Vec::len));
        let device = table.cos.device();
        let flat: Vec<u32> = positions.iter().flatten().copied().collect();
        let idx = Tensor::from_vec(flat, b * l, device)?;
        let d = table.cos.dim(1)?;
        let gather = |t: &Tensor| t.index_select(&idx, 0)?.reshape((b, 1, l, d));
        let mut mask = Vec::with_capacity(b * l * t);
        for r in 0..b {
            for i in 0..l {
                mask.extend((0..t).map(|j| {
                    if visible(r, i, j) {
                        0f32
                    } else {
                        f32::NEG_INFINITY
                    }
                }));
            }
        }
        Ok(Self {
            b,
            l,
            rope: Rope {
                cos: gather(&table.cos)?,
                sin: gather(&table.sin)?,
            },
            mask: Tensor::from_vec(mask, (b, 1, l, t), device)?,
            cd,
            ops,
            per_row: true,
        })
    }
}

/// The keys and values of the positions seen so far, per decoder layer ((B, K, T, D) each,
/// after norm and RoPE), so that generation feeds one new token at a time.
#[derive(Default, Clone)]
pub struct KvCache {
    pub(crate) layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    /// Positions cached.
    pub fn len(&self) -> usize {
        match self.layers.first() {
            Some(Some((k, _))) => k.dim(2).unwrap_or(0),
            _ => 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A bias-free linear layer `y = x W^T`, optionally ternary (forward with `W_t`, STE backward).
#[derive(Clone)]
pub struct Linear {
    pub(crate) weight: Tensor, // (out, in)
    /// How the weight is ternarized (None: dense).
    pub(crate) quant: Option<Quant>,
    /// How far the weight is quantized: `W + lambda * (W_t - W)`, 1 = `W_t` (see
    /// `Qwen3::at_step`).
    pub(crate) lambda: f32,
    /// The input is fake-quantized to 8 bits per token first (`quant.activation_bits = 8`).
    pub(crate) act_quant: bool,
    pub(crate) name: String,
    /// The learned scales (`quant.scale = "learned"`), f32 of shape `ternary::scale_shape`, a
    /// trainable parameter named `...weight_scale`.
    pub(crate) scale: Option<Tensor>,
}

impl Linear {
    /// The projection `proj` from `vb` (`...self_attn.q_proj`): its weight (out, in) is a
    /// ternary f32 latent when the spec names `proj`, else as in the checkpoint.
    pub fn new(
        in_dim: usize,
        out_dim: usize,
        proj: Projection,
        mut vb: WeightSource<'_>,
    ) -> Result<Self> {
        let quant = vb.quant(proj, (out_dim, in_dim));
        let act_quant = quant.is_some() && vb.activation_bits() == 8;
        let name = vb.path("weight");
        let weight = vb.param("weight", &[out_dim, in_dim], quant.is_some())?;
        let scale = match quant {
            Some(q) if q.scale == ScaleRule::Learned => {
                let init =
                    tq::group_scales(&weight, q)?.reshape(tq::scale_shape(q, (out_dim, in_dim)))?;
                let lr = vb.scale_lr();
                Some(vb.new_param("weight_scale", &init, lr)?)
            }
            _ => None,
        };
        Ok(Self {
            weight,
            quant,
            lambda: 1.0,
            act_quant,
            name,
            scale,
        })
    }

    pub fn forward(&self, x: &Tensor, ops: Ops) -> Result<Tensor> {
        let xq;
        let x = if self.act_quant {
            xq = ops::act_quant(x, ops)?;
            &xq
        } else {
            x
        };
        // The ternary projection is computed from the f32 latent; the product runs in the
        // activations' dtype (bf16 under `train.dtype = "bf16"`).
        let w = match self.quant {
            Some(q) => {
                let s = self.scale.as_ref();
                ops::ternary_weight(&self.weight, q, s, self.lambda, x.dtype(), ops)?
            }
            None => self.weight.to_dtype(x.dtype())?,
        };
        // x is (N, in): activations stay 2-D between layers, so no reshape is recorded (each
        // recorded op costs the backward pass a zero fill and an add in candle).
        x.matmul(&w.t()?)
    }

    pub fn is_ternary(&self) -> bool {
        self.quant.is_some()
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// How the weight is ternarized, if it is.
    pub fn quant(&self) -> Option<Quant> {
        self.quant
    }

    /// The learned scales, if the layer has them (`quant.scale = "learned"`).
    pub fn learned_scale(&self) -> Option<&Tensor> {
        self.scale.as_ref()
    }

    /// The scales a ternary layer multiplies by now, (groups, 1) f32, no gradient: its learned
    /// ones (as rounded for use) or those its rule finds in the weight.
    pub fn group_scales(&self) -> Result<Tensor> {
        let q = self.quant.expect("group_scales of a ternary layer");
        match &self.scale {
            Some(s) => tq::used_scales(s, q),
            None => tq::group_scales(&self.weight, q),
        }
    }

    /// Whether the input is fake-quantized to 8 bits per token first.
    pub fn quantizes_activations(&self) -> bool {
        self.act_quant
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The same layer with `W_t` materialised as a constant dense weight (for evaluation).
    fn frozen(&self) -> Result<Self> {
        let weight = match self.quant {
            Some(q) => ternarize_at(&self.weight, q, self.scale.as_ref(), self.lambda)?,
            None => self.weight.detach(),
        };
        Ok(Self {
            weight,
            quant: None,
            lambda: 1.0,
            // The trained model's inputs stay quantized.
            act_quant: self.act_quant,
            name: self.name.clone(),
            scale: None,
        })
    }
}

/// Root-mean-square norm as transformers' Qwen3RMSNorm: normalise in f32, scale by the weight
/// widened to f32 (so its gradient is summed in f32), return the input's dtype.
#[derive(Clone)]
pub struct RmsNorm {
    pub(crate) weight: Tensor, // (N,)
    pub(crate) eps: f64,
}

impl RmsNorm {
    /// The norm's weight (`size`,) from `vb` (`...input_layernorm`), in the checkpoint's dtype.
    pub fn new(size: usize, eps: f64, mut vb: WeightSource<'_>) -> Result<Self> {
        let weight = vb.param("weight", &[size], false)?;
        Ok(Self { weight, eps })
    }

    pub fn forward(&self, x: &Tensor, ops: Ops) -> Result<Tensor> {
        ops::rms_norm(x, &self.weight, self.eps, ops)
    }

    pub(crate) fn frozen(&self) -> Self {
        Self {
            weight: self.weight.detach(),
            eps: self.eps,
        }
    }
}

/// Rotary position embedding tables for positions 0..L: `cos`, `sin` of shape (L, D).
#[derive(Clone)]
pub struct Rope {
    pub(crate) cos: Tensor,
    pub(crate) sin: Tensor,
}

impl Rope {
    pub fn new(cfg: &Qwen3Config, seq_len: usize, device: &Device) -> Result<Self> {
        let d = cfg.head_dim;
        let base = cfg.rope_theta as f32;
        let inv_freq: Vec<f32> = (0..d / 2)
            .map(|i| 1.0 / base.powf((2 * i) as f32 / d as f32))
            .collect();
        let inv_freq = Tensor::from_vec(inv_freq, (1, d / 2), device)?;
        let pos = Tensor::arange(0u32, seq_len as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((seq_len, 1))?;
        let freqs = pos.broadcast_mul(&inv_freq)?; // (L, D/2)
        let emb = Tensor::cat(&[&freqs, &freqs], D::Minus1)?; // (L, D)
        Ok(Self {
            cos: emb.cos()?,
            sin: emb.sin()?,
        })
    }

    /// The tables (L, d) in f32: cos, sin.
    pub fn tables(&self) -> (&Tensor, &Tensor) {
        (&self.cos, &self.sin)
    }
}

#[derive(Clone)]
pub struct Attention {
    pub(crate) q_proj: Linear,
    pub(crate) k_proj: Linear,
    pub(crate) v_proj: Linear,
    pub(crate) o_proj: Linear,
    pub(crate) q_norm: RmsNorm,
    pub(crate) k_norm: RmsNorm,
    pub(crate) num_heads: usize,
    pub(crate) num_kv_heads: usize,
    pub(crate) head_dim: usize,
}

impl Attention {
    /// Grouped-query attention from `vb` (`model.layers.3.self_attn`).
    pub fn new(cfg: &Qwen3Config, mut vb: WeightSource<'_>) -> Result<Self> {
        let e = cfg.hidden_size;
        let (h, k, d) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let mut linear =
            |proj: Projection, i: usize, o: usize| Linear::new(i, o, proj, vb.pp(proj.name()));
        let q_proj = linear(Projection::Q, e, h * d)?;
        let k_proj = linear(Projection::K, e, k * d)?;
        let v_proj = linear(Projection::V, e, k * d)?;
        let o_proj = linear(Projection::O, h * d, e)?;
        let q_norm = RmsNorm::new(d, cfg.rms_norm_eps, vb.pp("q_norm"))?;
        let k_norm = RmsNorm::new(d, cfg.rms_norm_eps, vb.pp("k_norm"))?;
        Ok(Self {
            q_proj,
            k_proj,
            v_proj,
            o_proj,
            q_norm,
            k_norm,
            num_heads: h,
            num_kv_heads: k,
            head_dim: d,
        })
    }

    /// x (B*L, E) -> (B*L, E), for `p.b` sequences of `p.l` tokens.
    pub fn forward(&self, x: &Tensor, p: &Pass) -> Result<Tensor> {
        self.forward_with(x, p, None)
    }

    /// `forward`, attending also to the cached keys and values of earlier positions (and
    /// adding this pass's to them) when given a layer's cache (`Pass::at`).
    pub fn forward_with(
        &self,
        x: &Tensor,
        p: &Pass,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Result<Tensor> {
        let (b, l) = (p.b, p.l);
        let (h, k, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let r = h / k;
        // 1. project and split heads; normalise q and k per head and rotate them (RoPE):
        //    (B, L, N, D) -> (B, N, L, D)
        // (per-row rotary tables: each sequence at positions of its own)
        let norm_rope = if p.per_row {
            ops::qk_norm_rope_rows
        } else {
            ops::qk_norm_rope
        };
        let q = self.q_proj.forward(x, p.ops)?.reshape((b, l, h, d))?;
        let q = norm_rope(&q, &self.q_norm.weight, self.q_norm.eps, &p.rope, p.ops)?;
        let kk = self.k_proj.forward(x, p.ops)?.reshape((b, l, k, d))?;
        let kk = norm_rope(&kk, &self.k_norm.weight, self.k_norm.eps, &p.rope, p.ops)?;
        let v = self.v_proj.forward(x, p.ops)?.reshape((b, l, k, d))?;
        let v = v.transpose(1, 2)?.contiguous()?;
        // (with a cache: the T = cached + L positions' keys and values)
        let (kk, v) = match cache {
            None => (kk, v),
            Some(slot) => {
                let kv = match slot.take() {
                    None => (kk, v),
                    Some((k0, v0)) => (Tensor::cat(&[&k0, &kk], 2)?, Tensor::cat(&[&v0, &v], 2)?),
                };
                *slot = Some(kv.clone());
                kv
            }
        };
        let t = kk.dim(2)?;
        // 2. grouped-query attention without repeating K and V: query heads k*R .. k*R+R
        //    share key/value head k, so (B, H, L, D) -> (B, K, R*L, D).
        let q = q.reshape((b, k, r * l, d))?;
        let scale = 1.0 / (d as f64).sqrt();
        let scores = q.matmul(&kk.t()?)?.reshape((b, h, l, t))?; // (B, K, R*L, T) -> (B, H, L, T)
                                                                 // (the fused softmax knows only the square causal mask: cached keys take the mask)
        let softmax_ops = if t == l && !p.per_row {
            p.ops
        } else {
            Ops::Composed
        };
        let probs = ops::causal_softmax(&scores, scale, &p.mask, softmax_ops)?;
        let out = probs.reshape((b, k, r * l, t))?.matmul(&v)?; // (B, K, R*L, D)

        // 3. merge heads: (B, H, L, D) -> (B*L, H*D) and project out
        let out = out
            .reshape((b, h, l, d))?
            .transpose(1, 2)?
            .reshape((b * l, h * d))?;
        self.o_proj.forward(&out, p.ops)
    }

    pub(crate) fn linears(&self) -> [&Linear; 4] {
        [&self.q_proj, &self.k_proj, &self.v_proj, &self.o_proj]
    }

    pub(crate) fn frozen(&self) -> Result<Self> {
        Ok(Self {
            q_proj: self.q_proj.frozen()?,
            k_proj: self.k_proj.frozen()?,
            v_proj: self.v_proj.frozen()?,
            o_proj: self.o_proj.frozen()?,
            q_norm: self.q_norm.frozen(),
            k_norm: self.k_norm.frozen(),
            ..*self
        })
    }
}

#[derive(Clone)]
pub struct Mlp {
    pub(crate) gate_proj: Linear,
    pub(crate) up_proj: Linear,
    pub(crate) down_proj: Linear,
}

impl Mlp {
    /// The SwiGLU MLP from `vb` (`model.layers.3.mlp`).
    pub fn new(cfg: &Qwen3Config, mut vb: WeightSource<'_>) -> Result<Self> {
        let (e, f) = (cfg.hidden_size, cfg.intermediate_size);
        let mut linear =
            |proj: Projection, i: usize, o: usize| Linear::new(i, o, proj, vb.pp(proj.name()));
        Ok(Self {
            gate_proj: linear(Projection::Gate, e, f)?,
            up_proj: linear(Projection::Up, e, f)?,
            down_proj: linear(Projection::Down, f, e)?,
        })
    }

    /// down(silu(gate(x)) * up(x)): (B*L, E) -> (B*L, F) -> (B*L, E)
    pub fn forward(&self, x: &Tensor, ops: Ops) -> Result<Tensor> {
        let (gate, up) = (
            self.gate_proj.forward(x, ops)?,
            self.up_proj.forward(x, ops)?,
        );
        self.down_proj
            .forward(&ops::silu_mul(&gate, &up, ops)?, ops)
    }

    pub(crate) fn linears(&self) -> [&Linear; 3] {
        [&self.gate_proj, &self.up_proj, &self.down_proj]
    }

    pub(crate) fn frozen(&self) -> Result<Self> {
        Ok(Self {
            gate_proj: self.gate_proj.frozen()?,
            up_proj: self.up_proj.frozen()?,
            down_proj: self.down_proj.frozen()?,
        })
    }
}

#[derive(Clone)]
pub struct DecoderLayer {
    pub(crate) input_layernorm: RmsNorm,
    pub(crate) self_attn: Attention,
    pub(crate) post_attention_layernorm: RmsNorm,
    pub(crate) mlp: Mlp,
}

impl DecoderLayer {
    /// The seven projections, mutable (q, k, v, o, gate, up, down).
    pub(crate) fn linears_mut(&mut self) -> [&mut Linear; 7] {
        let (a, m) = (&mut self.self_attn, &mut self.mlp);
        [
            &mut a.q_proj,
            &mut a.k_proj,
            &mut a.v_proj,
            &mut a.o_proj,
            &mut m.gate_proj,
            &mut m.up_proj,
            &mut m.down_proj,
        ]
    }

    /// One decoder layer from `vb` (`model.layers.3`). Its parameters are registered as the
    /// seven projections (q, k, v, o, gate, up, down), then the four norms (q_norm, k_norm,
    /// input_layernorm, post_attention_layernorm): the order of the optimizer's state.
    pub fn new(cfg: &Qwen3Config, mut vb: WeightSource<'_>) -> Result<Self> {
        let first = vb.registered();
        let self_attn = Attention::new(cfg, vb.pp("self_attn"))?;
        let mlp = Mlp::new(cfg, vb.pp("mlp"))?;
        let (e, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        let input_layernorm = RmsNorm::new(e, eps, vb.pp("input_layernorm"))?;
        let post_attention_layernorm = RmsNorm::new(e, eps, vb.pp("post_attention_layernorm"))?;
        vb.matrices_first(first);
        Ok(Self {
            input_layernorm,
            self_attn,
            post_attention_layernorm,
            mlp,
        })
    }

    /// x (B*L, E) -> (B*L, E) in the compute dtype `p.cd`. x may come in a lower precision
    /// (the seed's bf16 embedding rows): its norm then returns that precision, and the
    /// projections and the residual sum promote to `cd`, as MLX's type promotion does.
    pub fn forward(&self, x: &Tensor, p: &Pass) -> Result<Tensor> {
        self.forward_with(x, p, None)
    }

    /// `forward` with this layer's slot of a `KvCache` (see `Attention::forward_with`).
    pub fn forward_with(
        &self,
        x: &Tensor,
        p: &Pass,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Result<Tensor> {
        let xn = self.input_layernorm.forward(x, p.ops)?.to_dtype(p.cd)?;
        let h = (x.to_dtype(p.cd)? + self.self_attn.forward_with(&xn, p, cache)?)?;
        &h + self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&h, p.ops)?, p.ops)?
    }

    pub(crate) fn frozen(&self) -> Result<Self> {
        Ok(Self {
            input_layernorm: self.input_layernorm.frozen(),
            self_attn: self.self_attn.frozen()?,
            post_attention_layernorm: self.post_attention_layernorm.frozen(),
            mlp: self.mlp.frozen()?,
        })
    }
}
