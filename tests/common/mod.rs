//! Shared test harness: the parity fixture (made by scripts/make_parity_fixture.py with
//! torch 2.11 / transformers 5.17, see tests/fixtures/parity/tokens.json) and small helpers.
#![allow(dead_code)]

pub mod cli;
pub mod hub_server;

use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::PathBuf;
use ternlab::model::load::{read_weights, resolve_checkpoint};
use ternlab::model::{Params, Projection, Qwen3, Qwen3Config, TernarySpec, Weights};

pub fn fixture_dir() -> PathBuf {
    repo_root().join("tests/fixtures/parity")
}

#[derive(serde::Deserialize)]
pub struct FixtureMeta {
    pub group_size: usize,
    pub seq_len: usize,
    pub batch_size: usize,
    pub steps: usize,
    pub lr: f64,
    pub warmup_steps: usize,
    pub min_lr_ratio: f64,
    pub betas: [f64; 2],
    pub eps: f64,
    pub weight_decay: f64,
    pub projections: Vec<Projection>,
    pub n_ternary_layers: usize,
    pub tokens: Vec<u32>,
    pub losses: Vec<f64>,
    pub lrs: Vec<f64>,
}

pub fn fixture_meta() -> FixtureMeta {
    let text = std::fs::read_to_string(fixture_dir().join("tokens.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

pub fn fixture_tensors() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture_dir().join("tensors.safetensors"), &Device::Cpu).unwrap()
}

pub fn fixture_config() -> Qwen3Config {
    Qwen3Config::from_hf_json(&fixture_dir().join("model/config.json")).unwrap()
}

/// The fixture's weights through the real loading code (a local model directory).
pub fn fixture_weights() -> Weights {
    let files = resolve_checkpoint(fixture_dir().join("model").to_str().unwrap(), "main").unwrap();
    read_weights(&files).unwrap()
}

/// The device of the model tests: the CPU, or `TERNLAB_TEST_DEVICE=cuda` on a CUDA build.
pub fn test_device() -> Device {
    match std::env::var("TERNLAB_TEST_DEVICE").as_deref() {
        // (as ternlab's runs open it)
        Ok("cuda") => {
            ternlab::device::open(ternlab::device::DeviceChoice::Cuda(Some(0)))
                .expect("TERNLAB_TEST_DEVICE=cuda needs a CUDA build and GPU")
                .0
        }
        Ok("cpu") | Err(_) => Device::Cpu,
        Ok(other) => panic!("TERNLAB_TEST_DEVICE={other:?}: expected cpu or cuda"),
    }
}

pub fn fixture_model(projections: &[Projection], group_size: usize) -> (Qwen3, Params) {
    let ternary = TernarySpec::new(
        projections.to_vec(),
        ternlab::spec::GroupSize::Columns(group_size),
    );
    let (model, params) = Qwen3::new(
        &fixture_config(),
        fixture_weights(),
        &ternary,
        &test_device(),
    )
    .unwrap();
    // Every fused kernel on: they run where the device is CUDA; elsewhere the composed ops do.
    (model.with_fused(true), params)
}

/// max |t| (as f32 arithmetic, whatever t's dtype).
pub fn max_abs(t: &Tensor) -> f64 {
    let t = t.to_dtype(candle_core::DType::F32).unwrap();
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64
}

/// The largest entry-wise relative error of `a` against the reference `b`:
/// max_i |a_i - b_i| / max(|b_i|, 1e-3 max|b|). Unlike dividing by the largest entry, an error
/// in a small entry shows; the floor keeps entries near zero from dominating.
pub fn elementwise_err(a: &Tensor, b: &Tensor) -> f64 {
    let f = |t: &Tensor| {
        t.to_device(&Device::Cpu)
            .unwrap()
            .to_dtype(candle_core::DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    let (a, b) = (f(a), f(b));
    assert_eq!(a.len(), b.len());
    let floor = 1e-3 * b.iter().fold(0f32, |m, x| m.max(x.abs())) as f64;
    a.iter()
        .zip(&b)
        .map(|(x, y)| (*x as f64 - *y as f64).abs() / (y.abs() as f64).max(floor).max(1e-30))
        .fold(0f64, f64::max)
}

/// max |a - b| / max |b|: the relative error of `a` against the reference `b`.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let f32 = candle_core::DType::F32;
    let a = &a.to_dtype(f32).unwrap();
    let b = &b.to_device(a.device()).unwrap().to_dtype(f32).unwrap();
    max_abs(&(a - b).unwrap()) / max_abs(b).max(1e-30)
}

/// Every parameter has a finite, non-zero gradient in `grads`.
pub fn assert_every_gradient_nonzero(params: &Params, grads: &candle_core::backprop::GradStore) {
    assert!(params.named.len() > 10);
    for (name, var) in &params.named {
        let g = grads
            .get(var)
            .unwrap_or_else(|| panic!("{name} has no gradient"));
        // f32 from the hand-written CUDA step; the parameter's own dtype from autograd.
        assert!(
            g.dtype() == candle_core::DType::F32 || g.dtype() == var.dtype(),
            "{name}: gradient dtype {:?} for a {:?} parameter",
            g.dtype(),
            var.dtype()
        );
        let norm = g
            .to_dtype(candle_core::DType::F32)
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            norm > 0.0 && norm.is_finite(),
            "{name}: gradient |g|_1 = {norm}"
        );
    }
}

/// Path of the built `ternlab` binary (for CLI tests): `TERNLAB_BIN`, else where cargo built
/// it. A test binary carried to another machine (the GPU checks of bench/device_run.sh) is
/// told where the binary went.
pub fn ternlab_bin() -> PathBuf {
    std::env::var_os("TERNLAB_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_ternlab")))
}

/// The repository's root, where the fixtures and the bundled data are: `TERNLAB_REPO`, else
/// the folder the tests were built from.
pub fn repo_root() -> PathBuf {
    std::env::var_os("TERNLAB_REPO")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}
