//! The research knobs (`[quant]` granularity, scale, scale_dtype, exclude_layers,
//! lambda_warmup_steps, activation_bits; `[distill]`) and the recovery numbers, each by its
//! defining property on the tiny model, and through runs. Their defaults are the seed's (the
//! parity and seed-parity tests run with them).

mod common;

use candle_core::{DType, Device, Tensor};
use common::cli::run_tiny;
use ternlab::choice::Choice;
use ternlab::model::load::random_weights;
use ternlab::model::ternary::{group_scales, ternarize};
use ternlab::model::{Preset, Projection, Qwen3, Qwen3Config, TernarySpec};
use ternlab::quant::{Granularity, GroupSize, Quant, ScaleDtype, ScaleRule};

/// The tiny model (4 layers, hidden 128, intermediate 384) with every projection ternary under
/// `spec`'s quantizer settings.
fn tiny(edit: impl FnOnce(&mut TernarySpec)) -> Qwen3 {
    let cfg = Qwen3Config::preset(Preset::Tiny, 300);
    let mut spec = TernarySpec::new(Projection::ALL.to_vec(), GroupSize::Columns(32));
    edit(&mut spec);
    let weights = random_weights(&cfg, 5).unwrap();
    Qwen3::new(&cfg, weights, &spec, &Device::Cpu).unwrap().0
}

/// The distinct |W_t| values of `w` other than 0, by their bits.
fn levels(wt: &Tensor) -> std::collections::BTreeSet<u32> {
    let v = wt.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    v.iter()
        .filter(|x| **x != 0.0)
        .map(|x| x.abs().to_bits())
        .collect()
}

#[test]
fn tensor_granularity_has_one_scale_per_matrix() {
    let model = tiny(|s| s.granularity = Granularity::Tensor);
    let linears = model.ternary_linears();
    assert_eq!(linears.len(), 4 * 7);
    for lin in linears {
        let q = lin.quant().unwrap();
        let w = lin.weight();
        assert_eq!(q.group, w.elem_count(), "{}", lin.name());
        let wt = ternarize(w, q).unwrap();
        let l = levels(&wt);
        assert_eq!(l.len(), 1, "{}: one nonzero magnitude", lin.name());
        // That magnitude is the matrix's mean |W|.
        let mean = w
            .abs()
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let s = f32::from_bits(*l.first().unwrap());
        assert!(
            ((s - mean) / mean).abs() < 1e-6,
            "{}: {s} vs {mean}",
            lin.name()
        );
    }
}

#[test]
fn row_granularity_has_one_scale_per_row() {
    // Both spellings: granularity = "row", and the older group_size = "row".
    for model in [
        tiny(|s| s.granularity = Granularity::Row),
        tiny(|s| s.group_size = GroupSize::Row),
    ] {
        for lin in model.ternary_linears() {
            let w = lin.weight();
            let (out, inp) = w.dims2().unwrap();
            assert_eq!(lin.quant().unwrap().group, inp);
            let wt = ternarize(w, lin.quant().unwrap()).unwrap();
            for r in 0..out {
                assert!(
                    levels(&wt.get(r).unwrap()).len() <= 1,
                    "{} row {r}",
                    lin.name()
                );
            }
            assert!(levels(&wt).len() > 1, "{}: rows differ", lin.name());
        }
    }
}

#[test]
fn scales_are_values_of_their_dtype() {
    let model = tiny(|_| ());
    let w = model.ternary_linears()[0].weight().clone();
    let f32_scales = group_scales(&w, Quant::absmean(32)).unwrap();
    for (dtype, round) in [
        (
            ScaleDtype::F16,
            (|x: f32| half::f16::from_f32(x).to_f32()) as fn(f32) -> f32,
        ),
        (ScaleDtype::Bf16, |x: f32| half::bf16::from_f32(x).to_f32()),
    ] {
        let q = Quant {
            scale_dtype: dtype,
            ..Quant::absmean(32)
        };
        let s = group_scales(&w, q).unwrap().flatten_all().unwrap();
        let s = s.to_vec1::<f32>().unwrap();
        assert!(
            s.iter().all(|x| round(*x) == *x),
            "{dtype:?}: every scale is one"
        );
        // ... and the rounding happened: they are not all the f32 scales.
        let exact = f32_scales.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_ne!(s, exact, "{dtype:?}");
        // W_t's magnitudes are those scales.
        let wt = ternarize(&w, q).unwrap();
        assert!(levels(&wt)
            .iter()
            .all(|b| round(f32::from_bits(*b)) == f32::from_bits(*b)));
    }
}

