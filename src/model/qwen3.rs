//! A training copy of Qwen3: grouped-query attention with q/k RMSNorm, RoPE, SwiGLU MLP, and a
//! tied (or untied) output head. Every op is a differentiable candle composition, so every
//! parameter receives a gradient (candle's fused `rms_norm`, `rope` and `softmax_last_dim`
//! record no backward and would silently freeze the decoder).
//!
//! Legend for shape notes: B batch, L sequence length, E hidden size, H query heads,
//! K key/value heads, R = H / K, D head dim, F intermediate size, V vocabulary.
//! Weights are named as in the Hugging Face checkpoint (`model.layers.3.mlp.up_proj.weight`).

use super::config::{Projection, Qwen3Config};
use super::fused::ternary_weight;
use super::ternary::ternarize;
use super::ternary::TernarySpec;
use crate::choice::Choice;
use candle_core::{DType, Device, Result, Tensor, Var, D};
use std::collections::HashMap;

/// The trainable parameters, by checkpoint name, in a stable order.
#[derive(Default)]
pub struct Params {
    pub named: Vec<(String, Var)>,
}

impl Params {
    pub fn vars(&self) -> Vec<Var> {
        self.named.iter().map(|(_, v)| v.clone()).collect()
    }

    pub fn get(&self, name: &str) -> Option<&Var> {
        self.named.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    pub fn num_elements(&self) -> usize {
        self.named.iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// Registers `tensor` (in its training dtype, on the training device) as a trainable
    /// parameter and returns the tensor the model computes with (it shares the parameter's storage).
    fn add(&mut self, name: String, tensor: Tensor) -> Result<Tensor> {
        let var = Var::from_tensor(&tensor)?;
        let t = var.as_tensor().clone();
        self.named.push((name, var));
        Ok(t)
    }
}

/// Source of initial weights: a checkpoint's tensors by name.
pub type Weights = HashMap<String, Tensor>;

/// The checkpoint tensor `name` on `device`, as f32 when `f32` (the ternary latents), else in
/// the checkpoint's own dtype.
fn take(
    weights: &mut Weights,
    name: &str,
    shape: &[usize],
    f32: bool,
    device: &Device,
) -> Result<Tensor> {
    let t = weights
        .remove(name)
        .ok_or_else(|| candle_core::Error::Msg(format!("checkpoint has no tensor {name}")))?;
    if t.dims() != shape {
        candle_core::bail!(
            "checkpoint tensor {name} has shape {:?}, the config implies {shape:?}",
            t.dims()
        );
    }
    let dtype = if f32 { DType::F32 } else { t.dtype() };
    t.to_dtype(dtype)?.to_device(device)
}

/// A bias-free linear layer `y = x W^T`, optionally ternary (forward with `W_t`, STE backward).
#[derive(Clone)]
pub struct Linear {
    pub(crate) weight: Tensor, // (out, in)
    pub(crate) ternary_group: Option<usize>,
    pub(crate) name: String,
    /// Use the fused CUDA ternary projection where the weight is on a CUDA device.
    pub(crate) fused: bool,
}

impl Linear {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // The ternary projection is computed from the f32 latent; the product runs in the
        // activations' dtype (bf16 under `train.dtype = "bf16"`).
        let w = match self.ternary_group {
            Some(g) => ternary_weight(&self.weight, g, x.dtype(), self.fused)?,
            None => self.weight.to_dtype(x.dtype())?,
        };
        // x is (N, in): activations stay 2-D between layers, so no reshape is recorded (each
        // recorded op costs the backward pass a zero fill and an add in candle).
        x.matmul(&w.t()?)
    }

    pub fn is_ternary(&self) -> bool {
        self.ternary_group.is_some()
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn group_size(&self) -> Option<usize> {
        self.ternary_group
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The same layer with `W_t` materialised as a constant dense weight (for evaluation).
    fn frozen(&self) -> Result<Self> {
        let weight = match self.ternary_group {
            Some(g) => ternarize(&self.weight, g)?,
            None => self.weight.detach(),
        };
        Ok(Self {
            weight,
            ternary_group: None,
            name: self.name.clone(),
            fused: self.fused,
        })
    }
}

/// Root-mean-square norm as transformers' Qwen3RMSNorm: normalise in f32, scale by the weight
/// widened to f32 (so its gradient is summed in f32), return the input's dtype.
#[derive(Clone)]
pub struct RmsNorm {
    pub(crate) weight: Tensor, // (N,)
    pub(crate) eps: f64,
    pub(crate) fused: bool,
}

impl RmsNorm {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.fused && x.device().is_cuda() {
            let w = self.weight.to_dtype(DType::F32)?;
            if let Some(y) = super::fused::rms_norm(x, &w, self.eps, self.fused)? {
                return Ok(y);
            }
        }
        rms_norm_composed(x, &self.weight, self.eps)
    }

    fn frozen(&self) -> Self {
        Self {
            weight: self.weight.detach(),
            eps: self.eps,
            fused: self.fused,
        }
    }
}

/// RMSNorm as composed candle ops (the CPU / Metal path, and the fused kernel's reference).
/// Normalises in f32. An f32 input is scaled by the weight in f32. A bf16 input with a bf16
/// weight (the first layer's input under the seed's bf16 embedding, see `Qwen3::forward`) is
/// rounded to bf16 and then scaled with one more rounding, as MLX and transformers compute it
/// (the product is formed in f32, exactly, so that the weight's gradient sums in f32). A bf16
/// input with an f32 weight is scaled in f32 and rounded once.
pub fn rms_norm_composed(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let var = x.sqr()?.mean_keepdim(D::Minus1)?;
    let x = x.broadcast_div(&(var + eps)?.sqrt()?)?;
    let w = weight.to_dtype(DType::F32)?;
    if dtype == DType::F32 {
        x.broadcast_mul(&w)
    } else if weight.dtype() == dtype {
        x.to_dtype(dtype)?
            .to_dtype(DType::F32)?
            .broadcast_mul(&w)?
            .to_dtype(dtype)
    } else {
        x.broadcast_mul(&w)?.to_dtype(dtype)
    }
}

/// Rotary position embedding tables for positions 0..L: `cos`, `sin` of shape (L, D).
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

    /// `x * cos + rotate_half(x) * sin` for x of shape (B, N, L, D); one fused kernel on CUDA
    /// when `fused`.
    pub fn apply(&self, x: &Tensor, fused: bool) -> Result<Tensor> {
        if let Some(y) = super::fused::rope(x, &self.cos, &self.sin, fused)? {
            return Ok(y);
        }
        let d = x.dim(D::Minus1)?;
        let x1 = x.narrow(D::Minus1, 0, d / 2)?;
        let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        let cos = self.cos.to_dtype(x.dtype())?;
        let sin = self.sin.to_dtype(x.dtype())?;
        x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
    }
}

/// Attention probabilities from raw scores `q k^T` (B, H, L, L): scaled, causally masked,
/// softmax in f32, returned in the scores' dtype. One fused kernel on CUDA when `fused`.
pub fn attention_probs(scores: &Tensor, scale: f64, mask: &Tensor, fused: bool) -> Result<Tensor> {
    if let Some(p) = super::fused::causal_softmax(scores, scale, fused)? {
        return Ok(p);
    }
    let s = (scores * scale)?
        .to_dtype(DType::F32)?
        .broadcast_add(mask)?;
    candle_nn::ops::softmax(&s, D::Minus1)?.to_dtype(scores.dtype())
}

/// (L, L) additive causal mask: 0 on and below the diagonal, -inf above.
pub fn causal_mask(seq_len: usize, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..seq_len)
        .flat_map(|i| (0..seq_len).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (seq_len, seq_len), device)
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
    pub(crate) fused: bool,
}

