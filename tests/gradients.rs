//! Gradient flow: every trainable parameter gets a non-zero gradient (candle's fused norm /
//! rope / softmax kernels would silently give the decoder none), and the straight-through
//! estimator hands each latent weight exactly the gradient of a dense layer at W_t.

mod common;

use candle_core::{Device, Tensor};
use common::*;
use ternlab::choice::Choice;
use ternlab::data::{Batcher, Sampling};
use ternlab::model::load::random_weights;
use ternlab::model::ternary::{check_ternary, ternarize};
use ternlab::model::{cross_entropy, Preset, Projection, Qwen3, Qwen3Config, TernarySpec};
use ternlab::quant::Quant;
use ternlab::trainer::Trainer;

fn all_projections() -> Vec<Projection> {
    Projection::ALL.to_vec()
}

#[test]
fn every_parameter_receives_a_nonzero_gradient() {
    // The tiny preset with random init (norm weights 1, as a fresh model) and the parity
    // fixture (perturbed norms), all projections ternary.
    let tiny = Qwen3Config::preset(Preset::Tiny, 512);
    let ternary = TernarySpec::new(all_projections(), ternlab::spec::GroupSize::Columns(32));
    let models = [
        Qwen3::new(
            &tiny,
            random_weights(&tiny, 7).unwrap(),
            &ternary,
            &test_device(),
        )
        .unwrap(),
        fixture_model(&all_projections(), 32),
    ];
    for (model, params) in models {
        let v = model.cfg.vocab_size as u32;
        let tokens: Vec<u32> = (0..200u32).map(|i| (i * 37 + 11) % v).collect();
        let mut b = Batcher::new(&tokens, 16, 2, Sampling::Sequential, 0).unwrap();
        let (x, y) = b.next_batch(&test_device()).unwrap();
        let grads = Trainer::for_model(&model)
            .forward(&model, &x, &y)
            .unwrap()
            .backward(&model)
            .unwrap();
        assert_every_gradient_nonzero(&params, &grads);
    }
}

#[test]
fn ste_gradient_equals_dense_gradient_at_the_ternary_weight() {
    let m = fixture_meta();
    let projections = all_projections();
    let (ste_model, ste_params) = fixture_model(&projections, 32);

    // The same model made dense, each projection's weight replaced by its W_t.
    let mut weights = fixture_weights();
    let ternary_names: Vec<String> = ste_model
        .ternary_linears()
        .iter()
        .map(|l| l.name().to_string())
        .collect();
    assert_eq!(ternary_names.len(), 14);
    for name in &ternary_names {
        let wt = ternarize(&weights[name].clone(), Quant::absmean(32)).unwrap();
        weights.insert(name.clone(), wt);
    }
    let dense = TernarySpec::new(vec![], ternlab::spec::GroupSize::Columns(32));
    let (dense_model, dense_params) =
        Qwen3::new(&fixture_config(), weights, &dense, &test_device()).unwrap();

    let mut b = Batcher::new(&m.tokens, m.seq_len, m.batch_size, Sampling::Sequential, 0).unwrap();
    let (x, y) = b.next_batch(&test_device()).unwrap();
    let grads = |model: &Qwen3| {
        Trainer::for_model(model)
            .forward(model, &x, &y)
            .unwrap()
            .backward(model)
            .unwrap()
    };
    let (g_ste, g_dense) = (grads(&ste_model), grads(&dense_model));
    for ((name, v_ste), (_, v_dense)) in ste_params.named.iter().zip(&dense_params.named) {
        let a = g_ste.get(v_ste).unwrap();
        let b = g_dense.get(v_dense).unwrap();
        let err = rel_err(a, b);
        assert!(
            err < 1e-5,
            "{name}: STE vs dense-at-W_t gradient, relative error {err:e}"
        );
    }
}

#[test]
fn ternarize_by_hand() {
    // One group of 4: s = (0.1 + 0.5 + 0.9 + 0) / 4 = 0.375; W / s = (0.27, -1.33, 2.4, 0)
    // -> (0, -1, 1, 0) -> W_t = (0, -0.375, 0.375, 0). Second group all zero: stays zero.
    let w = Tensor::new(
        &[[0.1f32, -0.5, 0.9, 0.0, 0.0, 0.0, 0.0, 0.0]],
        &Device::Cpu,
    )
    .unwrap();
    let wt = ternarize(&w, Quant::absmean(4))
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let want = [0.0f32, -0.375, 0.375, 0.0, 0.0, 0.0, 0.0, 0.0];
    for (a, b) in wt[0].iter().zip(want) {
        assert!((a - b).abs() < 1e-7, "{:?} vs {want:?}", wt[0]);
    }
    // Ties round to even as in PyTorch / MLX: W / s = (0.5, 1.5, -0.5, -1.5) with s = 1
    // becomes (0, 1, 0, -1), not (1, 1, -1, -1).
    let w = Tensor::new(&[[0.5f32, 1.5, -0.5, -1.5]], &Device::Cpu).unwrap();
    let wt = ternarize(&w, Quant::absmean(4))
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    assert_eq!(wt[0], vec![0.0, 1.0, 0.0, -1.0]);
}

#[test]
fn verification_passes_on_latent_weights() {
    let w = Tensor::randn(0f32, 1.0, (64, 256), &Device::Cpu).unwrap();
    let c = check_ternary(&w, Quant::absmean(128)).unwrap();
    assert_eq!(c.total, 64 * 256);
    assert_eq!(c.bad, 0);
    assert!(c.max_err < 1e-4, "max error {}", c.max_err);
}

#[test]
fn bf16_compute_keeps_f32_parameters_and_every_gradient() {
    let m = fixture_meta();
    let (f32_model, _) = fixture_model(&all_projections(), 32);
    let (model, params) = fixture_model(&all_projections(), 32);
    let model = model.with_compute_dtype(candle_core::DType::BF16);
    let mut b = Batcher::new(&m.tokens, m.seq_len, m.batch_size, Sampling::Sequential, 0).unwrap();
    let (x, y) = b.next_batch(&test_device()).unwrap();
    let logits = model.forward(&x).unwrap();
    assert_eq!(logits.dtype(), candle_core::DType::BF16);
    // bf16 keeps 8 bits of mantissa: the logits agree with f32 to about 1e-2 relative.
    let reference = f32_model.forward(&x).unwrap();
    let err = rel_err(
        &logits.to_dtype(candle_core::DType::F32).unwrap(),
        &reference,
    );
    assert!(err < 3e-2, "bf16 vs f32 logits: relative error {err:e}");
    assert!(
        err > 1e-6,
        "bf16 logits equal f32 ones: was bf16 used at all?"
    );
    let grads = cross_entropy(&logits, &y).unwrap().backward().unwrap();
    for (name, var) in &params.named {
        assert_eq!(var.dtype(), candle_core::DType::F32, "{name} stays f32");
    }
    assert_every_gradient_nonzero(&params, &grads);
}