#[test]
fn absmax_scales_put_each_groups_largest_weight_at_one() {
    let model = tiny(|s| s.scale = ScaleRule::Absmax);
    for lin in model.ternary_linears() {
        let q = lin.quant().unwrap();
        assert_eq!(q.scale, ScaleRule::Absmax);
        let w = lin.weight().reshape(((), q.group)).unwrap();
        let s = group_scales(&w, q).unwrap();
        let max = w.abs().unwrap().max_keepdim(1).unwrap();
        assert_eq!(
            s.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            max.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            "{}",
            lin.name()
        );
        // Every group's largest |w| is at level +-1, so W_t there is +-s.
        let wt = ternarize(&w, q)
            .unwrap()
            .abs()
            .unwrap()
            .max_keepdim(1)
            .unwrap();
        assert_eq!(
            wt.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            max.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }
}

#[test]
fn excluded_layers_stay_dense_in_the_checkpoints_dtype() {
    let model = tiny(|s| s.exclude_layers = vec![0, 2]);
    let linears = model.linears();
    assert_eq!(linears.len(), 4 * 7);
    for (i, lin) in linears.iter().enumerate() {
        let layer = i / 7;
        let dense = layer == 0 || layer == 2;
        assert_eq!(lin.is_ternary(), !dense, "{}", lin.name());
        // A ternary latent is f32; a dense projection keeps the checkpoint's bf16.
        let want = if dense { DType::BF16 } else { DType::F32 };
        assert_eq!(lin.weight().dtype(), want, "{}", lin.name());
    }
    assert_eq!(model.ternary_linears().len(), 2 * 7);
}

/// Every knob through `ternlab run`: the run completes, its report says what it used, and
/// `group_size` (here no divisor of the widths) does not apply under tensor granularity. A
/// default spec does not write the new keys, so its run id is what it was before them.
#[test]
fn a_run_with_every_knob_reports_them() {
    let tmp = tempfile::tempdir().unwrap();
    let set = [
        ("quant.granularity", "\"tensor\""),
        ("quant.group_size", "100"),
        ("quant.scale", "\"absmax\""),
        ("quant.scale_dtype", "\"f16\""),
        ("quant.exclude_layers", "[3]"),
        ("quant.lambda_warmup_steps", "1"),
        ("quant.activation_bits", "8"),
    ];
    let (_, report) = run_tiny(tmp.path(), "knobs", &set);
    assert_eq!(report["status"], "completed");
    assert_eq!(report["granularity"], "tensor");
    assert_eq!(report["scale"], "absmax");
    assert_eq!(report["scale_dtype"], "f16");
    assert_eq!(report["exclude_layers"], serde_json::json!([3]));
    assert_eq!(report["lambda_warmup_steps"], 1);
    assert_eq!(report["activation_bits"], 8);
    assert_eq!(report["n_ternary_layers"], 3 * 7);
    assert_eq!(report["ternary_ok"], true);

    let default_text = toml::to_string(&ternlab::spec::Spec::default()).unwrap();
    for key in [
        "granularity",
        "scale",
        "scale_dtype",
        "exclude_layers",
        "lambda_warmup_steps",
        "activation_bits",
    ] {
        assert!(
            !default_text
                .lines()
                .any(|l| l.starts_with(&format!("{key} ="))),
            "a default spec writes no `{key}`: {default_text}"
        );
    }
}

/// The tiny model's mean loss on one fixed batch, through autograd's forward.
fn loss_of(model: &Qwen3) -> f32 {
    let (x, y) = batch();
    let fwd = ternlab::trainer::Trainer::autograd()
        .forward(model, &x, &y)
        .unwrap();
    fwd.loss.to_scalar::<f32>().unwrap()
}

#[test]
fn lambda_zero_is_the_dense_model_and_one_the_ternary_one() {
    let dense = tiny(|s| s.projections.clear());
    assert!(dense.ternary_linears().is_empty());
    let ternary = tiny(|s| s.lambda_warmup_steps = 4);
    let (l_dense, l_ternary) = (loss_of(&dense), loss_of(&ternary));
    assert_ne!(l_dense, l_ternary);
    // Step 0 of the warm-up forwards the dense weights: the dense model's loss to the bit.
    assert_eq!(loss_of(&ternary.at_step(0)), l_dense);
    assert_eq!(loss_of(&ternary.with_quant_lambda(0.0)), l_dense);
    // From step N on it is the ternary model's, to the bit.
    assert_eq!(loss_of(&ternary.at_step(4)), l_ternary);
    assert_eq!(loss_of(&ternary.at_step(9)), l_ternary);
    // In between, neither.
    let half = loss_of(&ternary.at_step(2));
    assert!(half != l_dense && half != l_ternary, "{half}");
    let steps: Vec<f32> = (0..6).map(|t| ternary.quant_lambda(t)).collect();
    assert_eq!(steps, [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]);
    // Without a warm-up every step is fully ternary.
    assert_eq!(tiny(|_| ()).quant_lambda(0), 1.0);
}

/// Through `ternlab run`: the first step of a run with a warm-up trains the dense model (its
/// loss is the dense run's first loss), and the report says how long the warm-up was.
#[test]
fn a_warmup_run_starts_from_the_dense_models_loss() {
    let tmp = tempfile::tempdir().unwrap();
    let first_loss = |name: &str, set: &[(&str, &str)]| {
        let (run, report) = run_tiny(tmp.path(), name, set);
        let csv = std::fs::read_to_string(run.join("loss.csv")).unwrap();
        let row: Vec<String> = csv
            .lines()
            .nth(1)
            .unwrap()
            .split(',')
            .map(String::from)
            .collect();
        (row[2].clone(), report)
    };
    let (dense, _) = first_loss("dense", &[("quant.projections", "[]")]);
    let (warm, report) = first_loss("warm", &[("quant.lambda_warmup_steps", "2")]);
    let (plain, _) = first_loss("plain", &[]);
    assert_eq!(warm, dense, "step 0 at lambda = 0 is the dense model");
    assert_ne!(plain, dense);
    assert_eq!(report["lambda_warmup_steps"], 2);
    assert_eq!(report["status"], "completed");
}

#[test]
fn eight_bit_activations_leave_at_most_255_levels_per_token() {
    use ternlab::model::ternary::act_quant;
    // Rows of very different ranges, one of them all zeros.
    let x = (Tensor::randn(0f32, 1.0, (6, 700), &Device::Cpu).unwrap()
        * Tensor::from_vec(
            vec![1e-3f32, 0.1, 1.0, 30.0, 1e4, 0.0],
            (6, 1),
            &Device::Cpu,
        )
        .unwrap()
        .broadcast_as((6, 700))
        .unwrap())
    .unwrap();
    let var = candle_core::Var::from_tensor(&x).unwrap();
    let y = act_quant(var.as_tensor()).unwrap();
    let rows = y.to_vec2::<f32>().unwrap();
    let xs = x.to_vec2::<f32>().unwrap();
    for (r, (row, xr)) in rows.iter().zip(&xs).enumerate() {
        let distinct: std::collections::BTreeSet<u32> = row.iter().map(|v| v.to_bits()).collect();
        assert!(distinct.len() <= 255, "row {r}: {} levels", distinct.len());
        // Each value is within half a level of its input.
        let amax = xr.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-5);
        for (q, v) in row.iter().zip(xr) {
            assert!(
                (q - v).abs() <= amax / 127.0 * 0.5001,
                "row {r}: {v} -> {q}"
            );
        }
        if r < 5 {
            assert!(distinct.len() > 100, "row {r}: the levels are used");
        }
    }
    // The gradient is the straight-through identity.
    let up = Tensor::randn(0f32, 1.0, (6, 700), &Device::Cpu).unwrap();
    let g = (y * &up).unwrap().sum_all().unwrap().backward().unwrap();
    assert_eq!(
        g.get(&var).unwrap().to_vec2::<f32>().unwrap(),
        up.to_vec2::<f32>().unwrap()
    );
    // In a model: every ternary projection quantizes its input, the dense ones do not, and
    // the loss changes.
    let plain = tiny(|s| s.exclude_layers = vec![1]);
    let act = tiny(|s| {
        s.exclude_layers = vec![1];
        s.activation_bits = 8;
    });
    for lin in act.linears() {
        assert_eq!(
            lin.quantizes_activations(),
            lin.is_ternary(),
            "{}",
            lin.name()
        );
    }
    assert_ne!(loss_of(&plain), loss_of(&act));
}