impl Attention {
    /// x (B*L, E) -> (B*L, E), for `b` sequences of `l` tokens.
    pub fn forward(
        &self,
        x: &Tensor,
        (b, l): (usize, usize),
        rope: &Rope,
        mask: &Tensor,
    ) -> Result<Tensor> {
        let (h, k, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let r = h / k;
        // 1. project and split heads, normalise q and k per head: (B, L, N, D) -> (B, N, L, D)
        let q = self.q_proj.forward(x)?.reshape((b, l, h, d))?;
        let q = self.q_norm.forward(&q)?.transpose(1, 2)?.contiguous()?;
        let kk = self.k_proj.forward(x)?.reshape((b, l, k, d))?;
        let kk = self.k_norm.forward(&kk)?.transpose(1, 2)?.contiguous()?;
        let v = self.v_proj.forward(x)?.reshape((b, l, k, d))?;
        let v = v.transpose(1, 2)?.contiguous()?;
        // 2. rotary position embedding
        let q = rope.apply(&q, self.fused)?;
        let kk = rope.apply(&kk, self.fused)?;
        // 3. grouped-query attention without repeating K and V: query heads k*R .. k*R+R
        //    share key/value head k, so (B, H, L, D) -> (B, K, R*L, D).
        let q = q.reshape((b, k, r * l, d))?;
        let scale = 1.0 / (d as f64).sqrt();
        let scores = q.matmul(&kk.t()?)?.reshape((b, h, l, l))?; // (B, K, R*L, L) -> (B, H, L, L)
        let probs = attention_probs(&scores, scale, mask, self.fused)?;
        let out = probs.reshape((b, k, r * l, l))?.matmul(&v)?; // (B, K, R*L, D)
                                                                // 4. merge heads: (B, H, L, D) -> (B*L, H*D) and project out
        let out = out
            .reshape((b, h, l, d))?
            .transpose(1, 2)?
            .reshape((b * l, h * d))?;
        self.o_proj.forward(&out)
    }

    fn linears(&self) -> [&Linear; 4] {
        [&self.q_proj, &self.k_proj, &self.v_proj, &self.o_proj]
    }

    fn frozen(&self) -> Result<Self> {
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
    /// down(silu(gate(x)) * up(x)): (B, L, E) -> (B, L, F) -> (B, L, E)
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (gate, up) = (self.gate_proj.forward(x)?, self.up_proj.forward(x)?);
        let h = match super::fused::silu_mul(&gate, &up, self.gate_proj.fused)? {
            Some(h) => h,
            None => (gate.silu()? * up)?,
        };
        self.down_proj.forward(&h)
    }

    fn linears(&self) -> [&Linear; 3] {
        [&self.gate_proj, &self.up_proj, &self.down_proj]
    }

    fn frozen(&self) -> Result<Self> {
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
    /// x (B*L, E) -> (B*L, E) in the compute dtype `cd`. x may come in a lower precision
    /// (the seed's bf16 embedding rows): its norm then returns that precision, and the
    /// projections and the residual sum promote to `cd`, as MLX's type promotion does.
    pub fn forward(
        &self,
        x: &Tensor,
        bl: (usize, usize),
        rope: &Rope,
        mask: &Tensor,
        cd: DType,
    ) -> Result<Tensor> {
        let xn = self.input_layernorm.forward(x)?.to_dtype(cd)?;
        let h = (x.to_dtype(cd)? + self.self_attn.forward(&xn, bl, rope, mask)?)?;
        &h + self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&h)?)?
    }
}

