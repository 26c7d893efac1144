//! The quantizer's knobs (`[quant]` granularity, scale, scale_dtype, exclude_layers), each by
//! its defining property on the tiny model, and all of them through a run. Their defaults are
//! the seed's quantizer (the parity and seed-parity tests run with them).

mod common;

use candle_core::{DType, Device, Tensor};
use common::cli::{on_spec, spec_text, write_spec};
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
    let results = tmp.path().join("results");
    let set = [
        ("quant.granularity", "\"tensor\""),
        ("quant.group_size", "100"),
        ("quant.scale", "\"absmax\""),
        ("quant.scale_dtype", "\"f16\""),
        ("quant.exclude_layers", "[3]"),
    ];
    let spec = write_spec(tmp.path(), "knobs.toml", &spec_text("knobs", &set, ""));
    let out = on_spec("run", &spec, &results, &[], &[]);
    assert_eq!(out.code, Some(0), "{}", out.show());
    let exp = results.join("knobs");
    let run = std::fs::read_dir(&exp)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.join("report.json").is_file())
        .expect("a run folder with a report");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["status"], "completed");
    assert_eq!(report["granularity"], "tensor");
    assert_eq!(report["scale"], "absmax");
    assert_eq!(report["scale_dtype"], "f16");
    assert_eq!(report["exclude_layers"], serde_json::json!([3]));
    assert_eq!(report["n_ternary_layers"], 3 * 7);
    assert_eq!(report["ternary_ok"], true);

    let default_text = toml::to_string(&ternlab::spec::Spec::default()).unwrap();
    for key in ["granularity", "scale", "scale_dtype", "exclude_layers"] {
        assert!(
            !default_text
                .lines()
                .any(|l| l.starts_with(&format!("{key} ="))),
            "a default spec writes no `{key}`: {default_text}"
        );
    }
}