/// The recovery numbers: the dense start is the model with every projection dense (the same
/// held-out NLL as a model built without ternary projections), the ternary start is the
/// rounded model before training, and the level shares add up over the ternary weights.
#[test]
fn recovery_measures_the_dense_and_ternary_start_and_the_levels() {
    use ternlab::recovery::Start;
    use ternlab::train::heldout_nll;
    let tokens: Vec<u32> = (0..400u32).map(|i| (i * 7919 + 11) % 300).collect();
    let nll = |m: &Qwen3| heldout_nll(m, &tokens, 16, 4);
    let dense = tiny(|s| s.projections.clear());
    let ternary = tiny(|s| s.activation_bits = 8);
    let start = Start::measure(&ternary, &nll).unwrap();
    let want_dense = nll(&dense.frozen().unwrap()).unwrap();
    let want_ternary = nll(&ternary.frozen().unwrap()).unwrap();
    let r = start.finish(&ternary, 5.0).unwrap();
    assert_eq!(
        r.nll_dense_start, want_dense,
        "the dense start is the dense model"
    );
    assert_eq!(r.nll_ternary_start, want_ternary);
    assert_ne!(want_dense, want_ternary);
    assert_eq!(r.nll_trained, 5.0);
    let gap = (want_ternary - 5.0) / (want_ternary - want_dense);
    if want_ternary > want_dense {
        assert_eq!(r.gap_recovered, gap);
    } else {
        assert!(
            r.gap_recovered.is_nan(),
            "no gap to recover: {}",
            r.gap_recovered
        );
    }
    use ternlab::recovery::gap_recovered;
    assert_eq!(gap_recovered(2.0, 3.0, 2.5), 0.5);
    assert_eq!(gap_recovered(2.0, 3.0, 1.5), 1.5);
    assert!(gap_recovered(3.0, 2.0, 2.5).is_nan());
    // Untrained: nothing changed level; the shares cover every ternary weight.
    let all = &r.levels["all"];
    let n: usize = ternary
        .ternary_linears()
        .iter()
        .map(|l| l.weight().elem_count())
        .sum();
    assert_eq!(all.weights, n);
    assert_eq!(all.changed, 0.0);
    assert!((all.minus + all.zero + all.plus - 1.0).abs() < 1e-12);
    assert_eq!(r.levels.len(), 8, "seven projection types and all");
    assert_eq!(r.levels["q_proj"].weights, 4 * 128 * 128);
}

