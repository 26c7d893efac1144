//! The fused CUDA kernels agree with the composed candle ops they replace, in values and
//! gradients. CUDA builds only (`cargo test --features cuda --test fused` on a GPU machine);
//! the CPU build has no fused kernels to compare.
#![cfg(feature = "cuda")]

mod common;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::optim::{Optimizer, ParamsAdamW};
use common::rel_err;
use ternlab::model::fused::ternary_weight;
use ternlab::optim::AdamW;

fn gpu() -> Device {
    Device::new_cuda(0).expect("the fused tests need a CUDA device")
}

#[test]
fn ternary_projection_matches_the_composed_one() {
    let dev = gpu();
    for (rows, cols, group) in [(64, 256, 128), (96, 384, 32), (8, 3072, 3072)] {
        let w = Var::from_tensor(&Tensor::randn(0f32, 0.05, (rows, cols), &dev).unwrap()).unwrap();
        for dtype in [DType::F32, DType::BF16] {
            let fused = ternary_weight(w.as_tensor(), group, dtype, true).unwrap();
            let composed = ternary_weight(w.as_tensor(), group, dtype, false).unwrap();
            assert_eq!(fused.dtype(), dtype);
            let (f, c) = (
                fused.to_dtype(DType::F32).unwrap(),
                composed.to_dtype(DType::F32).unwrap(),
            );
            let err = rel_err(&f, &c);
            assert!(
                err < 1e-6,
                "{rows}x{cols} g{group} {dtype:?}: values differ by {err:e}"
            );
            // The gradient reaching the latent is the straight-through identity in both.
            let up = Tensor::randn(0f32, 1.0, (rows, cols), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let gf = (fused * &up)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let gc = (composed * &up)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let (gf, gc) = (gf.get(&w).unwrap(), gc.get(&w).unwrap());
            assert_eq!(gf.dtype(), DType::F32);
            let err = rel_err(gf, gc);
            assert!(
                err < 1e-6,
                "{rows}x{cols} g{group} {dtype:?}: gradients differ by {err:e}"
            );
        }
    }
}

#[test]
fn fused_adamw_matches_candles() {
    let dev = gpu();
    let params = ParamsAdamW {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    let init = Tensor::randn(0f32, 1.0, (33, 65), &dev).unwrap();
    let (a, b) = (
        Var::from_tensor(&init).unwrap(),
        Var::from_tensor(&init).unwrap(),
    );
    let mut fused = AdamW::new(vec![a.clone()], params.clone(), true).unwrap();
    assert!(matches!(fused, AdamW::Fused(_)));
    let mut composed = candle_nn::AdamW::new(vec![b.clone()], params).unwrap();
    for step in 0..5 {
        let target = Tensor::randn(0f32, 1.0, (33, 65), &dev).unwrap();
        let loss_a = (a.as_tensor() - &target)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap();
        let loss_b = (b.as_tensor() - &target)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap();
        fused.set_learning_rate(1e-2 / (step + 1) as f64);
        composed.set_learning_rate(1e-2 / (step + 1) as f64);
        fused.step(&loss_a.backward().unwrap()).unwrap();
        composed.step(&loss_b.backward().unwrap()).unwrap();
        let err = rel_err(a.as_tensor(), b.as_tensor());
        assert!(err < 1e-6, "step {step}: fused AdamW differs by {err:e}");
    }
    assert!(rel_err(a.as_tensor(), &init) > 1e-3, "the parameter moved");
}
