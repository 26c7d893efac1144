//! Where the blocks' weights come from: the checkpoint's tensors (`Weights`), the trainable
//! parameters they become (`Params`), and `WeightSource`, which plays candle's `VarBuilder`
//! role for the blocks' constructors (a name prefix, `pp`, and tensors taken by name).

use super::config::Projection;
use super::ternary::{Quant, TernarySpec};
use candle_core::{DType, Device, Result, Tensor, Var};
use std::collections::HashMap;

/// Source of initial weights: a checkpoint's tensors by name.
pub type Weights = HashMap<String, Tensor>;

/// The trainable parameters, by checkpoint name, in a stable order.
#[derive(Default)]
pub struct Params {
    pub named: Vec<(String, Var)>,
    /// Learning-rate multipliers by name (1 where absent): `quant.scale_lr` of learned scales.
    pub lr_multipliers: HashMap<String, f64>,
}

impl Params {
    pub fn vars(&self) -> Vec<Var> {
        self.named.iter().map(|(_, v)| v.clone()).collect()
    }

    pub fn get(&self, name: &str) -> Option<&Var> {
        self.named.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    /// The learning-rate multiplier of the parameter `name` (1 unless one was set).
    pub fn lr_multiplier(&self, name: &str) -> f64 {
        self.lr_multipliers.get(name).copied().unwrap_or(1.0)
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

/// The weights of one block, under a name prefix (`model.layers.3.self_attn`), as candle's
/// `VarBuilder`: takes each tensor from the checkpoint by name, checks its shape, and
/// registers it as a trainable parameter. Ternary latents (the projections `TernarySpec`
/// names) become f32; every other parameter keeps its dtype in the checkpoint.
pub struct WeightSource<'a> {
    weights: &'a mut Weights,
    params: &'a mut Params,
    device: &'a Device,
    ternary: &'a TernarySpec,
    prefix: String,
    /// The decoder layer this block belongs to (`quant.exclude_layers`).
    layer: Option<usize>,
}

impl<'a> WeightSource<'a> {
    pub fn new(
        weights: &'a mut Weights,
        params: &'a mut Params,
        device: &'a Device,
        ternary: &'a TernarySpec,
    ) -> Self {
        Self {
            weights,
            params,
            device,
            ternary,
            prefix: String::new(),
            layer: None,
        }
    }

    /// The source of the block `name` under this one (`VarBuilder::pp`).
    pub fn pp(&mut self, name: impl std::fmt::Display) -> WeightSource<'_> {
        WeightSource {
            prefix: self.path(name),
            weights: self.weights,
            params: self.params,
            device: self.device,
            ternary: self.ternary,
            layer: self.layer,
        }
    }

    /// The source of decoder layer `i` under this one (`layers.{i}`).
    pub fn layer(&mut self, i: usize) -> WeightSource<'_> {
        let mut vb = self.pp(format!("layers.{i}"));
        vb.layer = Some(i);
        vb
    }

    /// The full checkpoint name of `name` under this prefix.
    pub fn path(&self, name: impl std::fmt::Display) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// `quant.activation_bits` (0 or 8).
    pub fn activation_bits(&self) -> u32 {
        self.ternary.activation_bits
    }

    /// How `projection`, shape (out, in), of this block's layer is quantized, if it is.
    pub fn quant(&self, projection: Projection, shape: (usize, usize)) -> Option<Quant> {
        self.ternary.quant_for(self.layer?, projection, shape)
    }

    /// The checkpoint tensor `name` (under this prefix), which must have `shape`, as a
    /// trainable parameter on the device: f32 when `f32` (the ternary latents), else in the
    /// checkpoint's own dtype.
    pub fn param(&mut self, name: &str, shape: &[usize], f32: bool) -> Result<Tensor> {
        let name = self.path(name);
        let t = self
            .weights
            .remove(&name)
            .ok_or_else(|| candle_core::Error::Msg(format!("checkpoint has no tensor {name}")))?;
        if t.dims() != shape {
            candle_core::bail!(
                "checkpoint tensor {name} has shape {:?}, the config implies {shape:?}",
                t.dims()
            );
        }
        let dtype = if f32 { DType::F32 } else { t.dtype() };
        // (widened on the device: half the bytes to copy, and no pass over them on the host)
        let t = t.to_device(self.device)?.to_dtype(dtype)?;
        self.params.add(name, t)
    }

    /// Registers `init` as the new trainable parameter `name` (under this prefix) in f32 on
    /// the device, trained at `lr_multiplier` times the learning rate (a learned scale, which
    /// no checkpoint holds).
    pub fn new_param(&mut self, name: &str, init: &Tensor, lr_multiplier: f64) -> Result<Tensor> {
        let name = self.path(name);
        let t = init.to_dtype(DType::F32)?.to_device(self.device)?;
        if lr_multiplier != 1.0 {
            self.params
                .lr_multipliers
                .insert(name.clone(), lr_multiplier);
        }
        self.params.add(name, t)
    }

    /// The learning-rate multiplier of learned scales (`quant.scale_lr`).
    pub fn scale_lr(&self) -> f64 {
        self.ternary.scale_lr
    }

    /// How many parameters are registered so far (see `matrices_first`).
    pub(crate) fn registered(&self) -> usize {
        self.params.named.len()
    }

    /// Reorders the parameters registered since `from` so that the matrices (the
    /// projections) come before the vectors (the norms), each kind in the order it was
    /// registered: a decoder layer's parameters are its seven projections, then its four norms.
    pub(crate) fn matrices_first(&mut self, from: usize) {
        self.params.named[from..].sort_by_key(|(_, v)| v.rank() != 2);
    }
}