#[derive(Clone)]
pub struct Qwen3 {
    pub cfg: Qwen3Config,
    pub(crate) embed_tokens: Tensor,    // (V, E)
    pub(crate) lm_head: Option<Tensor>, // (V, E) when untied
    pub(crate) layers: Vec<DecoderLayer>,
    pub(crate) norm: RmsNorm,
    pub(crate) device: Device,
    /// dtype of activations and matmuls; ternary latents are f32, other parameters as loaded.
    pub(crate) compute_dtype: DType,
    /// The CUDA step's block of query positions in causal attention (None: automatic).
    pub(crate) attention_chunk: Option<usize>,
    /// Whether the CUDA step recomputes attention probabilities in the backward instead of
    /// keeping them (None: automatic, when keeping them would take over a quarter of the card).
    pub(crate) attention_recompute: Option<bool>,
}

impl Qwen3 {
    /// Builds the model from checkpoint tensors (f32, bf16 or f16). The ternary layers' latent
    /// weights become f32; every other parameter keeps the dtype it has in `weights` (the
    /// seed's `train.dense_dtype = "checkpoint"`; the caller converts them beforehand for
    /// "f32"). Tied checkpoints carry no `lm_head.weight`; if one is present anyway it is
    /// ignored.
    pub fn new(
        cfg: &Qwen3Config,
        mut weights: Weights,
        ternary: &TernarySpec,
        device: &Device,
    ) -> Result<(Self, Params)> {
        let mut params = Params::default();
        let (e, f, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
        let (h, k, d) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let mut param =
            |params: &mut Params, name: String, shape: &[usize], f32: bool| -> Result<Tensor> {
                let t = take(&mut weights, &name, shape, f32, device)?;
                params.add(name, t)
            };
        let embed_tokens = param(
            &mut params,
            "model.embed_tokens.weight".into(),
            &[v, e],
            false,
        )?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let mut linear =
                |params: &mut Params, part: &str, proj: Projection, shape: &[usize]| {
                    let name = format!("{p}.{part}.{}.weight", proj.name());
                    let ternary_group = ternary.group_for(proj, shape[1]);
                    let weight = param(params, name.clone(), shape, ternary_group.is_some())?;
                    Ok::<_, candle_core::Error>(Linear {
                        weight,
                        ternary_group,
                        name,
                        fused: false,
                    })
                };
            let self_attn_q = linear(&mut params, "self_attn", Projection::Q, &[h * d, e])?;
            let self_attn_k = linear(&mut params, "self_attn", Projection::K, &[k * d, e])?;
            let self_attn_v = linear(&mut params, "self_attn", Projection::V, &[k * d, e])?;
            let self_attn_o = linear(&mut params, "self_attn", Projection::O, &[e, h * d])?;
            let gate = linear(&mut params, "mlp", Projection::Gate, &[f, e])?;
            let up = linear(&mut params, "mlp", Projection::Up, &[f, e])?;
            let down = linear(&mut params, "mlp", Projection::Down, &[e, f])?;
            let mut norm = |params: &mut Params, name: String, n: usize| {
                Ok::<_, candle_core::Error>(RmsNorm {
                    weight: param(params, name, &[n], false)?,
                    eps: cfg.rms_norm_eps,
                    fused: false,
                })
            };
            let q_norm = norm(&mut params, format!("{p}.self_attn.q_norm.weight"), d)?;
            let k_norm = norm(&mut params, format!("{p}.self_attn.k_norm.weight"), d)?;
            let input_layernorm = norm(&mut params, format!("{p}.input_layernorm.weight"), e)?;
            let post_attention_layernorm = norm(
                &mut params,
                format!("{p}.post_attention_layernorm.weight"),
                e,
            )?;
            layers.push(DecoderLayer {
                input_layernorm,
                self_attn: Attention {
                    q_proj: self_attn_q,
                    k_proj: self_attn_k,
                    v_proj: self_attn_v,
                    o_proj: self_attn_o,
                    q_norm,
                    k_norm,
                    num_heads: h,
                    num_kv_heads: k,
                    head_dim: d,
                    fused: false,
                },
                post_attention_layernorm,
                mlp: Mlp {
                    gate_proj: gate,
                    up_proj: up,
                    down_proj: down,
                },
            });
        }
        let norm = RmsNorm {
            weight: param(&mut params, "model.norm.weight".into(), &[e], false)?,
            eps: cfg.rms_norm_eps,
            fused: false,
        };
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(param(&mut params, "lm_head.weight".into(), &[v, e], false)?)
        };
        let model = Self {
            cfg: cfg.clone(),
            embed_tokens,
            lm_head,
            layers,
            norm,
            device: device.clone(),
            compute_dtype: DType::F32,
            attention_chunk: None,
            attention_recompute: None,
        };
        Ok((model, params))
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The dtype of the parameters that are not ternarized (that of the embedding).
    pub fn dense_dtype(&self) -> DType {
        self.embed_tokens.dtype()
    }