/// A run's report carries them, its `nll_trained` is its `val_nll`, and training moved some
/// weights to another level.
#[test]
fn a_runs_report_has_its_recovery() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, report) = run_tiny(tmp.path(), "r", &[]);
    let r = &report["recovery"];
    assert_eq!(r["nll_trained"], report["val_nll"]);
    for k in ["nll_dense_start", "nll_ternary_start"] {
        assert!(r[k].as_f64().unwrap().is_finite(), "{k}: {r}");
    }
    // From the tiny preset's random init rounding costs nothing: no gap, null.
    let (dense, ternary) = (
        r["nll_dense_start"].as_f64(),
        r["nll_ternary_start"].as_f64(),
    );
    assert_eq!(r["gap_recovered"].is_null(), ternary <= dense, "{r}");
    let all = &r["levels"]["all"];
    assert_eq!(all["weights"], report["n_ternary_params"]);
    let changed = all["changed"].as_f64().unwrap();
    assert!(changed > 0.0 && changed < 1.0, "{changed}");
}

/// One fixed batch of the tiny vocabulary.
fn batch() -> (Tensor, Tensor) {
    let ids: Vec<u32> = (0..2 * 17u32).map(|i| (i * 7919 + 3) % 300).collect();
    let x = Tensor::from_vec(ids.clone(), (2, 17), &Device::Cpu).unwrap();
    let y = Tensor::from_vec(
        ids.iter().map(|i| (i + 1) % 300).collect(),
        (2, 17),
        &Device::Cpu,
    )
    .unwrap();
    (x, y)
}

