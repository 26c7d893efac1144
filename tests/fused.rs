//! The fused CUDA ops agree with the composed candle ops they replace, in values and
//! gradients (their backward runs the kernels the hand-written step trains with), and the
//! hand-written step agrees with autograd. CUDA builds only (`cargo test --features cuda
//! --test fused` on a GPU machine); the CPU build has no fused kernels to compare.
#![cfg(feature = "cuda")]

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::{max_abs, rel_err};
use ternlab::model::ops::{self, Ops};
use ternlab::model::Rope;
use ternlab::optim::{AdamW, AdamWParams};

/// The GPU as ternlab's runs open it (`ternlab::device::open`: no per-buffer CUDA events, so
/// the backward's side stream runs).
fn gpu() -> Device {
    let choice = ternlab::device::DeviceChoice::Cuda(Some(0));
    ternlab::device::open(choice)
        .expect("the fused tests need a CUDA device")
        .0
}

/// N(0, std) values (drawn in f32) in `dtype`.
fn randn(shape: impl Into<candle_core::Shape>, std: f32, dtype: DType, dev: &Device) -> Tensor {
    Tensor::randn(0f32, std, shape, dev)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// A trainable tensor of N(0, std) values in `dtype`.
fn var(shape: &[usize], std: f32, dtype: DType, dev: &Device) -> Var {
    Var::from_tensor(&randn(shape, std, dtype, dev)).unwrap()
}

/// AdamW at `lr` with betas (0.9, 0.95), eps 1e-8 and weight decay 0.1.
fn adamw_params(lr: f64, bias_correction: bool) -> AdamWParams {
    AdamWParams {
        lr,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        bias_correction,
    }
}

fn f32_of(t: &Tensor) -> Tensor {
    t.to_dtype(DType::F32).unwrap()
}

/// `fused` and `composed`, computed from `inputs`, agree within `tol` (relative): their values,
/// and the gradient reaching each input (of the output itself when it is a scalar, else of its
/// product with a random upstream gradient). `grad_tol` bounds the gradients.
fn assert_agree(
    what: &str,
    inputs: &[&Var],
    fused: Tensor,
    composed: Tensor,
    tol: f64,
    grad_tol: f64,
) {
    assert_eq!(fused.dtype(), composed.dtype(), "{what}: dtype");
    let err = rel_err(&f32_of(&fused), &f32_of(&composed));
    eprintln!("{what}: values {err:e} (bound {tol:e})");
    assert!(err < tol, "{what}: values differ by {err:e}");
    let to_loss = |t: Tensor, up: &Option<Tensor>| match up {
        None => t,
        Some(u) => (t * u)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .sum_all()
            .unwrap(),
    };
    let up = (fused.rank() > 0).then(|| {
        let u = Tensor::randn(0f32, 1.0, fused.shape(), fused.device()).unwrap();
        u.to_dtype(fused.dtype()).unwrap()
    });
    let gf = to_loss(fused, &up).backward().unwrap();
    let gc = to_loss(composed, &up).backward().unwrap();
    for (i, v) in inputs.iter().enumerate() {
        let (a, b) = (gf.get(v).unwrap(), gc.get(v).unwrap());
        assert_eq!(a.dtype(), v.dtype(), "{what}: gradient {i} dtype");
        let err = rel_err(&f32_of(a), &f32_of(b));
        eprintln!("{what}: gradient {i} {err:e} (bound {grad_tol:e})");
        assert!(
            err < grad_tol,
            "{what}: gradient of input {i} differs by {err:e}"
        );
    }
}

/// The bound for `dtype`: f32 arithmetic agrees to float noise, bf16 rounds outputs to 8 bits of
/// mantissa.
fn tol(dtype: DType, f32_tol: f64, bf16_tol: f64) -> f64 {
    if dtype == DType::F32 {
        f32_tol
    } else {
        bf16_tol
    }
}

/// Every quantizer: groups of columns (32, 64, 128, 256, 512: the 16-byte kernels), a row (a
/// warp a group), a whole matrix (the kernel's block path past 8192 weights), absmean and
/// absmax scales, scales rounded to f32, bf16 and f16.
#[test]
fn ternary_projection_matches_the_composed_one() {
    use ternlab::quant::{Quant, ScaleDtype, ScaleRule};
    let dev = gpu();
    for (rows, cols, group) in [
        (64, 256, 128),
        (96, 384, 32),
        (48, 320, 64),
        (40, 512, 256),
        (16, 1024, 512),
        (8, 3072, 3072),
        (96, 384, 96 * 384),
    ] {
        let w = var(&[rows, cols], 0.05, DType::F32, &dev);
        for scale in [ScaleRule::Absmean, ScaleRule::Absmax] {
            for scale_dtype in [ScaleDtype::F32, ScaleDtype::Bf16, ScaleDtype::F16] {
                let q = Quant {
                    group,
                    scale,
                    scale_dtype,
                };
                // Fully ternary, and a quantization warm-up's W + lambda (W_t - W).
                for (dtype, lambda) in [(DType::F32, 1.0), (DType::BF16, 1.0), (DType::F32, 0.3)] {
                    // The gradient reaching the latent is the straight-through identity in
                    // both. Values measured on an H100: up to 2.6e-7 (a scale's last bit, from
                    // the order of the sum).
                    let wt =
                        |o| ops::ternary_weight(w.as_tensor(), q, None, lambda, dtype, o).unwrap();
                    assert_agree(
                        &format!("{rows}x{cols} {q:?} {dtype:?} lambda {lambda}"),
                        &[&w],
                        wt(Ops::Fused),
                        wt(Ops::Composed),
                        1e-6,
                        1e-6,
                    );
                }
            }
        }
    }
}

/// The fused AdamW kernels give the composed optimizer's result on the CPU to the bit (every
/// operation in the same order, one rounding each): f32 and bf16 parameters, with and without
/// bias correction, with weight decay; a small tensor, and one of a million values (the bf16
/// update rounds with the card's conversion instruction, the CPU with integer arithmetic); f32
/// gradients and bf16 ones (what the hand-written step's bf16 products give a projection).
#[test]
fn fused_adamw_matches_the_composed_one_bit_for_bit() {
    let dev = gpu();
    for (dtype, shape, g_dtype) in [
        (DType::F32, (33, 65), DType::F32),
        (DType::F32, (33, 65), DType::BF16),
        (DType::F32, (1031, 1029), DType::BF16),
        (DType::BF16, (33, 65), DType::F32),
        (DType::BF16, (33, 65), DType::BF16),
        (DType::BF16, (1031, 1029), DType::F32),
    ] {
        for bias_correction in [false, true] {
            let params = adamw_params(1e-2, bias_correction);
            let init = Tensor::randn(0f32, 1.0, shape, &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let a = Var::from_tensor(&init).unwrap();
            let b = Var::from_tensor(&init.to_device(&Device::Cpu).unwrap()).unwrap();
            let mut fused = AdamW::new(vec![a.clone()], params, true).unwrap();
            assert!(fused.is_fused());
            let mut composed = AdamW::new(vec![b.clone()], params, false).unwrap();
            for step in 0..5 {
                let g = Tensor::randn(0f32, 1.0, shape, &dev)
                    .unwrap()
                    .to_dtype(g_dtype)
                    .unwrap();
                let mut ga = candle_core::backprop::GradStore::default();
                ga.insert(a.as_tensor(), g.clone());
                let mut gb = candle_core::backprop::GradStore::default();
                gb.insert(b.as_tensor(), g.to_device(&Device::Cpu).unwrap());
                fused.set_learning_rate(1e-2 / (step + 1) as f64);
                composed.set_learning_rate(1e-2 / (step + 1) as f64);
                fused.step(&ga).unwrap();
                composed.step(&gb).unwrap();
                let what = format!(
                    "{dtype:?} {shape:?} gradient {g_dtype:?} bias_correction={bias_correction} \
                     step {step}"
                );
                let diff = max_abs(
                    &(f32_of(a.as_tensor()).to_device(&Device::Cpu).unwrap()
                        - f32_of(b.as_tensor()))
                    .unwrap(),
                );
                assert_eq!(diff, 0.0, "{what}: fused AdamW differs by {diff:e}");
                let (ma, va) = fused.moments(&a).unwrap();
                let (mb, vb) = composed.moments(&b).unwrap();
                assert_eq!(
                    ma.dtype(),
                    dtype,
                    "{what}: moments in the parameter's dtype"
                );
                for (x, y) in [(ma, mb), (va, vb)] {
                    let d =
                        max_abs(&(f32_of(x).to_device(&Device::Cpu).unwrap() - f32_of(y)).unwrap());
                    assert_eq!(d, 0.0, "{what}: moments differ by {d:e}");
                }
            }
            assert!(
                rel_err(&f32_of(a.as_tensor()), &f32_of(&init)) > 1e-3,
                "the parameter moved"
            );
        }
    }
}

/// The embedding's backward into a bf16 table gives the bits of the CPU's sum: each token's
/// rows of the input gradient summed in f32 in position order, added once to its bf16 row
/// (the head's gradient when tied). Tokens repeated near and far apart, one seen once, rows
/// of 64, 1,056 (two blocks of columns, the second partly filled) and 1,024 values, f32 and
/// bf16 input gradients, 300 and 4,099 positions (blocks of 256 ids scanned, the last partly).
#[test]
fn embedding_backward_into_bf16_sums_each_token_in_order() {
    use ternlab::cuda::{embedding, Gpu};
    let dev = gpu();
    let g = Gpu::of(&dev).unwrap();
    for (n, e, dtype) in [
        (300, 64, DType::BF16),
        (300, 1056, DType::F32),
        (4099, 1024, DType::BF16),
    ] {
        let vocab = 97;
        // token 96 once (last), token 0 at both ends, the rest in a pattern with repeats
        let ids: Vec<u32> = (0..n)
            .map(|t| match t {
                0 => 0,
                _ if t == n - 1 => 96,
                _ if t == n - 2 => 0,
                _ => ((t * 7919 + 13) % 61) as u32 + 1,
            })
            .collect();
        let dx = randn((n, e), 1.0, dtype, &dev);
        let table = randn((vocab, e), 1.0, DType::BF16, &dev);
        let out = table.copy().unwrap();
        let idt = Tensor::from_vec(ids.clone(), n, &dev).unwrap();
        embedding::embed_back_rows(&g, &dx, &idt, &out).unwrap();
        // The CPU's: f32 sums in position order, then one bf16 rounding of row + sum.
        let dxv = f32_of(&dx).to_vec2::<f32>().unwrap();
        let mut want: Vec<Vec<f32>> = f32_of(&table).to_vec2::<f32>().unwrap();
        let mut sums = vec![vec![0f32; e]; vocab];
        let mut seen = vec![false; vocab];
        for (t, &id) in ids.iter().enumerate() {
            seen[id as usize] = true;
            for c in 0..e {
                sums[id as usize][c] += dxv[t][c];
            }
        }
        for id in 0..vocab {
            if seen[id] {
                for c in 0..e {
                    want[id][c] = half::bf16::from_f32(want[id][c] + sums[id][c]).to_f32();
                }
            }
        }
        let got = f32_of(&out).to_vec2::<f32>().unwrap();
        let what = format!("{n} positions, rows of {e}, dx {dtype:?}");
        for id in 0..vocab {
            for c in 0..e {
                assert!(
                    got[id][c].to_bits() == want[id][c].to_bits(),
                    "{what}: token {id} column {c}: {} against {}",
                    got[id][c],
                    want[id][c]
                );
            }
        }
        assert!(!seen[vocab - 2], "a token never seen is left as it was");
    }
}

/// AdamW that also writes the ternary projection of the latent it updates (what a replayed
/// step multiplies by next) gives the bits of the update followed by the projection kernel:
/// groups of 32 to 512 (one to four 128-weight spans a warp), absmean and absmax scales, f32 and
/// bf16 scales, a projection in bf16 and in f32, a warm-up's lambda, an f32 gradient and a
/// bf16 one; three of the kernel's blocks, the last one partly filled.
#[test]
fn adamw_writes_the_ternary_projection_of_the_latent_it_updates() {
    use ternlab::cuda::adamw::{Entry, MultiTable, Scalars};
    use ternlab::cuda::{ternary, Gpu};
    use ternlab::quant::{Quant, ScaleDtype, ScaleRule};
    let dev = gpu();
    let g = Gpu::of(&dev).unwrap();
    let n = 2 * 32_768 + 5_120;
    let k = Scalars {
        lr: 3e-2,
        b1: 0.9,
        one_minus_b1: 0.1,
        b2: 0.95,
        one_minus_b2: 0.05,
        eps: 1e-8,
        decay: 0.999,
        correction: (1.0, 1.0),
        bias_correction: false,
    };
    let bits = |t: &Tensor| -> Vec<u32> {
        f32_of(t)
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect()
    };
    let cases = [
        (32, ScaleRule::Absmean, ScaleDtype::F32, DType::BF16, 1.0),
        (64, ScaleRule::Absmean, ScaleDtype::Bf16, DType::BF16, 1.0),
        (128, ScaleRule::Absmean, ScaleDtype::F32, DType::F32, 1.0),
        (128, ScaleRule::Absmax, ScaleDtype::F16, DType::BF16, 0.5),
        (256, ScaleRule::Absmean, ScaleDtype::F32, DType::BF16, 1.0),
        (512, ScaleRule::Absmean, ScaleDtype::F32, DType::BF16, 0.25),
    ];
    for ((group, scale, scale_dtype, out, lambda), g_dtype) in cases
        .into_iter()
        .flat_map(|c| [(c, DType::F32), (c, DType::BF16)])
    {
        let q = Quant {
            group,
            scale,
            scale_dtype,
        };
        let what = format!(
            "group {group} {scale:?} {scale_dtype:?} -> {out:?}, lambda {lambda}, gradient \
             {g_dtype:?}"
        );
        let args = ternary::vector_args(n, q, lambda).expect("the 16-byte kernels take it");
        let p0 = Tensor::randn(0f32, 0.02, n, &dev).unwrap();
        let m0 = Tensor::randn(0f32, 1e-3, n, &dev).unwrap();
        let v0 = Tensor::randn(0f32, 1e-3, n, &dev).unwrap().sqr().unwrap();
        let grad = Tensor::randn(0f32, 1e-2, n, &dev)
            .unwrap()
            .to_dtype(g_dtype)
            .unwrap();
        // (copies: the kernel updates in place)
        let run = |writing: bool| {
            let (p, m, v) = (p0.copy().unwrap(), m0.copy().unwrap(), v0.copy().unwrap());
            let wt = Tensor::zeros(n, out, &dev).unwrap();
            let mut table = MultiTable::new(&g, &[n]).unwrap();
            let entry = Entry::new(&p, &m, &v, &grad, &k).unwrap();
            let entry = match writing {
                true => entry.writing(&wt, args).unwrap(),
                false => entry,
            };
            table.write(&[entry]).unwrap();
            table.launch(None).unwrap();
            if !writing {
                ternary::ternarize(&g, &p, &wt, q, lambda).unwrap();
            }
            (p, wt)
        };
        let ((pa, wa), (pb, wb)) = (run(true), run(false));
        assert!(bits(&pa) == bits(&pb), "{what}: the updated latent");
        assert!(bits(&wa) == bits(&wb), "{what}: the projection");
        if lambda == 1.0 {
            let zeros = f32_of(&wb).eq(0.0).unwrap().to_dtype(DType::F32).unwrap();
            let share = zeros.mean_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(share > 0.05 && share < 0.95, "{what}: {share} of W_t is 0");
        }
    }
}

/// The one launch over many parameters: f32 and bf16 ones side by side, one spanning several
/// of the kernel's blocks (32,768 elements each), one without a gradient (left alone), each
/// equal to the composed optimizer's to the bit.
#[test]
fn fused_adamw_updates_mixed_parameters_in_one_launch() {
    let dev = gpu();
    let params = adamw_params(1e-2, false);
    let shapes = [
        ((300, 250), DType::F32),
        ((33, 65), DType::BF16),
        ((7, 5), DType::F32),
        ((129, 3), DType::BF16),
    ];
    let inits: Vec<Tensor> = shapes
        .iter()
        .map(|(s, dt)| {
            let t = Tensor::randn(0f32, 1.0, *s, &dev).unwrap();
            t.to_dtype(*dt).unwrap()
        })
        .collect();
    let a: Vec<Var> = inits.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
    let b: Vec<Var> = inits
        .iter()
        .map(|t| Var::from_tensor(&t.to_device(&Device::Cpu).unwrap()).unwrap())
        .collect();
    let mut fused = AdamW::new(a.clone(), params, true).unwrap();
    let mut composed = AdamW::new(b.clone(), params, false).unwrap();
    for step in 0..3 {
        let (mut ga, mut gb) = (Default::default(), Default::default());
        let (ga, gb): (
            &mut candle_core::backprop::GradStore,
            &mut candle_core::backprop::GradStore,
        ) = (&mut ga, &mut gb);
        for (i, ((s, _), (va, vb))) in shapes.iter().zip(a.iter().zip(&b)).enumerate() {
            if i == 2 {
                continue; // no gradient
            }
            let g = Tensor::randn(0f32, 1.0, *s, &dev).unwrap();
            ga.insert(va.as_tensor(), g.clone());
            gb.insert(vb.as_tensor(), g.to_device(&Device::Cpu).unwrap());
        }
        fused.step(ga).unwrap();
        composed.step(gb).unwrap();
        for (i, (va, vb)) in a.iter().zip(&b).enumerate() {
            let d = max_abs(
                &(f32_of(va.as_tensor()).to_device(&Device::Cpu).unwrap() - f32_of(vb.as_tensor()))
                    .unwrap(),
            );
            assert_eq!(d, 0.0, "step {step}, parameter {i}: differs by {d:e}");
        }
    }
    let moved = |i: usize| rel_err(&f32_of(a[i].as_tensor()), &f32_of(&inits[i]));
    assert!(moved(0) > 1e-3 && moved(3) > 1e-3, "the parameters moved");
    assert_eq!(moved(2), 0.0, "the parameter without a gradient stayed");
}

#[test]
fn rms_norm_matches_the_composed_one() {
    let dev = gpu();
    // q/k norms (head dim 128 over many rows: the one-kernel backward), layer norms (hidden
    // 1024 and 512: the vectorized kernels, 32 and 16 values a lane), a hidden size they do not
    // take (1,056: the two-kernel backward), and a small odd case.
    for (rows, d) in [
        (4 * 256 * 16, 128),
        (4 * 256, 1024),
        (77, 512),
        (33, 1056),
        (3, 40),
    ] {
        for dtype in [DType::F32, DType::BF16] {
            let x = var(&[rows, d], 2.0, dtype, &dev);
            let w = Var::from_tensor(&(Tensor::randn(0f32, 0.3, d, &dev).unwrap() + 1.0).unwrap())
                .unwrap();
            // Measured on an H100 (`--nocapture` prints them): f32 values 1.3e-7, gradients
            // 5.2e-7; bf16 values 2.1e-3, gradients 1.9e-3.
            let t = tol(dtype, 1e-6, 1e-2);
            let norm = |o| ops::rms_norm(x.as_tensor(), w.as_tensor(), 1e-6, o).unwrap();
            assert_agree(
                &format!("{rows}x{d} {dtype:?}"),
                &[&x, &w],
                norm(Ops::Fused),
                norm(Ops::Composed),
                t,
                tol(dtype, 2e-6, 1e-2),
            );
        }
    }
}

/// The vectorized norm kernels read a bf16 weight as it is (the step passes the checkpoint's
/// bf16 norm weights without a cast): the same bits as with the weight widened to f32, for the
/// hidden norms (forward, backward, backward added into the residual gradient) and the q/k norm
/// + RoPE (both ways), but for the weights' gradients, which are sums in no fixed order.
#[test]
fn bf16_norm_weights_give_the_bits_of_their_f32_widening() {
    use ternlab::cuda::{attention, norm, Gpu};
    use ternlab::model::{Preset, Qwen3Config};
    let dev = gpu();
    let g = Gpu::of(&dev).unwrap();
    let bits = |what: &str, a: &Tensor, b: &Tensor| {
        let diff = max_abs(&(f32_of(a) - f32_of(b)).unwrap());
        assert_eq!(diff, 0.0, "{what}: bf16 weight against its f32 widening");
    };
    // A weight's gradient does not read the weight, but its columns are summed by atomic adds,
    // one a block, in an order that varies from run to run: a few roundings apart (an H100 gave
    // at most 3.8e-6 on values up to 26, 1.5e-7 of the largest; `--nocapture` prints each).
    let sums = |what: &str, a: &Tensor, b: &Tensor| {
        let diff = max_abs(&(a - b).unwrap());
        let top = max_abs(b);
        println!("{what}: {diff:e} of {top:e}");
        assert!(
            diff <= 1e-6 * top,
            "{what}: bf16 weight against its f32 widening differ by {diff:e} of {top:e}"
        );
    };
    let weights = |d: usize| {
        let wb = (Tensor::randn(0f32, 0.3, d, &dev).unwrap() + 1.0)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let wf = wb.to_dtype(DType::F32).unwrap();
        (wb, wf)
    };
    for (rows, d) in [(77, 512), (40, 1024)] {
        assert!(norm::takes_bf16_weight(d));
        let x = randn((rows, d), 2.0, DType::BF16, &dev);
        let dy = randn((rows, d), 1.0, DType::BF16, &dev);
        let (wb, wf) = weights(d);
        let ys = [&wb, &wf].map(|w| {
            let y = x.zeros_like().unwrap();
            norm::rmsnorm(&g, &x, w, &y, 1e-6).unwrap();
            y
        });
        bits(&format!("rmsnorm {rows}x{d}"), &ys[0], &ys[1]);
        for add in [false, true] {
            let outs = [&wb, &wf].map(|w| {
                let dx = dy.clone().affine(0.5, 0.0).unwrap();
                let dw = norm::backward(&g, &x, w, &dy, &dx, 1e-6, add, None).unwrap();
                (dx, dw)
            });
            bits(
                &format!("rmsnorm dx {rows}x{d} add={add}"),
                &outs[0].0,
                &outs[1].0,
            );
            sums(
                &format!("rmsnorm dw {rows}x{d} add={add}"),
                &outs[0].1,
                &outs[1].1,
            );
        }
    }
    let cfg = Qwen3Config::preset(Preset::Qwen3_0_6B, 151_936);
    let (b, l, heads, d) = (2, 17, 3, cfg.head_dim);
    assert!(attention::takes_bf16_weight(d));
    let rope = Rope::new(&cfg, l, &dev).unwrap();
    let x = randn((b, l, heads, d), 1.0, DType::BF16, &dev);
    let dy = randn((b, heads, l, d), 1.0, DType::BF16, &dev);
    let (wb, wf) = weights(d);
    let outs = [&wb, &wf].map(|w| {
        let y = dy.zeros_like().unwrap();
        let (cos, sin) = rope.tables();
        attention::norm_rope(&g, &x, w, cos, sin, &y, (heads, 1), 1e-6).unwrap();
        let dx = x.zeros_like().unwrap();
        let dw = attention::rope_norm_back(&g, &dy, &x, w, (cos, sin), &dx, (heads, 1), 1e-6, None)
            .unwrap();
        (y, dx, dw)
    });
    bits("norm_rope", &outs[0].0, &outs[1].0);
    bits("rope_norm_bwd dx", &outs[0].1, &outs[1].1);
    sums("rope_norm_bwd dw", &outs[0].2, &outs[1].2);
}

/// The residual sum and the RMSNorm after it in one kernel (`norm::add_rmsnorm`, the forward's)
/// give the bits of the two kernels one after the other: h = a + b rounded to the dtype, the
/// norm of those stored values. Rows of 1,024 and 512 take the one-pass kernel (f32 and bf16
/// weights), rows of 96 the two kernels it falls back to.
#[test]
fn residual_sum_and_norm_in_one_pass_match_the_two_kernels() {
    use ternlab::cuda::{norm, residual, Gpu};
    let dev = gpu();
    let g = Gpu::of(&dev).unwrap();
    for dtype in [DType::F32, DType::BF16] {
        for (rows, d) in [(300, 1024), (77, 512), (33, 96)] {
            let a = randn((rows, d), 3.0, dtype, &dev);
            let b = randn((rows, d), 1.0, dtype, &dev);
            let wf = (Tensor::randn(0f32, 0.3, d, &dev).unwrap() + 1.0).unwrap();
            let mut weights = vec![wf.clone()];
            if norm::takes_bf16_weight(d) {
                weights.push(wf.to_dtype(DType::BF16).unwrap());
            }
            for w in &weights {
                let what = format!("{dtype:?} {rows}x{d} weight {:?}", w.dtype());
                let (h0, y0) = (a.zeros_like().unwrap(), a.zeros_like().unwrap());
                residual::add(&g, &a, &b, &h0).unwrap();
                norm::rmsnorm(&g, &h0, w, &y0, 1e-6).unwrap();
                let (h1, y1) = (a.zeros_like().unwrap(), a.zeros_like().unwrap());
                norm::add_rmsnorm(&g, &a, &b, &h1, w, &y1, 1e-6).unwrap();
                for (name, x, y) in [("h", &h0, &h1), ("y", &y0, &y1)] {
                    let diff = max_abs(&(f32_of(x) - f32_of(y)).unwrap());
                    assert_eq!(diff, 0.0, "{what}: {name} of one pass against two kernels");
                }
                // (and not trivially: the sum is not either input)
                assert!(
                    max_abs(&(f32_of(&h1) - f32_of(&a)).unwrap()) > 0.1,
                    "{what}"
                );
            }
        }
    }
}

/// q/k RMSNorm, RoPE and the head transpose: one kernel each way (the step's `norm_rope` and
/// `rope_norm_bwd`) against norm, transpose and rotation as candle ops; head dim 128 takes the
/// vectorized kernels, 48 the one-value-a-lane ones (`rope_bwd` + the norm's backward).
#[test]
fn qk_norm_and_rope_match_the_composed_ones() {
    use ternlab::model::{Preset, Qwen3Config};
    let dev = gpu();
    let mut cfg = Qwen3Config::preset(Preset::Qwen3_0_6B, 151_936);
    // 8,330 rows: the forward's last warp takes 2 of its 4 rows, the backward's blocks 16 rows
    // (two a warp), the last one 10. Ten or three heads: a forward warp's four rows cross from
    // one position to the next.
    for (d, (b, l, n)) in [(128, (2, 17, 3)), (128, (1, 833, 10)), (48, (2, 17, 3))] {
        cfg.head_dim = d;
        let rope = Rope::new(&cfg, l, &dev).unwrap();
        for dtype in [DType::F32, DType::BF16] {
            let x = var(&[b, l, n, d], 1.0, dtype, &dev);
            let w = Tensor::randn(0f32, 0.3, d, &dev).unwrap() + 1.0;
            let w = Var::from_tensor(&w.unwrap()).unwrap();
            // Measured on an H100 (head dim 128): f32 values 9.0e-8 and 2.0e-7, gradients
            // 1.8e-7, but the weight's over 8,330 rows 1.0e-6 (a sum of per-block atomic adds
            // in no fixed order; the bound is the gradients'); bf16 values 6.6e-3 and gradients
            // 5.6e-3 (the composed path rounds to bf16 after the norm and in the rotation).
            let (t, grad_t) = (tol(dtype, 1e-6, 2e-2), tol(dtype, 2e-6, 2e-2));
            let run = |o| ops::qk_norm_rope(x.as_tensor(), w.as_tensor(), 1e-6, &rope, o).unwrap();
            let (fused, composed) = (run(Ops::Fused), run(Ops::Composed));
            assert_eq!(fused.dims(), &[b, n, l, d]);
            let what = format!("{dtype:?}, head dim {d}, {b} x {l} x {n}");
            assert_agree(&what, &[&x, &w], fused, composed, t, grad_t);
        }
    }
}

/// The q/k norm + RoPE kernels read x from, and write dx into, one projection's columns of a
/// fused q/k/v projection's rows (`TokenRows::columns`): the bits of the packed tensors', for
/// q (4 heads in groups of 2, the first columns) and k (2 heads, the next); nothing written
/// outside the columns; and both sets in one launch each way (the step's), the bits of a launch
/// each. The weight's gradient is a sum in no fixed order (atomic adds): within 1e-6 of its
/// largest value.
#[test]
fn qk_norm_and_rope_read_and_write_columns_of_fused_rows() {
    use ternlab::cuda::attention::{self, TokenRows};
    use ternlab::cuda::{AsBuf, Gpu};
    use ternlab::model::{Preset, Qwen3Config};
    let dev = gpu();
    let g = Gpu::of(&dev).unwrap();
    let cfg = Qwen3Config::preset(Preset::Qwen3_0_6B, 151_936);
    let (b, l, d) = (2, 17, cfg.head_dim);
    let rope = Rope::new(&cfg, l, &dev).unwrap();
    let tables = rope.tables();
    let width = (4 + 2 + 2) * d;
    let bf = |shape: &[usize]| randn(shape, 1.0, DType::BF16, &dev);
    let wide = bf(&[b * l, width]);
    let w = (Tensor::randn(0f32, 0.3, d, &dev).unwrap() + 1.0).unwrap();
    for (at, heads, group) in [(0, 4, 2), (4 * d, 2, 1)] {
        let what = format!("{heads} heads in groups of {group} from column {at}");
        let cols = heads * d;
        let packed = wide.narrow(1, at, cols).unwrap().contiguous().unwrap();
        let x = TokenRows::columns(&wide, at, cols).unwrap();
        let shape = (b * heads / group, l * group, d);
        let (y, y2) = (
            Tensor::zeros(shape, DType::BF16, &dev).unwrap(),
            Tensor::zeros(shape, DType::BF16, &dev).unwrap(),
        );
        attention::norm_rope(
            &g,
            &packed,
            &w,
            tables.0,
            tables.1,
            &y,
            (heads, group),
            1e-6,
        )
        .unwrap();
        attention::norm_rope_rows(&g, &x, &w, tables, &y2, (heads, group), 1e-6).unwrap();
        assert_eq!(max_abs(&f32_of(&(&y - &y2).unwrap())), 0.0, "{what}: y");
        let dy = bf(&[b * heads / group, l * group, d]);
        let dx = packed.zeros_like().unwrap();
        let dwide = wide.zeros_like().unwrap();
        let dxc = TokenRows::columns(&dwide, at, cols).unwrap();
        let hg = (heads, group);
        let dw =
            attention::rope_norm_back(&g, &dy, &packed, &w, tables, &dx, hg, 1e-6, None).unwrap();
        let dw2 = attention::rope_norm_back_rows(&g, &dy, (&x, &w), tables, &dxc, hg, 1e-6, None)
            .unwrap();
        let dx2 = dwide.narrow(1, at, cols).unwrap();
        assert_eq!(max_abs(&f32_of(&(&dx - &dx2).unwrap())), 0.0, "{what}: dx");
        for (from, len) in [(0, at), (at + cols, width - at - cols)] {
            if len == 0 {
                continue;
            }
            let rest = dwide.narrow(1, from, len).unwrap();
            assert_eq!(
                max_abs(&f32_of(&rest)),
                0.0,
                "{what}: dx written outside its columns"
            );
        }
        let (diff, top) = (max_abs(&(&dw - &dw2).unwrap()), max_abs(&dw));
        assert!(diff <= 1e-6 * top, "{what}: dw {diff:e} of {top:e}");
    }
    // q's and k's columns in one launch each way (the step's), each with a weight of its own:
    // the bits of one launch per set, dw again within 1e-6.
    let wk = (Tensor::randn(0f32, 0.3, d, &dev).unwrap() + 1.0).unwrap();
    let sets = [(0, 4, 2, &w), (4 * d, 2, 1, &wk)];
    let cols = |at, heads| TokenRows::columns(&wide, at, heads * d).unwrap();
    let ys = sets.map(|(_, heads, group, _)| {
        let shape = (b * heads / group, l * group, d);
        [0, 1].map(|_| Tensor::zeros(shape, DType::BF16, &dev).unwrap())
    });
    let (xq, xk) = (cols(0, 4), cols(4 * d, 2));
    let (wq, wkb) = (w.buf().unwrap(), wk.buf().unwrap());
    let y1 = [ys[0][1].buf().unwrap(), ys[1][1].buf().unwrap()];
    let rows = |x, w, y, heads, group| attention::RopeRows {
        x,
        w,
        y,
        heads,
        group,
        eps: 1e-6,
    };
    attention::norm_rope_pair(
        &g,
        [rows(&xq, &wq, &y1[0], 4, 2), rows(&xk, &wkb, &y1[1], 2, 1)],
        tables,
    )
    .unwrap();
    let dys = sets.map(|(_, heads, group, _)| bf(&[b * heads / group, l * group, d]));
    let dwides = [0, 1].map(|_| wide.zeros_like().unwrap());
    let dws = [0, 1].map(|_| [0, 1].map(|_| Tensor::zeros(d, DType::F32, &dev).unwrap()));
    for (i, (at, heads, group, w)) in sets.into_iter().enumerate() {
        let x = cols(at, heads);
        attention::norm_rope_rows(&g, &x, w, tables, &ys[i][0], (heads, group), 1e-6).unwrap();
        let dx = TokenRows::columns(&dwides[0], at, heads * d).unwrap();
        let dw = Some(dws[i][0].clone());
        attention::rope_norm_back_rows(&g, &dys[i], (&x, w), tables, &dx, (heads, group), 1e-6, dw)
            .unwrap();
    }
    let dx1 = sets.map(|(at, heads, _, _)| TokenRows::columns(&dwides[1], at, heads * d).unwrap());
    let back = |i: usize| {
        let (_, heads, group, w) = sets[i];
        attention::RopeBack {
            dy: &dys[i],
            x: [&xq, &xk][i],
            w,
            dx: &dx1[i],
            heads,
            group,
            eps: 1e-6,
            dw: &dws[i][1],
        }
    };
    attention::rope_norm_back_pair(&g, [back(0), back(1)], tables).unwrap();
    for (i, what) in ["q", "k"].into_iter().enumerate() {
        let y = max_abs(&f32_of(&(&ys[i][0] - &ys[i][1]).unwrap()));
        assert_eq!(y, 0.0, "{what} in one launch with the other: y");
        let (diff, top) = (
            max_abs(&(&dws[i][0] - &dws[i][1]).unwrap()),
            max_abs(&dws[i][0]),
        );
        assert!(
            diff <= 1e-6 * top,
            "{what} in one launch: dw {diff:e} of {top:e}"
        );
    }
    let dx = max_abs(&f32_of(&(&dwides[0] - &dwides[1]).unwrap()));
    assert_eq!(dx, 0.0, "q and k in one launch: dx");
}

/// The batched generation's q/k norm and RoPE, each sequence at positions of its own
/// (`Pass::rows`): the fused kernel over the batch as one sequence equals, row by row and to the
/// bit, the kernel on that row alone at its positions; and agrees with the composed ops.
#[test]
fn qk_norm_and_rope_at_per_row_positions() {
    use ternlab::model::{Pass, Preset, Qwen3Config};
    let dev = gpu();
    let cfg = Qwen3Config::preset(Preset::Qwen3_0_6B, 151_936);
    let (b, l, n, d) = (3, 5, 2, cfg.head_dim);
    let table = Rope::new(&cfg, 40, &dev).unwrap();
    let starts = [0usize, 7, 31];
    let positions: Vec<Vec<u32>> = starts
        .iter()
        .map(|&s| (s..s + l).map(|p| p as u32).collect())
        .collect();
    let pass = Pass::rows(
        &table,
        &positions,
        l,
        |_, i, j| j <= i,
        DType::F32,
        Ops::Fused,
    )
    .unwrap();
    for dtype in [DType::F32, DType::BF16] {
        let x = randn((b, l, n, d), 1.0, dtype, &dev);
        let w = (Tensor::randn(0f32, 0.3, d, &dev).unwrap() + 1.0).unwrap();
        let rows = |o| ops::qk_norm_rope_rows(&x, &w, 1e-6, &pass.rope, o).unwrap();
        let (fused, composed) = (rows(Ops::Fused), rows(Ops::Composed));
        assert_eq!(fused.dims(), &[b, n, l, d]);
        for (r, &s) in starts.iter().enumerate() {
            // (the tables of positions s..s+l, as generation after s cached tokens makes them)
            let alone = Pass::at(&cfg, (1, l), s, &dev, DType::F32, Ops::Fused).unwrap();
            let xr = x.narrow(0, r, 1).unwrap().contiguous().unwrap();
            let one = ops::qk_norm_rope(&xr, &w, 1e-6, &alone.rope, Ops::Fused).unwrap();
            let diff = max_abs(&f32_of(&(fused.narrow(0, r, 1).unwrap() - one).unwrap()));
            assert_eq!(
                diff, 0.0,
                "{dtype:?} row {r}: differs from the row alone by {diff:e}"
            );
        }
        let err = rel_err(&f32_of(&fused), &f32_of(&composed));
        assert!(
            err < tol(dtype, 1e-6, 2e-2),
            "{dtype:?}: fused vs composed {err:e}"
        );
    }
}

#[test]
fn causal_softmax_matches_the_composed_one() {
    let dev = gpu();
    for l in [1, 7, 64, 300] {
        let mask = ops::causal_mask(l, &dev).unwrap();
        for dtype in [DType::F32, DType::BF16] {
            let x = var(&[2, 4, l, l], 3.0, dtype, &dev);
            // Measured on an H100: f32 values 6e-8, gradients 3.2e-7; bf16 values equal,
            // gradients 5.0e-3.
            let t = tol(dtype, 1e-6, 2e-2);
            let probs = |o| ops::causal_softmax(x.as_tensor(), 0.125, &mask, o).unwrap();
            assert_agree(
                &format!("L={l} {dtype:?}"),
                &[&x],
                probs(Ops::Fused),
                probs(Ops::Composed),
                t,
                tol(dtype, 2e-6, 2e-2),
            );
        }
    }
}

/// Causal attention in f32 (autograd through matmul, mask and softmax) on q (B, L, H, D), k, v
/// (B, L, K, D), query head j on key/value head j / (H / K): the output (B, L, H, D), each
/// row's log-sum-exp of the scaled scores in base 2 (B, H, L), and the gradients of q, k, v for
/// the output's gradient `dout`.
fn attention_f32(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    dout: &Tensor,
) -> (Tensor, Tensor, Tensor, Tensor, Tensor) {
    let (b, l, h, d) = q.dims4().unwrap();
    let kh = k.dim(2).unwrap();
    let (q, k, v) = (
        Var::from_tensor(&f32_of(q)).unwrap(),
        Var::from_tensor(&f32_of(k)).unwrap(),
        Var::from_tensor(&f32_of(v)).unwrap(),
    );
    let heads = |x: &Tensor| {
        // (B, L, K, D) -> (B, H, L, D), each key/value head repeated for its R query heads
        x.transpose(1, 2)
            .unwrap()
            .unsqueeze(2)
            .unwrap()
            .expand((b, kh, h / kh, l, d))
            .unwrap()
            .reshape((b, h, l, d))
            .unwrap()
    };
    let qh = q.as_tensor().transpose(1, 2).unwrap().contiguous().unwrap();
    let (kh_, vh) = (heads(k.as_tensor()), heads(v.as_tensor()));
    let s = (qh.matmul(&kh_.t().unwrap()).unwrap() / (d as f64).sqrt()).unwrap();
    let s = s
        .broadcast_add(&ops::causal_mask(l, q.device()).unwrap())
        .unwrap();
    let lse = (s.exp().unwrap().sum_keepdim(3).unwrap().log().unwrap() * std::f64::consts::LOG2_E)
        .unwrap()
        .squeeze(3)
        .unwrap();
    // (composed, so that autograd reaches q and k)
    let e = s
        .broadcast_sub(&s.max_keepdim(3).unwrap())
        .unwrap()
        .exp()
        .unwrap();
    let p = e.broadcast_div(&e.sum_keepdim(3).unwrap()).unwrap();
    let o = p.matmul(&vh).unwrap().transpose(1, 2).unwrap();
    let g = (&o * f32_of(dout))
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let grad = |x: &Var| g.get(x).unwrap().clone();
    (o, lse, grad(&q), grad(&k), grad(&v))
}

/// Two query gradients of flash attention's backward that sum the same terms in another order
/// (f32 atomic adds, or another kernel): at most one bf16 rounding step of the largest value
/// apart (2^-7 of it).
fn assert_dq_agrees(a: &Tensor, b: &Tensor, what: &str) {
    let (a, b) = (f32_of(a), f32_of(b));
    let diff = max_abs(&(&a - &b).unwrap());
    let top = max_abs(&a);
    eprintln!(
        "{what}: dq {:e} of its largest value apart",
        diff / top.max(1e-30)
    );
    assert!(
        diff <= top / 128.0,
        "{what}: dq {diff:e} apart, more than a rounding step of {top:e}"
    );
}

/// The warp-specialized flash backward (compute capability 9.0, head dim 128, blocks of 128 keys)
/// against the key/value and query-side kernels on the same inputs: dk and dv 0 apart (the same
/// products over the same tiles in the same order), dq to a rounding step (summed by bulk f32
/// adds in no fixed order). It runs exactly where the card is of compute capability 9.0.
#[allow(clippy::too_many_arguments)]
fn assert_warp_specialized_agrees(
    g: &ternlab::cuda::Gpu,
    fl: ternlab::cuda::flash::Flash,
    (qr, kr, v): (&Tensor, &Tensor, &Tensor),
    o: &Tensor,
    lse: &Tensor,
    dout: &Tensor,
    what: &str,
) {
    use ternlab::cuda::flash::Flash;
    let two = Flash {
        key_block: Some(128),
        dq_kernel: Some(true),
        ..fl
    };
    let ws = Flash {
        key_block: Some(128),
        dq_kernel: None,
        warp_specialized: Some(true),
        ..fl
    };
    let hopper = g.compute_capability().unwrap() == (9, 0);
    assert_eq!(ws.warp_specialized_on(g).unwrap(), hopper, "{what}");
    assert!(!two.warp_specialized_on(g).unwrap());
    let (dv1, dv2) = (v.zeros_like().unwrap(), v.zeros_like().unwrap());
    let (dq1, dk1) = ws.backward(g, (qr, kr, v), o, lse, dout, &dv1).unwrap();
    let (dq2, dk2) = two.backward(g, (qr, kr, v), o, lse, dout, &dv2).unwrap();
    let how = format!("{what}: warp-specialized ({hopper}) against two kernels");
    for (name, a, b) in [("dk", &dk1, &dk2), ("dv", &dv1, &dv2)] {
        let diff = max_abs(&(f32_of(a) - f32_of(b)).unwrap());
        assert_eq!(diff, 0.0, "{how}: {name}");
    }
    assert_dq_agrees(&dq2, &dq1, &how);
}

/// Flash attention (bf16, tensor cores) against attention in f32 on the same bf16 inputs, and
/// beside the blocked bf16 attention it replaces: output, log-sum-exp and the three gradients,
/// with grouped queries (R = 1, 2, 3), lengths across tile edges (1, 33, 70, 200, 300), and
/// every head dim it takes.
#[test]
fn flash_attention_matches_attention_in_f32() {
    use ternlab::cuda::causal_attention::CausalAttention;
    use ternlab::cuda::flash::Flash;
    use ternlab::cuda::Gpu;
    let dev = gpu();
    let g = Gpu::of(&dev).unwrap();
    let bf = |shape: &[usize], std: f32| randn(shape, std, DType::BF16, &dev);
    assert!(Flash::supported(&g, DType::BF16, 128).unwrap());
    assert!(!Flash::supported(&g, DType::F32, 128).unwrap());
    assert!(!Flash::supported(&g, DType::BF16, 96).unwrap());
    for (b, l, h, k, d) in [
        (2, 200, 4, 2, 128),
        (1, 300, 16, 8, 128),
        (1, 1024, 16, 8, 128),
        (1, 70, 2, 2, 64),
        (3, 33, 6, 2, 32),
        (2, 1, 2, 1, 64),
    ] {
        let what = format!("B={b} L={l} H={h} K={k} D={d}");
        let r = h / k;
        // (B, L, H, D) -> the step's (B, K, L, R, D), and back from (B*K, L*R, D); keys and
        // values (B*K, L, D) -> (B, L, K, D)
        let grouped = |t: &Tensor| {
            t.reshape((b, l, k, r, d))
                .unwrap()
                .permute((0, 2, 1, 3, 4))
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let ungrouped = |t: &Tensor| {
            t.reshape((b, k, l, r, d))
                .unwrap()
                .permute((0, 2, 1, 3, 4))
                .unwrap()
                .reshape((b, l, h, d))
                .unwrap()
        };
        let per_position = |t: &Tensor| t.reshape((b, k, l, d)).unwrap().transpose(1, 2).unwrap();
        // Scores of std ~3 (q and k of std ~1.7 over D): peaked rows, as trained models have.
        let (q, kk, v) = (
            bf(&[b, l, h, d], 1.7),
            bf(&[b, l, k, d], 1.7),
            bf(&[b, l, k, d], 1.0),
        );
        let dout = bf(&[b, l, h, d], 1.0);
        // The step's layouts: q (B, K, L, R, D), k (B, K, L, D), v and the output as projected.
        let qr = grouped(&q);
        let kr = kk.transpose(1, 2).unwrap().contiguous().unwrap();
        let fl = Flash::new(b, l, (h, k, d));
        let o = g.empty((b, l, h, d), DType::BF16).unwrap();
        let lse = g.empty((b * k, l * r), DType::F32).unwrap();
        fl.forward(&g, (&qr, &kr, &v), &o, &lse).unwrap();
        // The forward of 32 rows a warp (the default) and of 16: each row's arithmetic in the
        // same order, so the same bits.
        {
            let sixteen = Flash {
                fwd_rows_per_warp: Some(16),
                ..fl
            };
            let (o16, lse16) = (o.zeros_like().unwrap(), lse.zeros_like().unwrap());
            sixteen.forward(&g, (&qr, &kr, &v), &o16, &lse16).unwrap();
            for (name, a, b) in [("output", &o, &o16), ("lse", &lse, &lse16)] {
                let diff = max_abs(&(f32_of(a) - f32_of(b)).unwrap());
                assert_eq!(diff, 0.0, "{what}: the {name} of 16 rows a warp");
            }
        }
        let dv = v.zeros_like().unwrap();
        let (dqr, dkr) = fl
            .backward(&g, (&qr, &kr, &v), &o, &lse, &dout, &dv)
            .unwrap();
        // v and its gradient as columns of wider rows (the step's fused q/k/v output, whose
        // last K * D columns are v): read and written in place, the same bits.
        {
            use ternlab::cuda::attention::TokenRows;
            let kd = k * d;
            let wide = Tensor::zeros((b * l, 3 * kd), DType::BF16, &dev).unwrap();
            wide.slice_set(&v.reshape((b * l, kd)).unwrap(), 1, kd)
                .unwrap();
            let dwide = wide.zeros_like().unwrap();
            let (vw, dvw) = (
                TokenRows::columns(&wide, kd, kd).unwrap(),
                TokenRows::columns(&dwide, kd, kd).unwrap(),
            );
            let strided = Flash {
                v_stride: vw.stride,
                ..fl
            };
            let (o2, lse2) = (o.zeros_like().unwrap(), lse.zeros_like().unwrap());
            strided
                .forward(&g, (&qr, &kr, &vw.buf), &o2, &lse2)
                .unwrap();
            let (dq2, dk2) = strided
                .backward(&g, (&qr, &kr, &vw.buf), &o2, &lse2, &dout, &dvw.buf)
                .unwrap();
            let dv2 = dwide.narrow(1, kd, kd).unwrap().reshape(v.shape()).unwrap();
            for (name, a, b) in [
                ("output", &o, &o2),
                ("lse", &lse, &lse2),
                ("dk", &dkr, &dk2),
                ("dv", &dv, &dv2),
            ] {
                let diff = max_abs(&(f32_of(a) - f32_of(b)).unwrap());
                assert_eq!(
                    diff,
                    0.0,
                    "{what}: the {name} with v's rows {} apart",
                    3 * kd
                );
            }
            assert_dq_agrees(&dqr, &dq2, &format!("{what}: v's rows {} apart", 3 * kd));
            let rest = (dwide
                .narrow(1, 0, kd)
                .unwrap()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap())
            .to_dtype(DType::F32)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
            assert_eq!(rest, 0.0, "{what}: dv written outside its columns");
        }
        // The key/value backward in blocks of 128 keys and of 64 (four warps; the default at
        // these small grids), each adding into the query gradient or leaving it to the query-side
        // kernel: each warp sums the same query tiles in the same order (a block of 128 starts
        // some warps at tiles that add exact zeros), so dk and dv agree in every bit; dq, summed
        // in another order, to a rounding step.
        for (keys, dq_kernel) in [(64, false), (128, false), (64, true), (128, true)] {
            let fixed = Flash {
                key_block: Some(keys),
                dq_kernel: Some(dq_kernel),
                ..fl
            };
            let dv2 = v.zeros_like().unwrap();
            let (dq2, dk2) = fixed
                .backward(&g, (&qr, &kr, &v), &o, &lse, &dout, &dv2)
                .unwrap();
            let how = format!("{what}: blocks of {keys} keys, dq kernel {dq_kernel}");
            for (name, a, b) in [("dk", &dkr, &dk2), ("dv", &dv, &dv2)] {
                let diff = max_abs(&(f32_of(a) - f32_of(b)).unwrap());
                assert_eq!(diff, 0.0, "{how}: {name}");
            }
            assert_dq_agrees(&dqr, &dq2, &how);
            if dq_kernel {
                // the query-side kernel adds nothing atomically: the same bits again
                let (dq3, _) = fixed
                    .backward(&g, (&qr, &kr, &v), &o, &lse, &dout, &dv2)
                    .unwrap();
                let diff = max_abs(&(f32_of(&dq2) - f32_of(&dq3)).unwrap());
                assert_eq!(diff, 0.0, "{how}: dq run twice");
            }
        }
        // Both backwards in one launch (the default with blocks of 64 keys) against the two
        // kernels: the query side in blocks of 64 rows instead of 128 sums each row's key tiles
        // in the same order (a block of 128 adds exact zeros past a row's keys), so dq, dk and
        // dv agree in every bit.
        {
            let two = Flash {
                key_block: Some(64),
                dq_kernel: Some(true),
                one_launch: Some(false),
                ..fl
            };
            let one = Flash {
                one_launch: Some(true),
                ..two
            };
            let (dv1, dv2) = (v.zeros_like().unwrap(), v.zeros_like().unwrap());
            let (dq1, dk1) = one
                .backward(&g, (&qr, &kr, &v), &o, &lse, &dout, &dv1)
                .unwrap();
            let (dq2, dk2) = two
                .backward(&g, (&qr, &kr, &v), &o, &lse, &dout, &dv2)
                .unwrap();
            for (name, a, b) in [("dq", &dq1, &dq2), ("dk", &dk1, &dk2), ("dv", &dv1, &dv2)] {
                let diff = max_abs(&(f32_of(a) - f32_of(b)).unwrap());
                assert_eq!(diff, 0.0, "{what}: {name} of one launch against two");
            }
        }
        // The kernels on the warpgroup MMA (the default on compute capability 9.0, head dims 64
        // and 128) against mma.sync: the forward, and the backward in each form the step
        // launches. The same products of the same bf16 operands over the same tiles, and on an
        // H100 the same bits (every output, lse, dk and dv 0 apart, and dq where no atomic adds
        // sum it).
        {
            let mma = Flash {
                gmma: Some(false),
                ..fl
            };
            let gm = Flash {
                gmma: Some(true),
                ..fl
            };
            let (o1, lse1) = (o.zeros_like().unwrap(), lse.zeros_like().unwrap());
            let (o2, lse2) = (o.zeros_like().unwrap(), lse.zeros_like().unwrap());
            gm.forward(&g, (&qr, &kr, &v), &o1, &lse1).unwrap();
            mma.forward(&g, (&qr, &kr, &v), &o2, &lse2).unwrap();
            for (name, a, b) in [("output", &o1, &o2), ("lse", &lse1, &lse2)] {
                let diff = max_abs(&(f32_of(a) - f32_of(b)).unwrap());
                assert_eq!(diff, 0.0, "{what}: the {name}, wgmma against mma.sync");
            }
        }
        for (keys, dq_kernel, one_launch) in [
            (64, true, true),
            (64, true, false),
            (128, true, false),
            (64, false, false),
            (128, false, false),
        ] {
            let mma = Flash {
                key_block: Some(keys),
                dq_kernel: Some(dq_kernel),
                one_launch: Some(one_launch),
                gmma: Some(false),
                ..fl
            };
            let gm = Flash {
                gmma: Some(true),
                ..mma
            };
            let (dv1, dv2) = (v.zeros_like().unwrap(), v.zeros_like().unwrap());
            let (dq1, dk1) = gm
                .backward(&g, (&qr, &kr, &v), &o, &lse, &dout, &dv1)
                .unwrap();
            let (dq2, dk2) = mma
                .backward(&g, (&qr, &kr, &v), &o, &lse, &dout, &dv2)
                .unwrap();
            let how = format!(
                "{what}: wgmma against mma.sync, blocks of {keys} keys, dq kernel {dq_kernel}, \
                 one launch {one_launch}"
            );
            for (name, a, b) in [("dk", &dk1, &dk2), ("dv", &dv1, &dv2)] {
                let diff = max_abs(&(f32_of(a) - f32_of(b)).unwrap());
                assert_eq!(diff, 0.0, "{how}: {name}");
            }
            if dq_kernel {
                let diff = max_abs(&(f32_of(&dq1) - f32_of(&dq2)).unwrap());
                assert_eq!(diff, 0.0, "{how}: dq");
            } else {
                // (atomic adds in no fixed order)
                assert_dq_agrees(&dq2, &dq1, &how);
            }
        }
        if d == 128 {
            assert_warp_specialized_agrees(&g, fl, (&qr, &kr, &v), &o, &lse, &dout, &what);
        }
        let (dq, dk) = (ungrouped(&dqr), per_position(&dkr));
        // lse (B*K, L*R) -> (B, H, L)
        let lse = lse
            .reshape((b, k, l, r))
            .unwrap()
            .permute((0, 1, 3, 2))
            .unwrap()
            .reshape((b, h, l))
            .unwrap();
        let (o_c, lse_c, dq_c, dk_c, dv_c) = attention_f32(&q, &kk, &v, &dout);

        // The blocked bf16 attention on the same inputs, for scale.
        let ca = CausalAttention::new(b, l, (h, k, d), None);
        let vt = v.transpose(1, 2).unwrap().contiguous().unwrap();
        let datt = grouped(&dout).reshape((b * k, l * r, d)).unwrap();
        let (probs, att) = ca.forward(&g, &qr, &kr, &vt).unwrap();
        let (bq, bk, bv) = ca.backward(&g, (&qr, &kr, &vt), &probs, &datt).unwrap();
        let (o_b, bq) = (ungrouped(&att), ungrouped(&bq));
        let (bk, bv) = (per_position(&bk), per_position(&bv));

        // Measured on an H100: lse within 5.7e-6 (base 2); relative to f32, the output within
        // 2.5e-3 and the gradients within 6.0e-3, each 1.2-5x closer than the blocked bf16
        // attention's (1.1e-2 and 1.3e-2 at most).
        let lse_err = max_abs(&(&lse - &lse_c).unwrap());
        eprintln!("{what}: lse {lse_err:e}");
        assert!(lse_err < 2e-5, "{what}: log-sum-exp off by {lse_err:e}");
        for (name, x, blocked, want, bound) in [
            ("output", &o, &o_b, &o_c, 5e-3),
            ("dq", &dq, &bq, &dq_c, 1e-2),
            ("dk", &dk, &bk, &dk_c, 1e-2),
            ("dv", &dv, &bv, &dv_c, 1e-2),
        ] {
            // With one key (L = 1) dq and dk are zero in f32 (the probability is 1, so
            // dP - delta = 0); the kernels leave rounding residue there (delta summed in
            // another order than the tensor cores sum dP: 2.3e-7 measured on an H200), so a
            // zero reference is compared in absolute terms, below 1e-5.
            let zero = max_abs(want) == 0.0;
            let err = if zero {
                max_abs(&f32_of(x))
            } else {
                rel_err(&f32_of(x), want)
            };
            let err_b = rel_err(&f32_of(blocked), want);
            eprintln!("{what}: {name} {err:e} (blocked bf16 {err_b:e})");
            let bound = if zero { 1e-5 } else { bound };
            assert!(err < bound, "{what}: {name} differs by {err:e}");
        }
    }
}

/// The warp-specialized flash backward (compute capability 9.0, head dim 128) at other group
/// sizes than Qwen3-0.6B's two query heads a key/value head: one, three and five (query tiles
/// of 64 rows that end inside a position; lengths across key blocks of 128). Against the
/// key/value and query-side kernels: dk and dv 0 apart, dq to a rounding step.
#[test]
fn flash_warp_specialized_backward_takes_any_group_size() {
    use ternlab::cuda::flash::Flash;
    use ternlab::cuda::Gpu;
    let dev = gpu();
    let g = Gpu::of(&dev).unwrap();
    let d = 128;
    for (b, l, h, k) in [(1, 200, 4, 4), (2, 200, 3, 1), (1, 260, 10, 2)] {
        let r = h / k;
        let what = format!("B={b} L={l} H={h} K={k} (R={r})");
        let bf = |shape: &[usize], std: f32| randn(shape, std, DType::BF16, &dev);
        // the step's layouts: q (B, K, L, R, D), k (B, K, L, D), v and the output (B, L, *)
        let (qr, kr, v) = (
            bf(&[b, k, l, r, d], 1.7),
            bf(&[b, k, l, d], 1.7),
            bf(&[b, l, k, d], 1.0),
        );
        let dout = bf(&[b, l, h, d], 1.0);
        let fl = Flash::new(b, l, (h, k, d));
        let o = g.empty((b, l, h, d), DType::BF16).unwrap();
        let lse = g.empty((b * k, l * r), DType::F32).unwrap();
        fl.forward(&g, (&qr, &kr, &v), &o, &lse).unwrap();
        assert_warp_specialized_agrees(&g, fl, (&qr, &kr, &v), &o, &lse, &dout, &what);
    }
}

/// The gate over the fused gate/up projection's rows (g then u in each row of 2F) gives the bits
/// of the gate over g and u apart, both ways: F = 64 (16-byte accesses) and F = 301 (each
/// row's pieces unaligned: one element at a time).
#[test]
fn silu_gate_over_fused_rows_matches_the_split_one() {
    use ternlab::cuda::{mlp, Gpu};
    let dev = gpu();
    let g = Gpu::of(&dev).unwrap();
    for (rows, f) in [(5, 64), (3, 301)] {
        for dtype in [DType::F32, DType::BF16] {
            let gu = randn((rows, 2 * f), 2.0, dtype, &dev);
            let dy = randn((rows, f), 1.0, dtype, &dev);
            let half = |t: &Tensor, at: usize| t.narrow(1, at, f).unwrap().contiguous().unwrap();
            let (gg, uu) = (half(&gu, 0), half(&gu, f));
            let (y1, y2) = (dy.zeros_like().unwrap(), dy.zeros_like().unwrap());
            mlp::silu_mul_halves(&g, &gu, &y1).unwrap();
            mlp::silu_mul(&g, &gg, &uu, &y2).unwrap();
            let dgu = gu.zeros_like().unwrap();
            mlp::silu_mul_halves_back(&g, &gu, &dy, &dgu).unwrap();
            let (dg, du) = (dy.zeros_like().unwrap(), dy.zeros_like().unwrap());
            mlp::silu_mul_back(&g, &gg, &uu, &dy, &dg, &du).unwrap();
            for (name, a, b) in [
                ("y", y1, y2),
                ("dg", half(&dgu, 0), dg),
                ("du", half(&dgu, f), du),
            ] {
                let diff = max_abs(&(f32_of(&a) - f32_of(&b)).unwrap());
                assert_eq!(diff, 0.0, "{rows}x{f} {dtype:?}: {name}");
            }
        }
    }
}

#[test]
fn silu_gate_matches_the_composed_one() {
    let dev = gpu();
    // Eight elements a thread (16-byte accesses), with a last thread of 4 elements and of 7
    // (one at a time).
    for (rows, cols) in [(5, 300), (3, 301)] {
        for dtype in [DType::F32, DType::BF16] {
            let g = var(&[rows, cols], 2.0, dtype, &dev);
            let u = var(&[rows, cols], 1.0, dtype, &dev);
            // Measured on an H100: f32 1.1e-7; bf16 values 6.7e-3, gradients 4.1e-3.
            let t = tol(dtype, 1e-6, 2e-2);
            let gate = |o| ops::silu_mul(g.as_tensor(), u.as_tensor(), o).unwrap();
            assert_agree(
                &format!("{rows}x{cols} {dtype:?}"),
                &[&g, &u],
                gate(Ops::Fused),
                gate(Ops::Composed),
                t,
                t,
            );
        }
    }
}

#[test]
fn cross_entropy_matches_the_composed_one() {
    let dev = gpu();
    // A Qwen3-sized vocabulary (eight logits per access), an even one that is not a multiple of
    // eight (pairs), and a small odd one (one at a time).
    // The bound on bf16 gradients: measured 5e-10 at V = 151,936 (H100, H200) and 1.4e-4 at
    // V = 302 (H200: one element's bf16 rounding apart, the gradients being ~1 / V).
    for (v, bf16_grad) in [(151_936usize, 1e-4), (302, 3e-4), (37, 1e-4)] {
        for dtype in [DType::F32, DType::BF16] {
            let x = var(&[2, 9, v], 3.0, dtype, &dev);
            let t: Vec<u32> = (0..18u32).map(|i| (i * 7919) % v as u32).collect();
            let t = Tensor::from_vec(t, (2, 9), &dev).unwrap();
            let loss = |o| ops::cross_entropy_with(x.as_tensor(), &t, o).unwrap();
            // The loss is f32 either way, the logits' gradient in their dtype, both computed in
            // f32 and rounded once. Measured on an H100: loss 1.3e-7, f32 gradients 4.0e-7,
            // bf16 gradients 5e-10 (a bf16 ulp is 4e-3).
            assert_agree(
                &format!("V={v} {dtype:?}"),
                &[&x],
                loss(Ops::Fused),
                loss(Ops::Composed),
                1e-6,
                tol(dtype, 2e-6, bf16_grad),
            );
        }
    }
}

#[test]
fn activation_quantization_matches_the_composed_one() {
    let dev = gpu();
    for dtype in [DType::F32, DType::BF16] {
        let x = var(&[7, 1024], 3.0, dtype, &dev);
        // Both compute in f32 with one IEEE rounding per operation (the same products,
        // quotients and round-half-away), so they should agree to the bit; the gradient is the
        // identity in both.
        let y = |o| ops::act_quant(x.as_tensor(), o).unwrap();
        assert_agree(
            &format!("{dtype:?}"),
            &[&x],
            y(Ops::Fused),
            y(Ops::Composed),
            1e-6,
            1e-12,
        );
    }
}

/// A launcher checks its buffers against the kernel's signature before launching: a buffer of
/// the wrong size or dtype (two arguments swapped, say) is an error that names the argument,
/// not a kernel reading past the end.
#[test]
fn launchers_refuse_buffers_that_do_not_fit() {
    use ternlab::cuda::{loss, norm, Gpu};
    let dev = gpu();
    let g = Gpu::of(&dev).unwrap();
    let x = Tensor::zeros((4, 64), DType::F32, &dev).unwrap();
    let w = Tensor::ones(64, DType::F32, &dev).unwrap();
    let short = Tensor::zeros((4, 32), DType::F32, &dev).unwrap();
    let err = |r: candle_core::Result<()>| r.unwrap_err().to_string();
    let e = err(norm::rmsnorm(&g, &x, &w, &short, 1e-6));
    assert!(e.contains("rmsnorm: y"), "{e}");
    let e = err(norm::rmsnorm(
        &g,
        &x,
        &w.to_dtype(DType::BF16).unwrap(),
        &x,
        1e-6,
    ));
    assert!(e.contains("rmsnorm: w"), "{e}");
    // Logits and targets swapped.
    let targets = Tensor::zeros(4, DType::U32, &dev).unwrap();
    let rows = Tensor::zeros(4, DType::F32, &dev).unwrap();
    let e = err(loss::cross_entropy(&g, &targets, &x, &rows, None));
    assert!(e.contains("cross_entropy: targets"), "{e}");
    // The right buffers run.
    norm::rmsnorm(&g, &x, &w, &x.zeros_like().unwrap(), 1e-6).unwrap();
    loss::cross_entropy(&g, &x, &targets, &rows, None).unwrap();
}

/// The hand-written CUDA training step (`trainer::cuda_step`: no autograd graph) against the
/// composed graph and candle's autograd on the same GPU: the loss and every parameter's
/// gradient, tied and untied heads, ternary and dense projections, f32 and bf16.
#[test]
fn hand_written_step_matches_autograd() {
    use ternlab::model::load::random_weights;
    use ternlab::model::{Preset, Projection, Qwen3, Qwen3Config, TernarySpec};
    use ternlab::trainer::Trainer;
    let dev = gpu();
    for tied in [true, false] {
        // Grouped-query attention (4 query heads on 2 key/value heads), a sequence length
        // that is no multiple of 32.
        // An odd vocabulary (the loss kernel's one-logit path) and an even one (pairs).
        let vocab = if tied { 301 } else { 300 };
        let mut cfg = Qwen3Config::preset(Preset::Tiny, vocab);
        cfg.num_hidden_layers = 2;
        cfg.tie_word_embeddings = tied;
        // A hidden size past 1024 (the RMSNorm backward's two-kernel path), and 256 (its
        // vectorized one-kernel path, which adds into the residual stream's gradient).
        cfg.hidden_size = if tied { 256 } else { 1056 };
        // Head dim 64: under flash attention (bf16) q, k and v run as one GEMM each way, read
        // and written in place by the norm + RoPE and attention kernels; 32: as three.
        cfg.head_dim = if tied { 64 } else { 32 };
        let ternary = TernarySpec::new(
            vec![
                Projection::Q,
                Projection::V,
                Projection::O,
                Projection::Up,
                Projection::Down,
            ],
            ternlab::spec::GroupSize::Columns(32),
        );
        for dense in [DType::F32, DType::BF16] {
            // Dense parameters in f32 (the step's arithmetic against autograd's), and in the
            // checkpoint's bf16 (the seed's default), where autograd's gradients of them are bf16.
            let weights = random_weights(&cfg, 3)
                .unwrap()
                .into_iter()
                .map(|(k, t)| (k, t.to_dtype(dense).unwrap()))
                .collect();
            let (model, params) = Qwen3::new(&cfg, weights, &ternary, &dev).unwrap();
            let ids: Vec<u32> = (0..3 * 37u32)
                .map(|i| (i * 7919 + 5) % vocab as u32)
                .collect();
            let x = Tensor::from_vec(ids.clone(), (3, 37), &dev).unwrap();
            let y = Tensor::from_vec(
                ids[1..].iter().chain(&[7]).copied().collect(),
                (3, 37),
                &dev,
            )
            .unwrap();
            for dtype in [DType::F32, DType::BF16] {
                let run = |fused: bool, chunk: Option<usize>, dq_atomic: bool| {
                    // The untied model halfway through a quantization warm-up.
                    let lambda = if tied { 1.0 } else { 0.5 };
                    let m = model
                        .with_quant_lambda(lambda)
                        .with_compute_dtype(dtype)
                        .with_fused(fused);
                    let mut trainer = Trainer::for_model(&m);
                    let want = if fused { "cuda-step" } else { "autograd" };
                    assert_eq!(trainer.name(), want);
                    if let Some(c) = chunk {
                        // Blocked attention (not flash, which bf16 runs by default), and the
                        // probabilities recomputed in the backward.
                        trainer = trainer
                            .with_flash_attention(false)
                            .with_attention_chunk(c)
                            .with_attention_recompute(true);
                    }
                    if dq_atomic {
                        // flash's query gradient through atomic adds (the default from 2,048
                        // positions)
                        trainer = trainer.with_flash_dq_kernel(false);
                    }
                    let fwd = trainer.forward(&m, &x, &y).unwrap();
                    let loss = fwd.loss.to_scalar::<f32>().unwrap();
                    (loss, fwd.backward(&m).unwrap())
                };
                let (loss_c, g_c) = run(false, None, false);
                // Attention as the step chooses it (bf16: flash; f32: in one block with its
                // probabilities kept), in bf16 also with flash's query gradient added
                // atomically, and in blocks of 16 positions (16, 16, 5) with the probabilities
                // recomputed.
                let atomic = [(None, true)];
                let variants = [(None, false), (Some(16), false)]
                    .into_iter()
                    .chain(atomic.into_iter().filter(|_| dtype == DType::BF16));
                for (chunk, dq_atomic) in variants {
                    let (loss_h, g_h) = run(true, chunk, dq_atomic);
                    let what = format!(
                        "tied={tied} {dtype:?} dense {dense:?} chunk={chunk:?} dq atomic \
                         {dq_atomic}"
                    );
                    let t = match (dtype, dense) {
                        (DType::F32, DType::F32) => 1e-4,
                        // autograd rounds a bf16 parameter's gradient to bf16 (and sums the
                        // embedding's in bf16); the step keeps f32
                        (DType::F32, _) => 1e-2,
                        // measured up to 3.1e-2 (the untied q_norm weights, H200)
                        _ => 4e-2,
                    };
                    assert!(
                        ((loss_h - loss_c) / loss_c).abs() < t as f32 / 10.0,
                        "{what}: loss {loss_h} vs {loss_c}"
                    );
                    // One gradient per parameter and nothing else (autograd's store also holds
                    // intermediate tensors' gradients).
                    assert_eq!(g_h.get_ids().count(), params.named.len(), "{what}");
                    for (name, v) in &params.named {
                        let (a, b) = (g_h.get(v).unwrap(), g_c.get(v).unwrap());
                        // A projection's and an untied head's weight gradient in the products'
                        // dtype (autograd's of a bf16 product is bf16 too), a bf16 embedding's
                        // in bf16 under bf16 compute, every other one in f32.
                        let product = name.ends_with("proj.weight") || name == "lm_head.weight";
                        let emb_bf16 = dtype == DType::BF16 && dense == DType::BF16;
                        let want = match name.as_str() {
                            _ if product => dtype,
                            "model.embed_tokens.weight" if emb_bf16 => DType::BF16,
                            _ => DType::F32,
                        };
                        assert_eq!(a.dtype(), want, "{what}: {name} gradient dtype");
                        let err = rel_err(a, b);
                        eprintln!("{what} {name}: relative error {err:e}");
                        assert!(err < t, "{what}: gradient of {name} differs by {err:e}");
                    }
                }
            }
        }
    }
}

/// The hand-written step with 8-bit activations against autograd. Rounding to 255 levels is
/// discontinuous: an activation within float noise of a rounding boundary (the two paths sum
/// in different orders) lands one level apart, and every later layer sees that difference, so
/// this compares one decoder layer, in f32, with one ternary projection at a time (each input
/// of the step quantized alone), to bounds above what was measured on an H100 (loss within
/// 1.4e-6, gradients within 3.4e-3; with two layers and every input quantized at once, the
/// flips cascade to 2.7e-4 in the loss).
#[test]
fn hand_written_step_with_8_bit_activations_tracks_autograd() {
    use ternlab::model::load::random_weights;
    use ternlab::model::{Preset, Projection, Qwen3, Qwen3Config, TernarySpec};
    use ternlab::trainer::Trainer;
    let dev = gpu();
    let mut cfg = Qwen3Config::preset(Preset::Tiny, 300);
    cfg.num_hidden_layers = 1;
    let ids: Vec<u32> = (0..3 * 37u32).map(|i| (i * 7919 + 5) % 300).collect();
    let x = Tensor::from_vec(ids.clone(), (3, 37), &dev).unwrap();
    let y = Tensor::from_vec(ids.iter().map(|i| (i + 1) % 300).collect(), (3, 37), &dev).unwrap();
    for proj in [
        Projection::Q,
        Projection::V,
        Projection::O,
        Projection::Up,
        Projection::Down,
    ] {
        let mut ternary = TernarySpec::new(vec![proj], ternlab::spec::GroupSize::Columns(32));
        ternary.activation_bits = 8;
        let weights = random_weights(&cfg, 3)
            .unwrap()
            .into_iter()
            .map(|(k, t)| (k, t.to_dtype(DType::F32).unwrap()))
            .collect();
        let (model, params) = Qwen3::new(&cfg, weights, &ternary, &dev).unwrap();
        let run = |fused: bool| {
            let m = model.clone().with_fused(fused);
            let fwd = Trainer::for_model(&m).forward(&m, &x, &y).unwrap();
            let loss = fwd.loss.to_scalar::<f32>().unwrap();
            (loss, fwd.backward(&m).unwrap())
        };
        let ((loss_h, g_h), (loss_c, g_c)) = (run(true), run(false));
        let what = format!("{proj:?}");
        let dl = ((loss_h - loss_c) / loss_c).abs();
        eprintln!("{what}: loss {dl:e}");
        assert!(dl < 1e-5, "{what}: loss {loss_h} vs {loss_c}");
        for (name, v) in &params.named {
            let err = rel_err(g_h.get(v).unwrap(), g_c.get(v).unwrap());
            eprintln!("{what} {name}: {err:e}");
            assert!(err < 1e-2, "{what}: gradient of {name} differs by {err:e}");
        }
    }
}

/// Distillation through the hand-written step against autograd: the same teacher logits (the
/// bf16 teacher's), the loss and its two terms, and every gradient, f32.
#[test]
fn hand_written_step_distills_like_autograd() {
    use ternlab::choice::Choice;
    use ternlab::model::load::random_weights;
    use ternlab::model::{Preset, Projection, Qwen3, Qwen3Config, TernarySpec};
    use ternlab::trainer::{Distill, Trainer};
    let dev = gpu();
    let mut cfg = Qwen3Config::preset(Preset::Tiny, 300);
    cfg.num_hidden_layers = 2;
    let ternary = TernarySpec::new(
        Projection::ALL.to_vec(),
        ternlab::spec::GroupSize::Columns(32),
    );
    let weights = random_weights(&cfg, 3)
        .unwrap()
        .into_iter()
        .map(|(k, t)| (k, t.to_dtype(DType::F32).unwrap()))
        .collect();
    let (model, params) = Qwen3::new(&cfg, weights, &ternary, &dev).unwrap();
    let ids: Vec<u32> = (0..3 * 37u32).map(|i| (i * 7919 + 5) % 300).collect();
    let x = Tensor::from_vec(ids.clone(), (3, 37), &dev).unwrap();
    let y = Tensor::from_vec(ids.iter().map(|i| (i + 1) % 300).collect(), (3, 37), &dev).unwrap();
    let teacher = model
        .teacher()
        .unwrap()
        .with_fused(true)
        .forward(&x)
        .unwrap();
    let d = Distill {
        teacher_logits: &teacher,
        weight: 0.7,
        temperature: 3.0,
    };
    let run = |fused: bool| {
        let m = model.clone().with_fused(fused);
        let fwd = Trainer::for_model(&m)
            .forward_distilled(&m, &x, &y, Some(&d))
            .unwrap();
        let s = |t: &Tensor| t.to_scalar::<f32>().unwrap();
        let terms = (s(&fwd.loss), s(&fwd.ce), s(fwd.kl.as_ref().unwrap()));
        (terms, fwd.backward(&m).unwrap())
    };
    let ((h, g_h), (c, g_c)) = (run(true), run(false));
    // Measured on an H100: cross-entropy 8e-8, KL 7.3e-6 relative (the kernel's fast
    // exponentials and logarithms against candle's).
    for (what, a, b, tol) in [
        ("loss", h.0, c.0, 1e-5),
        ("ce", h.1, c.1, 1e-6),
        ("kl", h.2, c.2, 3e-5),
    ] {
        let err = ((a - b) / b).abs();
        eprintln!("{what}: {a} vs {b} ({err:e})");
        assert!(err < tol, "{what}: {a} vs {b}");
    }
    for (name, v) in &params.named {
        let err = rel_err(g_h.get(v).unwrap(), g_c.get(v).unwrap());
        eprintln!("{name}: {err:e}");
        assert!(err < 1e-4, "gradient of {name} differs by {err:e}");
    }
}

/// Learned scales (`quant.scale = "learned"`) through the hand-written step against autograd:
/// the forward at the layer's own scales (moved off their absmean start here) and LSQ's
/// gradient to them (`ternary_scale_grad` against `ste_weight_learned`'s graph), for groups of
/// 32 columns, rows and whole matrices (one block reduces 16k weights), fully ternary and
/// halfway through a warm-up, scales rounded to f32 and bf16.
#[test]
fn hand_written_step_learns_scales_like_autograd() {
    use ternlab::choice::Choice;
    use ternlab::model::load::random_weights;
    use ternlab::model::{Preset, Projection, Qwen3, Qwen3Config, TernarySpec};
    use ternlab::quant::{Granularity, ScaleDtype, ScaleRule};
    use ternlab::trainer::Trainer;
    let dev = gpu();
    let mut cfg = Qwen3Config::preset(Preset::Tiny, 300);
    cfg.num_hidden_layers = 2;
    let ids: Vec<u32> = (0..2 * 37u32).map(|i| (i * 7919 + 5) % 300).collect();
    let x = Tensor::from_vec(ids.clone(), (2, 37), &dev).unwrap();
    let y = Tensor::from_vec(
        ids[1..].iter().chain(&[7]).copied().collect(),
        (2, 37),
        &dev,
    )
    .unwrap();
    for granularity in [Granularity::Group, Granularity::Row, Granularity::Tensor] {
        for (scale_dtype, lambda) in [(ScaleDtype::F32, 1.0), (ScaleDtype::Bf16, 0.5)] {
            let mut ternary = TernarySpec::new(
                Projection::ALL.to_vec(),
                ternlab::spec::GroupSize::Columns(32),
            );
            ternary.granularity = granularity;
            ternary.scale = ScaleRule::Learned;
            ternary.scale_dtype = scale_dtype;
            let weights = random_weights(&cfg, 3)
                .unwrap()
                .into_iter()
                .map(|(k, t)| (k, t.to_dtype(DType::F32).unwrap()))
                .collect();
            let (model, params) = Qwen3::new(&cfg, weights, &ternary, &dev).unwrap();
            let mut scales = 0;
            for (name, v) in &params.named {
                if name.ends_with("weight_scale") {
                    scales += 1;
                    v.set(&(v.as_tensor() * 1.1).unwrap()).unwrap();
                }
            }
            assert_eq!(scales, 2 * 7);
            let run = |fused: bool| {
                let m = model.with_quant_lambda(lambda).with_fused(fused);
                let trainer = Trainer::for_model(&m);
                assert_eq!(trainer.name(), if fused { "cuda-step" } else { "autograd" });
                let fwd = trainer.forward(&m, &x, &y).unwrap();
                let loss = fwd.loss.to_scalar::<f32>().unwrap();
                (loss, fwd.backward(&m).unwrap())
            };
            let ((loss_h, g_h), (loss_c, g_c)) = (run(true), run(false));
            let what = format!("{granularity:?} {scale_dtype:?} lambda {lambda}");
            eprintln!("{what}: loss {loss_h} vs {loss_c}");
            assert!(((loss_h - loss_c) / loss_c).abs() < 1e-5, "{what}");
            assert_eq!(g_h.get_ids().count(), params.named.len(), "{what}");
            for (name, v) in &params.named {
                let err = rel_err(g_h.get(v).unwrap(), g_c.get(v).unwrap());
                eprintln!("{what} {name}: relative error {err:e}");
                // Measured on an H100: at most 9.0e-5 over every parameter, at the one scale of
                // a whole matrix (8192 products summed in another order, with cancellation).
                assert!(err < 4e-4, "{what}: gradient of {name} differs by {err:e}");
            }
        }
    }
}

/// Steps replayed from CUDA graphs (`trainer::Graphs`) against the same steps launch by launch:
/// a run through a quantization warm-up (lambda 0, 1/3, 2/3, then 1), a new batch every step,
/// learned scales, and absmean ones (whose projections the replayed AdamW update writes). The
/// warm-up's steps and the first step at lambda 1 run eagerly, the rest are captured once and
/// replayed; losses and parameters agree with the eager run's. They are not bitwise equal: the
/// norm weights' gradients (and an f32 embedding's) are summed with atomic adds, in any order.
#[test]
fn steps_replayed_from_cuda_graphs_match_eager_steps() {
    use ternlab::choice::Choice;
    use ternlab::model::load::random_weights;
    use ternlab::model::{Preset, Projection, Qwen3, Qwen3Config, TernarySpec};
    use ternlab::quant::ScaleRule;
    use ternlab::trainer::{Graphs, Trainer};
    let dev = gpu();
    let mut cfg = Qwen3Config::preset(Preset::Tiny, 300);
    cfg.num_hidden_layers = 2;
    // (bf16: flash attention, q, k and v as one GEMM, their projection kept as one)
    cfg.head_dim = 64;
    let (b, l, steps) = (2, 37, 9);
    let batch = |step: usize| {
        let ids: Vec<u32> = (0..(b * l) as u32 + 1)
            .map(|i| (i * 7919 + 5 + 13 * step as u32) % 300)
            .collect();
        let x = Tensor::from_vec(ids[..b * l].to_vec(), (b, l), &dev).unwrap();
        let y = Tensor::from_vec(ids[1..].to_vec(), (b, l), &dev).unwrap();
        (x, y)
    };
    // (the last: flash's query gradient through atomic adds, captured with its buffer's
    // clearing)
    for (dtype, scale, dq_atomic) in [
        (DType::F32, ScaleRule::Learned, false),
        (DType::BF16, ScaleRule::Learned, false),
        (DType::BF16, ScaleRule::Absmean, false),
        (DType::BF16, ScaleRule::Absmean, true),
    ] {
        let mut ternary = TernarySpec::new(
            Projection::ALL.to_vec(),
            ternlab::spec::GroupSize::Columns(32),
        );
        ternary.lambda_warmup_steps = 3;
        ternary.scale = scale;
        let run = |graphed: bool| {
            let weights = random_weights(&cfg, 3)
                .unwrap()
                .into_iter()
                .map(|(k, t)| (k, t.to_dtype(DType::F32).unwrap()))
                .collect();
            let (model, params) = Qwen3::new(&cfg, weights, &ternary, &dev).unwrap();
            let model = model.with_compute_dtype(dtype).with_fused(true);
            let adamw = adamw_params(1e-3, false);
            let mut opt = AdamW::new(params.vars(), adamw, true).unwrap();
            let trainer = Trainer::for_model(&model);
            let trainer = if dq_atomic {
                trainer.with_flash_dq_kernel(false)
            } else {
                trainer
            };
            let mut graphs = if graphed {
                Graphs::for_trainer(&trainer, &model, b, l).unwrap()
            } else {
                Graphs::off()
            };
            assert_eq!(graphs.on(), graphed);
            let (mut losses, mut replayed) = (Vec::new(), 0);
            for step in 0..steps {
                let (x, y) = batch(step);
                let m = model.at_step(step);
                opt.set_learning_rate(1e-3 * (1.0 - step as f64 / 20.0));
                let _cache = graphs.param_cache();
                match graphs.step(&m, &x, &y, &mut opt).unwrap() {
                    Some([loss, ce]) => {
                        assert_eq!(loss, ce, "no distillation: the loss is its CE term");
                        losses.push(loss);
                        replayed += 1;
                    }
                    None => {
                        let fwd = trainer.forward(&m, &x, &y).unwrap();
                        losses.push(fwd.loss.to_scalar::<f32>().unwrap());
                        let grads = fwd.backward(&m).unwrap();
                        opt.step(&grads).unwrap();
                    }
                }
            }
            assert_eq!(opt.steps_taken(), steps);
            // The replayed steps multiply by projections their AdamW update wrote, where the
            // scales are computed (learned ones are made in the step).
            assert_eq!(
                graphs.kept_projections() > 0,
                graphed && scale != ScaleRule::Learned,
                "{dtype:?} {scale:?}: {} projections kept",
                graphs.kept_projections()
            );
            let finals: Vec<Tensor> = params
                .vars()
                .iter()
                .map(|v| f32_of(v.as_tensor()).copy().unwrap())
                .collect();
            if graphed {
                // A replayed step whose loss is not finite updates nothing: the final norm's
                // first weight made NaN in place (the graph reads it where it is), the replay's
                // loss is NaN and every parameter keeps its bits.
                let (_, norm) = params
                    .named
                    .iter()
                    .find(|(n, _)| n == "model.norm.weight")
                    .unwrap();
                dev.synchronize().unwrap();
                let p = ternlab::cuda::AsBuf::buf(norm.as_tensor()).unwrap().p;
                // SAFETY: the f32 weight has at least one element; the device is idle.
                unsafe {
                    candle_core::cuda_backend::cudarc::driver::result::memcpy_htod_sync(
                        p,
                        &[f32::NAN],
                    )
                    .unwrap()
                };
                let bits = |ps: &ternlab::model::Params| -> Vec<Vec<u32>> {
                    ps.vars()
                        .iter()
                        .map(|v| {
                            f32_of(v.as_tensor())
                                .flatten_all()
                                .unwrap()
                                .to_vec1::<f32>()
                                .unwrap()
                                .iter()
                                .map(|x| x.to_bits())
                                .collect()
                        })
                        .collect()
                };
                let before = bits(&params);
                let (x, y) = batch(0);
                let m = model.at_step(steps);
                let [loss, _] = graphs.step(&m, &x, &y, &mut opt).unwrap().unwrap();
                assert!(loss.is_nan(), "{dtype:?}: loss {loss} with a NaN weight");
                assert!(
                    before == bits(&params),
                    "{dtype:?}: a step with a NaN loss changed a parameter"
                );
            }
            (losses, replayed, finals)
        };
        let (eager, _, p_eager) = run(false);
        let (graphed, replayed, p_graphed) = run(true);
        let what = format!("{dtype:?} {scale:?} dq atomic {dq_atomic}");
        // lambda 0, 1/3, 2/3 and the first step at 1 eagerly; then captured and replayed
        assert_eq!(replayed, steps - 4, "{what}: steps replayed");
        for (step, (a, b)) in graphed.iter().zip(&eager).enumerate() {
            let d = ((a - b) / b).abs();
            eprintln!("{what} step {step}: loss {a} vs {b} ({d:e})");
            assert!(d < 1e-5, "{what} step {step}: loss {a} replayed, {b} eager");
        }
        for (i, (a, b)) in p_graphed.iter().zip(&p_eager).enumerate() {
            let err = rel_err(a, b);
            assert!(err < 1e-4, "{what}: parameter {i} differs by {err:e}");
        }
        assert!(eager[steps - 1] < eager[0], "{what}: the loss went down");
    }
}