    /// Uses the fused CUDA kernels (on a CUDA device; elsewhere the composed ops run anyway).
    pub fn with_fused(mut self, on: bool) -> Self {
        for layer in &mut self.layers {
            layer.self_attn.fused = on;
            let a = &mut layer.self_attn;
            let m = &mut layer.mlp;
            for lin in [
                &mut a.q_proj,
                &mut a.k_proj,
                &mut a.v_proj,
                &mut a.o_proj,
                &mut m.gate_proj,
                &mut m.up_proj,
                &mut m.down_proj,
            ] {
                lin.fused = on;
            }
            for norm in [
                &mut layer.input_layernorm,
                &mut layer.post_attention_layernorm,
                &mut a.q_norm,
                &mut a.k_norm,
            ] {
                norm.fused = on;
            }
        }
        self.norm.fused = on;
        self
    }

    /// Mean token cross-entropy of this model's logits (fused on CUDA when asked for).
    pub fn loss(&self, logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
        cross_entropy_with(logits, targets, self.is_fused())
    }

    /// Whether the fused CUDA kernels are asked for (see `with_fused`).
    pub fn is_fused(&self) -> bool {
        self.layers
            .first()
            .is_some_and(|l| l.self_attn.q_proj.fused)
    }

    /// Runs activations and matmuls in `dtype` (F32 or BF16); parameters, the ternary
    /// projection, norms, softmax and the loss stay f32.
    pub fn with_compute_dtype(mut self, dtype: DType) -> Self {
        self.compute_dtype = dtype;
        self
    }

