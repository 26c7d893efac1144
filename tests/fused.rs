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

#[test]
fn rms_norm_matches_the_composed_one() {
    use ternlab::model::fused::rms_norm;
    use ternlab::model::qwen3::rms_norm_composed;
    let dev = gpu();
    // q/k norms (head dim 128 over many rows) and layer norms (hidden 1024).
    for (rows, d) in [(4 * 256 * 16, 128), (4 * 256, 1024), (3, 40)] {
        for dtype in [DType::F32, DType::BF16] {
            let x = Var::from_tensor(
                &Tensor::randn(0f32, 2.0, (rows, d), &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap(),
            )
            .unwrap();
            let w = Var::from_tensor(&(Tensor::randn(0f32, 0.3, d, &dev).unwrap() + 1.0).unwrap())
                .unwrap();
            let fused = rms_norm(x.as_tensor(), w.as_tensor(), 1e-6, true)
                .unwrap()
                .unwrap();
            let composed = rms_norm_composed(x.as_tensor(), w.as_tensor(), 1e-6).unwrap();
            assert_eq!(fused.dtype(), dtype);
            let tol = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
            let f32_of = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
            let err = rel_err(&f32_of(&fused), &f32_of(&composed));
            assert!(err < tol, "{rows}x{d} {dtype:?}: values differ by {err:e}");
            let up = Tensor::randn(0f32, 1.0, (rows, d), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let gf = (fused * &up)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .sum_all()
                .unwrap();
            let gc = (composed * &up)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .sum_all()
                .unwrap();
            let (gf, gc) = (gf.backward().unwrap(), gc.backward().unwrap());
            for (name, v) in [("x", &x), ("w", &w)] {
                let err = rel_err(&f32_of(gf.get(v).unwrap()), &f32_of(gc.get(v).unwrap()));
                assert!(
                    err < tol * 10.0,
                    "{rows}x{d} {dtype:?}: d{name} differs by {err:e}"
                );
            }
        }
    }
}

#[test]
fn rope_matches_the_composed_one() {
    use ternlab::model::qwen3::Rope;
    use ternlab::model::Qwen3Config;
    let dev = gpu();
    let cfg = Qwen3Config::preset("qwen3-0.6b", 151_936).unwrap();
    let (b, n, l, d) = (2, 3, 17, cfg.head_dim);
    let rope = Rope::new(&cfg, l, &dev).unwrap();
    for dtype in [DType::F32, DType::BF16] {
        let x = Var::from_tensor(
            &Tensor::randn(0f32, 1.0, (b, n, l, d), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap(),
        )
        .unwrap();
        let fused = rope.apply(x.as_tensor(), true).unwrap();
        let composed = rope.apply(x.as_tensor(), false).unwrap();
        let f32_of = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let tol = if dtype == DType::F32 { 1e-6 } else { 1e-2 };
        let err = rel_err(&f32_of(&fused), &f32_of(&composed));
        assert!(err < tol, "{dtype:?}: values differ by {err:e}");
        let up = Tensor::randn(0f32, 1.0, (b, n, l, d), &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let gf = (fused * &up)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .sum_all()
            .unwrap();
        let gc = (composed * &up)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .sum_all()
            .unwrap();
        let (gf, gc) = (gf.backward().unwrap(), gc.backward().unwrap());
        let err = rel_err(&f32_of(gf.get(&x).unwrap()), &f32_of(gc.get(&x).unwrap()));
        assert!(err < tol, "{dtype:?}: gradients differ by {err:e}");
    }
}

#[test]
fn causal_softmax_matches_the_composed_one() {
    use ternlab::model::qwen3::{attention_probs, causal_mask};
    let dev = gpu();
    for l in [1, 7, 64, 300] {
        let mask = causal_mask(l, &dev).unwrap();
        for dtype in [DType::F32, DType::BF16] {
            let x = Var::from_tensor(
                &Tensor::randn(0f32, 3.0, (2, 4, l, l), &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap(),
            )
            .unwrap();
            let scale = 0.125;
            let fused = attention_probs(x.as_tensor(), scale, &mask, true).unwrap();
            let composed = attention_probs(x.as_tensor(), scale, &mask, false).unwrap();
            assert_eq!(fused.dtype(), dtype);
            let f32_of = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
            let tol = if dtype == DType::F32 { 1e-5 } else { 2e-2 };
            let err = rel_err(&f32_of(&fused), &f32_of(&composed));
            assert!(err < tol, "L={l} {dtype:?}: values differ by {err:e}");
            let up = Tensor::randn(0f32, 1.0, (2, 4, l, l), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let gf = (fused * &up)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .sum_all()
                .unwrap();
            let gc = (composed * &up)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .sum_all()
                .unwrap();
            let (gf, gc) = (gf.backward().unwrap(), gc.backward().unwrap());
            let err = rel_err(&f32_of(gf.get(&x).unwrap()), &f32_of(gc.get(&x).unwrap()));
            assert!(
                err < tol * 5.0,
                "L={l} {dtype:?}: gradients differ by {err:e}"
            );
        }
    }
}

#[test]
fn silu_gate_matches_the_composed_one() {
    use ternlab::model::fused::silu_mul;
    let dev = gpu();
    for dtype in [DType::F32, DType::BF16] {
        let g = Var::from_tensor(
            &Tensor::randn(0f32, 2.0, (5, 300), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap(),
        )
        .unwrap();
        let u = Var::from_tensor(
            &Tensor::randn(0f32, 1.0, (5, 300), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap(),
        )
        .unwrap();
        let fused = silu_mul(g.as_tensor(), u.as_tensor(), true)
            .unwrap()
            .unwrap();
        let composed = (g.as_tensor().silu().unwrap() * u.as_tensor()).unwrap();
        let f32_of = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let tol = if dtype == DType::F32 { 1e-5 } else { 2e-2 };
        let err = rel_err(&f32_of(&fused), &f32_of(&composed));
        assert!(err < tol, "{dtype:?}: values differ by {err:e}");
        let up = Tensor::randn(0f32, 1.0, (5, 300), &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let gf = (fused * &up)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .sum_all()
            .unwrap();
        let gc = (composed * &up)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .sum_all()
            .unwrap();
        let (gf, gc) = (gf.backward().unwrap(), gc.backward().unwrap());
        for (name, v) in [("gate", &g), ("up", &u)] {
            let err = rel_err(&f32_of(gf.get(v).unwrap()), &f32_of(gc.get(v).unwrap()));
            assert!(err < tol, "{dtype:?}: d{name} differs by {err:e}");
        }
    }
}

#[test]
fn cross_entropy_matches_the_composed_one() {
    use ternlab::model::qwen3::cross_entropy_with;
    let dev = gpu();
    // A Qwen3-sized vocabulary, and a small one.
    for v in [151_936usize, 37] {
        for dtype in [DType::F32, DType::BF16] {
            let x = Var::from_tensor(
                &Tensor::randn(0f32, 3.0, (2, 9, v), &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap(),
            )
            .unwrap();
            let t: Vec<u32> = (0..18u32).map(|i| (i * 7919) % v as u32).collect();
            let t = Tensor::from_vec(t, (2, 9), &dev).unwrap();
            let fused = cross_entropy_with(x.as_tensor(), &t, true).unwrap();
            let composed = cross_entropy_with(x.as_tensor(), &t, false).unwrap();
            let (f, c) = (
                fused.to_scalar::<f32>().unwrap(),
                composed.to_scalar::<f32>().unwrap(),
            );
            assert!(
                (f - c).abs() < 1e-4 * c.abs(),
                "V={v} {dtype:?}: loss {f} vs {c}"
            );
            let (gf, gc) = (fused.backward().unwrap(), composed.backward().unwrap());
            let f32_of = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
            let err = rel_err(&f32_of(gf.get(&x).unwrap()), &f32_of(gc.get(&x).unwrap()));
            let tol = if dtype == DType::F32 { 1e-5 } else { 2e-2 };
            assert!(err < tol, "V={v} {dtype:?}: gradients differ by {err:e}");
        }
    }
}
