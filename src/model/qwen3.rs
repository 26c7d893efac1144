//! Qwen3, the architecture (as candle-transformers' `models/qwen3.rs`): grouped-query attention
//! with q/k RMSNorm, RoPE, SwiGLU MLP and a tied (or untied) output head, built from a
//! checkpoint's tensors by `Qwen3::new` with the blocks of `super::layers`, and run by
//! `forward` with the ops its `Ops` names (`super::ops`). Every parameter is trainable, and
//! the chosen projections are ternary (f32 latents, `W_t` forward, STE backward). How a
//! training step runs (autograd or the hand-written CUDA step) is `crate::trainer`'s choice.
//!
//! Legend for shape notes: B batch, L sequence length, E hidden size, V vocabulary.
//! Weights are named as in the Hugging Face checkpoint (`model.layers.3.mlp.up_proj.weight`).

use super::config::Qwen3Config;
use super::layers::{DecoderLayer, KvCache, Linear, Pass, RmsNorm};
use super::ops::Ops;
use super::ternary::TernarySpec;
use super::weights::{Params, WeightSource, Weights};
use candle_core::{DType, Device, Result, Tensor};

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
    /// The ops `forward` runs (composed candle ops, or the fused CUDA kernels).
    pub(crate) ops: Ops,
    /// Steps of the quantization warm-up (`quant.lambda_warmup_steps`; 0: none), see `at_step`.
    pub(crate) lambda_warmup_steps: usize,
}