#[test]
fn distillation_weight_zero_is_no_distillation() {
    use ternlab::trainer::{Distill, Trainer};
    let (model, params) = {
        let cfg = Qwen3Config::preset(Preset::Tiny, 300);
        let spec = TernarySpec::new(Projection::ALL.to_vec(), GroupSize::Columns(32));
        Qwen3::new(&cfg, random_weights(&cfg, 5).unwrap(), &spec, &Device::Cpu).unwrap()
    };
    let (x, y) = batch();
    let teacher = model.teacher().unwrap().forward(&x).unwrap();
    let plain = Trainer::autograd().forward(&model, &x, &y).unwrap();
    let d = Distill {
        teacher_logits: &teacher,
        weight: 0.0,
        temperature: 5.0,
    };
    let zero = Trainer::autograd()
        .forward_distilled(&model, &x, &y, Some(&d))
        .unwrap();
    let kl = zero.kl.as_ref().unwrap().to_scalar::<f32>().unwrap();
    assert!(kl > 0.0, "a ternary student is not its dense teacher: {kl}");
    let (l0, l1) = (
        plain.loss.to_scalar::<f32>().unwrap(),
        zero.loss.to_scalar::<f32>().unwrap(),
    );
    assert_eq!(l0, l1);
    let (g0, g1) = (
        plain.backward(&model).unwrap(),
        zero.backward(&model).unwrap(),
    );
    for (name, v) in &params.named {
        let (a, b) = (g0.get(v).unwrap(), g1.get(v).unwrap());
        let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        let d = d.to_dtype(DType::F32).unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(d, 0.0, "{name}");
    }
}

#[test]
fn the_kl_term_vanishes_on_the_teacher_and_has_the_softmax_gradient() {
    use ternlab::model::ops::distill_kl;
    // The student at lambda = 0 is the starting model: the same logits as the teacher.
    let model = tiny(|s| s.lambda_warmup_steps = 10);
    let (x, _) = batch();
    let teacher = model.teacher().unwrap().forward(&x).unwrap();
    let student = model.at_step(0).forward(&x).unwrap();
    let kl = distill_kl(&student, &teacher, 5.0).unwrap();
    assert_eq!(kl.to_scalar::<f32>().unwrap(), 0.0);
    // d/ds of T^2 KL(softmax(t/T) || softmax(s/T)), mean over N rows, is
    // T (softmax(s/T) - softmax(t/T)) / N: what the CUDA kernel writes.
    // Deterministic logits of a few units (sines of a ramp).
    let logits = |phase: f64| {
        let r = Tensor::arange(0u32, 6 * 37, &Device::Cpu).unwrap();
        let r = r.to_dtype(DType::F32).unwrap().reshape((6, 37)).unwrap();
        (((r * 0.7).unwrap() + phase).unwrap().sin().unwrap() * 3.0).unwrap()
    };
    let s = candle_core::Var::from_tensor(&logits(0.0)).unwrap();
    let t = logits(1.3);
    let temp = 2.5;
    let g = distill_kl(s.as_tensor(), &t, temp)
        .unwrap()
        .backward()
        .unwrap();
    let sm = |x: &Tensor| candle_nn::ops::softmax(&(x * (1.0 / temp)).unwrap(), 1).unwrap();
    let want = ((sm(s.as_tensor()) - sm(&t)).unwrap() * (temp / 6.0)).unwrap();
    let err = (g.get(&s).unwrap() - want)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    // Measured 4.2e-8 (entries up to 0.4: a few f32 ulps).
    eprintln!("KL gradient: {err:e} from the formula");
    assert!(err < 1e-7, "{err:e}");
}

