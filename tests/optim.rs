//! ternlab's composed AdamW in the seed's arithmetic against MLX's own `optim.AdamW`
//! (tests/fixtures/mlx_adamw.json, made by scripts/make_mlx_adamw_fixture.py with MLX 0.32.4):
//! f32 and bf16 parameters, with and without weight decay, bf16 with MLX's bias correction.
//! The parameters and both moments must agree to the bit after every step: a bf16 update that
//! rounds differently shows here, not as a slow drift of a loss curve.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use serde_json::Value;
use ternlab::optim::{AdamW, AdamWParams};

fn tensor(v: &Value, dtype: DType) -> Tensor {
    let xs: Vec<f32> = serde_json::from_value(v.clone()).unwrap();
    let n = xs.len();
    Tensor::from_vec(xs, n, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().to_vec1().unwrap()
}

#[test]
fn composed_adamw_is_mlx_adamw_to_the_bit() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/mlx_adamw.json");
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let cases = doc["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 5);
    for c in cases {
        let dtype = match c["dtype"].as_str().unwrap() {
            "bf16" => DType::BF16,
            _ => DType::F32,
        };
        let what = format!(
            "{dtype:?} wd {} bias_correction {}",
            c["weight_decay"], c["bias_correction"]
        );
        let var = Var::from_tensor(&tensor(&c["init"], dtype)).unwrap();
        let params = AdamWParams {
            lr: 0.0,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: c["weight_decay"].as_f64().unwrap(),
            bias_correction: c["bias_correction"].as_bool().unwrap(),
        };
        let mut opt = AdamW::new(vec![var.clone()], params, false).unwrap();
        let mut rounded_away = 0;
        for (i, s) in c["steps"].as_array().unwrap().iter().enumerate() {
            let before = values(var.as_tensor());
            let mut grads = GradStore::default();
            grads.insert(var.as_tensor(), tensor(&s["grad"], dtype));
            opt.set_learning_rate(s["lr"].as_f64().unwrap());
            opt.step(&grads).unwrap();
            let (m, v) = opt.moments(&var).unwrap();
            assert_eq!(var.dtype(), dtype);
            assert_eq!(m.dtype(), dtype, "{what}: moments in the parameter's dtype");
            for (name, ours, theirs) in [
                ("parameter", values(var.as_tensor()), &s["param"]),
                ("m", values(m), &s["m"]),
                ("v", values(v), &s["v"]),
            ] {
                let theirs: Vec<f32> = serde_json::from_value(theirs.clone()).unwrap();
                let differ = ours
                    .iter()
                    .zip(&theirs)
                    .filter(|(a, b)| a.to_bits() != b.to_bits())
                    .count();
                assert_eq!(
                    differ, 0,
                    "{what} step {i}: {differ} entries of {name} differ"
                );
            }
            let after = values(var.as_tensor());
            rounded_away += before.iter().zip(&after).filter(|(a, b)| a == b).count();
        }
        // In bf16 the fixture's smallest updates round away (that is what it pins); in f32 none
        // does.
        if dtype == DType::BF16 {
            assert!(rounded_away > 0, "{what}: no update rounded away");
        } else {
            assert_eq!(rounded_away, 0, "{what}");
        }
    }
}