    /// The hand-written CUDA step computes causal attention in blocks of `positions` query
    /// positions, each against the keys up to its end (default: 256 from L = 512 on, else the
    /// whole sequence). Other paths ignore it.
    pub fn with_attention_chunk(mut self, positions: usize) -> Self {
        self.attention_chunk = Some(positions);
        self
    }

    /// Whether the hand-written CUDA step recomputes each layer's attention probabilities in
    /// the backward instead of keeping all of them (default: only when keeping them would take
    /// over a quarter of the card's memory). Same values either way.
    pub fn with_attention_recompute(mut self, on: bool) -> Self {
        self.attention_recompute = Some(on);
        self
    }

    /// Token ids (B, L) -> logits (B, L, V).
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, l) = ids.dims2()?;
        let rope = Rope::new(&self.cfg, l, &self.device)?;
        let mask = causal_mask(l, &self.device)?;
        // (B*L, E) from here to the head. Under f32 compute a bf16 embedding's rows enter the
        // first layer as they are, as in the seed (MLX); see `DecoderLayer::forward`.
        let rows = self.embed_tokens.index_select(&ids.flatten_all()?, 0)?;
        let mut x = if self.compute_dtype == DType::F32 {
            rows
        } else {
            rows.to_dtype(self.compute_dtype)?
        };
        for layer in &self.layers {
            x = layer.forward(&x, (b, l), &rope, &mask, self.compute_dtype)?;
        }
        let x = self.norm.forward(&x)?;
        let head = self
            .lm_head
            .as_ref()
            .unwrap_or(&self.embed_tokens)
            .to_dtype(x.dtype())?;
        x.matmul(&head.t()?)?.reshape((b, l, self.cfg.vocab_size))
    }

    /// Every linear layer of the decoder, in checkpoint order.
    pub fn linears(&self) -> Vec<&Linear> {
        self.layers
            .iter()
            .flat_map(|l| {
                let mut v: Vec<&Linear> = l.self_attn.linears().to_vec();
                v.extend(l.mlp.linears());
                v
            })
            .collect()
    }

    pub fn ternary_linears(&self) -> Vec<&Linear> {
        self.linears()
            .into_iter()
            .filter(|l| l.is_ternary())
            .collect()
    }

    /// A detached copy for evaluation: ternary layers hold `W_t` as a constant, so a forward
    /// pass neither ternarizes again nor records anything for backprop.
    pub fn frozen(&self) -> Result<Self> {
        let layers = self
            .layers
            .iter()
            .map(|l| {
                Ok(DecoderLayer {
                    input_layernorm: l.input_layernorm.frozen(),
                    self_attn: l.self_attn.frozen()?,
                    post_attention_layernorm: l.post_attention_layernorm.frozen(),
                    mlp: l.mlp.frozen()?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cfg: self.cfg.clone(),
            embed_tokens: self.embed_tokens.detach(),
            lm_head: self.lm_head.as_ref().map(|t| t.detach()),
            layers,
            norm: self.norm.frozen(),
            device: self.device.clone(),
            compute_dtype: self.compute_dtype,
            attention_chunk: self.attention_chunk,
            attention_recompute: self.attention_recompute,
        })
    }
}

/// The forward half of a training step: the mean loss (f32 scalar), and what the backward
/// needs. On CUDA with the fused kernels this is the hand-written step of
/// `fused::cuda::step` (no autograd graph); elsewhere the composed graph and candle's autograd.
pub struct StepForward {
    pub loss: Tensor,
    tape: StepTape,
}

enum StepTape {
    Autograd,
    #[cfg(feature = "cuda")]
    Cuda(Box<super::fused::cuda::step::Tape>),
}

impl StepForward {
    /// Gradients of the loss for every parameter (f32), keyed by the parameters' tensors.
    pub fn backward(self, model: &Qwen3) -> Result<candle_core::backprop::GradStore> {
        let _ = model;
        match self.tape {
            StepTape::Autograd => self.loss.backward(),
            #[cfg(feature = "cuda")]
            StepTape::Cuda(tape) => super::fused::cuda::step::backward(model, *tape),
        }
    }
}

impl Qwen3 {
    /// Which training step `train_forward` takes: "cuda-step" (hand-written, CUDA with the
    /// fused kernels) or "autograd".
    pub fn trainer(&self) -> &'static str {
        if cfg!(feature = "cuda") && self.is_fused() && self.device.is_cuda() {
            "cuda-step"
        } else {
            "autograd"
        }
    }

    /// Forward pass and loss of a training batch: ids and targets (B, L).
    pub fn train_forward(&self, ids: &Tensor, targets: &Tensor) -> Result<StepForward> {
        #[cfg(feature = "cuda")]
        if self.is_fused() && self.device.is_cuda() {
            let (loss, tape) = super::fused::cuda::step::forward(self, ids, targets)?;
            return Ok(StepForward {
                loss,
                tape: StepTape::Cuda(Box::new(tape)),
            });
        }
        let loss = self.loss(&self.forward(ids)?, targets)?;
        Ok(StepForward {
            loss,
            tape: StepTape::Autograd,
        })
    }
}

/// Mean token cross-entropy in f32: logits (B, L, V), targets (B, L) -> scalar. One fused
/// kernel on CUDA (see `Qwen3::loss`); this composed version runs elsewhere.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    cross_entropy_with(logits, targets, false)
}

/// As `cross_entropy`, with the fused CUDA kernel when `fused`.
pub fn cross_entropy_with(logits: &Tensor, targets: &Tensor, fused: bool) -> Result<Tensor> {
    let v = logits.dim(D::Minus1)?;
    let logits = logits.reshape(((), v))?;
    let targets = targets.flatten_all()?;
    if let Some(loss) = super::fused::cross_entropy(&logits, &targets, fused)? {
        return Ok(loss);
    }
    candle_nn::loss::cross_entropy(&logits.to_dtype(DType::F32)?, &targets)
}