/// Through a run: the report splits the loss into its two terms, and the loss curve is their
/// weighted sum.
#[test]
fn a_distilled_run_reports_both_loss_terms() {
    let tmp = tempfile::tempdir().unwrap();
    let set = [("distill.weight", "0.5"), ("distill.temperature", "2.0")];
    let (_, report) = run_tiny(tmp.path(), "d", &set);
    let d = &report["distill"];
    assert_eq!(d["weight"], 0.5);
    assert_eq!(d["temperature"], 2.0);
    let (ce, kl) = (
        d["final_ce"].as_f64().unwrap(),
        d["final_kl"].as_f64().unwrap(),
    );
    assert!(kl > 0.0 && ce > 0.0, "{d}");
    let last = report["final_loss"].as_f64().unwrap();
    assert!(
        ((ce + 0.5 * kl) - last).abs() < 1e-5 * last,
        "{ce} + 0.5 {kl} vs {last}"
    );
}

/// The tiny model of `tiny` with learned scales, and its parameters.
fn tiny_learned(edit: impl FnOnce(&mut TernarySpec)) -> (Qwen3, ternlab::model::Params) {
    let cfg = Qwen3Config::preset(Preset::Tiny, 300);
    let mut spec = TernarySpec::new(Projection::ALL.to_vec(), GroupSize::Columns(32));
    spec.scale = ScaleRule::Learned;
    edit(&mut spec);
    Qwen3::new(&cfg, random_weights(&cfg, 5).unwrap(), &spec, &Device::Cpu).unwrap()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

#[test]
fn learned_scales_start_at_the_absmean_and_are_parameters() {
    let absmean = tiny(|_| ());
    let (learned, params) = tiny_learned(|_| ());
    // Initialised from the absmean, the learned model computes the seed's model exactly.
    assert_eq!(loss_of(&learned), loss_of(&absmean));
    for lin in learned.ternary_linears() {
        let s = lin.learned_scale().expect("a learned scale");
        let (out, inp) = lin.weight().dims2().unwrap();
        assert_eq!(s.dims(), &[out, inp / 32], "{}", lin.name());
        let name = lin.name().replace(".weight", ".weight_scale");
        assert!(params.get(&name).is_some(), "{name} is a parameter");
        let init = group_scales(lin.weight(), lin.quant().unwrap()).unwrap();
        assert_eq!(flat(s), flat(&init), "{}", lin.name());
    }
    // One per ternary layer on top of the checkpoint's tensors.
    assert_eq!(params.named.len(), 1 + 4 * 11 + 1 + 4 * 7);
}

/// LSQ's gradient of a group's scale, from the weights' gradient (the straight-through
/// estimator passes dW_t to W unchanged, so it is the latent's gradient), written out here
/// independently of the library: `sum dW * (q - x)` over the weights with |x| <= 1 and
/// `sum dW * q` over the others, x = w / s, q = round(clip(x, -1, 1)), times 1 / sqrt(group)
/// and lambda.
fn lsq_grad(w: &[f32], dw: &[f32], s: &[f32], group: usize, lambda: f32) -> Vec<f64> {
    let gs = 1.0 / (group as f64).sqrt();
    s.iter()
        .enumerate()
        .map(|(i, &s)| {
            let range = i * group..(i + 1) * group;
            let mut acc = 0f64;
            for (w, dw) in w[range.clone()].iter().zip(&dw[range]) {
                let x = w / s;
                let q = if x.abs() > 0.5 { x.signum() } else { 0.0 };
                let d = if x.abs() <= 1.0 { q - x } else { q };
                acc += (*dw as f64) * d as f64;
            }
            acc * gs * lambda as f64
        })
        .collect()
}

#[test]
fn a_learned_scale_gets_the_lsq_gradient_and_moves() {
    for (granularity, lambda) in [(Granularity::Group, 1.0), (Granularity::Row, 0.5)] {
        let (model, params) = tiny_learned(|s| {
            s.granularity = granularity;
            s.lambda_warmup_steps = 2;
        });
        let model = model.with_quant_lambda(lambda);
        let (x, y) = batch();
        let fwd = ternlab::trainer::Trainer::autograd()
            .forward(&model, &x, &y)
            .unwrap();
        let grads = fwd.backward(&model).unwrap();
        let mut worst = 0f64;
        for lin in model.ternary_linears() {
            let q = lin.quant().unwrap();
            let s = lin.learned_scale().unwrap();
            let ds = flat(grads.get(s).expect("the scale has a gradient"));
            let dw = flat(grads.get(lin.weight()).unwrap());
            let want = lsq_grad(&flat(lin.weight()), &dw, &flat(s), q.group, lambda);
            let top = want.iter().fold(0f64, |m, v| m.max(v.abs()));
            assert!(top > 0.0, "{}: no gradient", lin.name());
            for (a, b) in ds.iter().zip(&want) {
                worst = worst.max((*a as f64 - b).abs() / top);
            }
        }
        // f32 sums over a group in another order: measured 2.4e-7 of the largest.
        eprintln!("{granularity:?} lambda {lambda}: worst {worst:e} of the largest");
        assert!(worst < 1e-6, "{granularity:?}: {worst:e}");

        // One AdamW step at the scale's own learning rate moves every scale.
        let spec = ternlab::spec::TrainSpec::default();
        let mut opt = ternlab::optim::AdamW::for_params(&params, &spec, false).unwrap();
        let before: Vec<Vec<f32>> = model
            .ternary_linears()
            .iter()
            .map(|l| flat(l.learned_scale().unwrap()))
            .collect();
        opt.step(&grads).unwrap();
        for (lin, b) in model.ternary_linears().iter().zip(&before) {
            let after = flat(lin.learned_scale().unwrap());
            let moved = after.iter().zip(b).filter(|(a, b)| a != b).count();
            assert!(
                moved * 10 > after.len() * 9,
                "{}: {moved} moved",
                lin.name()
            );
        }
    }
}

#[test]
fn the_scale_learning_rate_multiplies_the_scales_step_only() {
    let step_of = |mult: f64| {
        let (model, params) = tiny_learned(|s| s.scale_lr = mult);
        let (x, y) = batch();
        let grads = ternlab::trainer::Trainer::autograd()
            .forward(&model, &x, &y)
            .unwrap()
            .backward(&model)
            .unwrap();
        let spec = ternlab::spec::TrainSpec {
            warmup_steps: 0,
            ..Default::default()
        };
        let mut opt = ternlab::optim::AdamW::for_params(&params, &spec, false).unwrap();
        let lin = model.ternary_linears()[0];
        let (s0, w0) = (flat(lin.learned_scale().unwrap()), flat(lin.weight()));
        opt.step(&grads).unwrap();
        let (s1, w1) = (flat(lin.learned_scale().unwrap()), flat(lin.weight()));
        let delta = |a: &[f32], b: &[f32]| -> f64 {
            a.iter().zip(b).map(|(a, b)| (a - b).abs() as f64).sum()
        };
        (delta(&s1, &s0), delta(&w1, &w0))
    };
    let (s1, w1) = step_of(1.0);
    let (s4, w4) = step_of(4.0);
    assert_eq!(w1, w4, "the weights' step does not change");
    // AdamW's first step is lr * sign(g) in effect: 4x the lr, 4x the step (to f32 rounding).
    assert!((s4 / s1 - 4.0).abs() < 1e-3, "{s1} {s4}");
}

#[test]
fn a_run_with_learned_scales_trains_them() {
    let tmp = tempfile::tempdir().unwrap();
    let set = [
        ("quant.group_size", "32"),
        ("quant.scale", "\"learned\""),
        ("quant.scale_lr", "2.0"),
        ("train.steps", "3"),
    ];
    let (_, report) = run_tiny(tmp.path(), "learned", &set);
    assert_eq!(report["status"], "completed");
    assert_eq!(report["scale"], "learned");
    assert_eq!(report["config"]["quant"]["scale_lr"], 2.0);
    assert_eq!(report["ternary_ok"], true);
    // The tiny preset plus one scale tensor per ternary layer.
    let n_params = report["n_params"].as_u64().unwrap() as usize;
    let (_, plain) = run_tiny(tmp.path(), "absmean", &[("quant.group_size", "32")]);
    let scales: usize = (0..4)
        .map(|_| (128 * 128 + 2 * 64 * 128 + 128 * 128 + 2 * 384 * 128 + 128 * 384) / 32)
        .sum();
    assert_eq!(
        n_params,
        plain["n_params"].as_u64().unwrap() as usize + scales
    );
}