impl Qwen3 {
    /// Builds the model from checkpoint tensors (f32, bf16 or f16). The ternary layers' latent
    /// weights become f32; every other parameter keeps the dtype it has in `weights` (the
    /// seed's `train.dense_dtype = "checkpoint"`; the caller converts them beforehand for
    /// "f32"). Tied checkpoints carry no `lm_head.weight`; if one is present anyway it is
    /// ignored. The parameters come in the order embedding, each layer's (see
    /// `DecoderLayer::new`), final norm, then the untied head.
    pub fn new(
        cfg: &Qwen3Config,
        mut weights: Weights,
        ternary: &TernarySpec,
        device: &Device,
    ) -> Result<(Self, Params)> {
        let mut params = Params::default();
        let (e, v) = (cfg.hidden_size, cfg.vocab_size);
        let mut vb = WeightSource::new(&mut weights, &mut params, device, ternary);
        let mut vb_m = vb.pp("model");
        let embed_tokens = vb_m.pp("embed_tokens").param("weight", &[v, e], false)?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            layers.push(DecoderLayer::new(cfg, vb_m.layer(i))?);
        }
        let norm = RmsNorm::new(e, cfg.rms_norm_eps, vb_m.pp("norm"))?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(vb.pp("lm_head").param("weight", &[v, e], false)?)
        };
        let model = Self {
            cfg: cfg.clone(),
            embed_tokens,
            lm_head,
            layers,
            norm,
            device: device.clone(),
            compute_dtype: DType::F32,
            ops: Ops::Composed,
            lambda_warmup_steps: ternary.lambda_warmup_steps,
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

    /// How far the ternary projections are quantized at training step `step` (0-based): the
    /// linear warm-up `lambda = min(step / N, 1)` of `quant.lambda_warmup_steps = N` (Hugging
    /// Face's 1.58-bit fine-tuning), 1 without one.
    pub fn quant_lambda(&self, step: usize) -> f32 {
        match self.lambda_warmup_steps {
            0 => 1.0,
            n => (step as f32 / n as f32).min(1.0),
        }
    }

    /// The model as training step `step` runs it: every ternary projection forwards
    /// `W + lambda * (W_t - W)` with `lambda = quant_lambda(step)` (the same parameters; a
    /// cheap copy).
    pub fn at_step(&self, step: usize) -> Self {
        self.with_quant_lambda(self.quant_lambda(step))
    }

    /// The model with every ternary projection at `lambda` (0: the dense weight, 1: `W_t`).
    pub fn with_quant_lambda(&self, lambda: f32) -> Self {
        let mut m = self.clone();
        for layer in &mut m.layers {
            for lin in layer.linears_mut() {
                lin.lambda = lambda;
            }
        }
        m
    }

    /// Runs `forward` with `ops` (default `Ops::Composed`).
    pub fn with_ops(mut self, ops: Ops) -> Self {
        self.ops = ops;
        self
    }

    /// The ops `forward` runs.
    pub fn ops(&self) -> Ops {
        self.ops
    }

    /// Uses the fused CUDA kernels (on a CUDA device; elsewhere the composed ops run anyway):
    /// `with_ops(Ops::Fused)` when `on`, else `with_ops(Ops::Composed)`.
    pub fn with_fused(self, on: bool) -> Self {
        self.with_ops(if on { Ops::Fused } else { Ops::Composed })
    }

    /// Runs activations and matmuls in `dtype` (F32 or BF16); parameters, the ternary
    /// projection, norms, softmax and the loss stay f32.
    pub fn with_compute_dtype(mut self, dtype: DType) -> Self {
        self.compute_dtype = dtype;
        self
    }

    /// Token ids (B, L) -> logits (B, L, V).
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, l) = ids.dims2()?;
        let pass = Pass::new(
            &self.cfg,
            (b, l),
            &self.device,
            self.compute_dtype,
            self.ops,
        )?;
        self.forward_pass(ids, &pass, None)
    }

    /// The logits (B, L, V) of `ids` (B, L) following the positions in `cache`, which gains
    /// theirs (generation: the prompt once, then one token at a time).
    pub fn forward_cached(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let (b, l) = ids.dims2()?;
        let offset = cache.len();
        let pass = Pass::at(
            &self.cfg,
            (b, l),
            offset,
            &self.device,
            self.compute_dtype,
            self.ops,
        )?;
        cache.layers.resize(self.layers.len(), None);
        self.forward_pass(ids, &pass, Some(cache))
    }

    /// `forward_cached` with a pass of its own (`Pass::rows`: each sequence at its own
    /// positions, with its own mask): logits (B, L, V).
    pub fn forward_pass_cached(
        &self,
        ids: &Tensor,
        pass: &Pass,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        cache.layers.resize(self.layers.len(), None);
        self.forward_pass(ids, pass, Some(cache))
    }

    fn forward_pass(
        &self,
        ids: &Tensor,
        pass: &Pass,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let (b, l) = ids.dims2()?;
        // (B*L, E) from here to the head. Under f32 compute a bf16 embedding's rows enter the
        // first layer as they are, as in the seed (MLX); see `DecoderLayer::forward`.
        let rows = self.embed_tokens.index_select(&ids.flatten_all()?, 0)?;
        let mut x = if self.compute_dtype == DType::F32 {
            rows
        } else {
            rows.to_dtype(self.compute_dtype)?
        };
        for (i, layer) in self.layers.iter().enumerate() {
            let slot = cache.as_mut().map(|c| &mut c.layers[i]);
            x = layer.forward_with(&x, pass, slot)?;
        }
        let x = self.norm.forward(&x, pass.ops)?;
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

    /// `linears`, to change.
    pub(crate) fn linears_mut(&mut self) -> Vec<&mut Linear> {
        self.layers
            .iter_mut()
            .flat_map(|l| l.linears_mut())
            .collect()
    }

    pub fn ternary_linears(&self) -> Vec<&Linear> {
        self.linears()
            .into_iter()
            .filter(|l| l.is_ternary())
            .collect()
    }

    /// A detached copy of the model in full precision: every projection multiplies by its
    /// latent weight as it is, no ternary projection, no activation quantization (the
    /// starting model a ternary run is measured against).
    pub fn frozen_dense(&self) -> Result<Self> {
        let mut m = self.with_quant_lambda(0.0).frozen()?;
        for layer in &mut m.layers {
            for lin in layer.linears_mut() {
                lin.act_quant = false;
            }
        }
        Ok(m)
    }

    /// The distillation teacher: the starting model in full precision (`frozen_dense`), every
    /// tensor copied so that training does not move it, in bf16 computing in bf16 on a GPU (as
    /// it is on the CPU otherwise).
    pub fn teacher(&self) -> Result<Self> {
        let mut m = self.frozen_dense()?;
        let on_gpu = self.device.is_cuda();
        let own = |t: &mut Tensor| -> Result<()> {
            *t = if on_gpu {
                t.to_dtype(DType::BF16)?.copy()?
            } else {
                t.copy()?
            };
            Ok(())
        };
        own(&mut m.embed_tokens)?;
        if let Some(h) = &mut m.lm_head {
            own(h)?;
        }
        own(&mut m.norm.weight)?;
        for layer in &mut m.layers {
            own(&mut layer.input_layernorm.weight)?;
            own(&mut layer.post_attention_layernorm.weight)?;
            own(&mut layer.self_attn.q_norm.weight)?;
            own(&mut layer.self_attn.k_norm.weight)?;
            for lin in layer.linears_mut() {
                own(&mut lin.weight)?;
            }
        }
        if on_gpu {
            m.compute_dtype = DType::BF16;
        }
        Ok(m)
    }

    /// A detached copy for evaluation: ternary layers hold `W_t` as a constant, so a forward
    /// pass neither ternarizes again nor records anything for backprop.
    pub fn frozen(&self) -> Result<Self> {
        let layers = self
            .layers
            .iter()
            .map(DecoderLayer::frozen)
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cfg: self.cfg.clone(),
            embed_tokens: self.embed_tokens.detach(),
            lm_head: self.lm_head.as_ref().map(|t| t.detach()),
            layers,
            norm: self.norm.frozen(),
            device: self.device.clone(),
            compute_dtype: self.compute_dtype,
            ops: self.ops,
            lambda_warmup_steps: self.lambda_warmup_steps,
        })
    }
}
