//! `train.save = "ternary"`: the trained model as a Hugging Face Qwen3 directory that ternlab
//! (and transformers) load as an ordinary checkpoint.

mod common;

use candle_core::{DType, Device};
use common::cli::{on_spec, run_tiny as run, spec_text, write_spec};
use common::max_abs;
use serde_json::Value;
use std::path::Path;

#[test]
fn a_saved_dense_model_starts_the_next_run_where_it_ended() {
    let dir = tempfile::tempdir().unwrap();
    // Pretraining as a study does it: no ternary projection, the trained model saved.
    let (first, report) = run(
        dir.path(),
        "pretrain",
        &[("quant.projections", "[]"), ("train.save", "\"ternary\"")],
    );
    let saved = first.join("ternary");
    for f in ["config.json", "tokenizer.json", "model.safetensors"] {
        assert!(
            saved.join(f).is_file(),
            "{f} missing in {}",
            saved.display()
        );
    }
    assert!(!first.join("ternary.tmp").exists());
    // The saved model checks out: its packed form gives the trained logits exactly.
    assert_eq!(report["packed_max_err"], 0.0);
    assert_eq!(report["packed_ok"], true);
    let tensors =
        candle_core::safetensors::load(saved.join("model.safetensors"), &Device::Cpu).unwrap();
    // The tiny preset: embedding, 4 layers of 7 projections and 4 norms, final norm (tied head).
    assert_eq!(tensors.len(), 1 + 4 * 11 + 1);
    assert!(tensors.values().all(|t| t.dtype() == DType::BF16));

    // A run from the saved directory starts from exactly the model the first run evaluated:
    // its dense held-out loss before training is the first run's final val_nll, bit for bit
    // (same data, same tokenizer as saved, same bf16 weights).
    let source = saved.to_str().unwrap().replace('\\', "/");
    let (_, next) = run(
        dir.path(),
        "from-saved",
        &[
            ("model.preset", ""),
            ("model.source", &format!("{source:?}")),
            ("train.steps", "1"),
        ],
    );
    let end = report["val_nll"].as_f64().unwrap();
    let start = next["recovery"]["nll_dense_start"].as_f64().unwrap();
    assert_eq!(start, end, "{start} vs {end}");
    assert_eq!(
        next["model_origin"].as_str().unwrap(),
        saved.to_str().unwrap()
    );
}

#[test]
fn a_saved_ternary_model_holds_the_ternary_weights() {
    let dir = tempfile::tempdir().unwrap();
    let (run_dir, _) = run(
        dir.path(),
        "ternary",
        &[("quant.group_size", "32"), ("train.save", "\"ternary\"")],
    );
    let tensors = candle_core::safetensors::load(
        run_dir.join("ternary").join("model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let mut projections = 0;
    for (name, t) in &tensors {
        let v = t.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
        let v = v.to_vec1::<f32>().unwrap();
        if !name.ends_with("_proj.weight") {
            continue;
        }
        projections += 1;
        // Each group of 32 input columns holds at most -s, 0 and +s (one bf16 scale).
        for group in v.chunks(32) {
            let mags: std::collections::BTreeSet<u32> = group
                .iter()
                .filter(|x| **x != 0.0)
                .map(|x| x.abs().to_bits())
                .collect();
            assert!(mags.len() <= 1, "{name}: group with magnitudes {mags:?}");
        }
    }
    assert_eq!(projections, 4 * 7);
}

#[test]
fn save_takes_only_the_names_it_knows() {
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(
        dir.path(),
        "bad.toml",
        &spec_text("bad", &[("train.save", "\"everything\"")], ""),
    );
    let out = on_spec("run", &spec, &dir.path().join("results"), &[], &[]);
    assert_eq!(out.code, Some(2), "{}", out.show());
    assert!(
        out.stderr.contains("train.save") && out.stderr.contains("\"ternary\""),
        "{}",
        out.show()
    );
}

/// The tiny model, every projection ternary with groups of 32 under `edit`, and its parameters.
fn tiny(
    edit: impl FnOnce(&mut ternlab::model::TernarySpec),
) -> (ternlab::model::Qwen3, ternlab::model::Params) {
    use ternlab::choice::Choice;
    use ternlab::model::{load::random_weights, Preset, Projection, Qwen3, Qwen3Config};
    let cfg = Qwen3Config::preset(Preset::Tiny, 300);
    let mut spec = ternlab::model::TernarySpec::new(
        Projection::ALL.to_vec(),
        ternlab::model::GroupSize::Columns(32),
    );
    edit(&mut spec);
    Qwen3::new(&cfg, random_weights(&cfg, 7).unwrap(), &spec, &Device::Cpu).unwrap()
}

#[test]
fn the_packed_file_unpacks_to_the_trained_ternary_weights_bit_for_bit() {
    use ternlab::model::{Granularity, ScaleDtype, ScaleRule};
    let dir = tempfile::tempdir().unwrap();
    type Edit = Box<dyn Fn(&mut ternlab::model::TernarySpec)>;
    let cases: [(&str, Edit); 3] = [
        ("seed", Box::new(|_| ())),
        (
            "tensor-f16",
            Box::new(|s| {
                s.granularity = Granularity::Tensor;
                s.scale_dtype = ScaleDtype::F16;
            }),
        ),
        (
            "learned-bf16",
            Box::new(|s| {
                s.scale = ScaleRule::Learned;
                s.scale_dtype = ScaleDtype::Bf16;
            }),
        ),
    ];
    for (what, edit) in cases {
        let (model, params) = tiny(edit);
        // Learned scales moved off their start, as training moves them.
        for (name, v) in &params.named {
            if name.ends_with("weight_scale") {
                v.set(&(v.as_tensor() * 1.37).unwrap()).unwrap();
            }
        }
        let path = dir.path().join(format!("{what}.safetensors"));
        ternlab::export::save_packed(&path, &model, &params).unwrap();
        let unpacked = ternlab::export::unpack(&path).unwrap();
        let frozen = model.frozen().unwrap();
        for (lin, f) in model.linears().into_iter().zip(frozen.linears()) {
            let got = unpacked[lin.name()]
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let want = f.weight().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            // Bit for bit, but for the sign of zero: W_t's zeros carry the latent's sign
            // (sign(w) * 0 * s), the unpacked ones are +0 (the same in every sum).
            let same = got
                .iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits() || (*a == 0.0 && *b == 0.0));
            assert!(same, "{what}: {} differs from the trained W_t", lin.name());
        }
        // What is stored: a quarter of a byte a ternary weight, each scale in its dtype, the
        // other tensors in bf16, and a header (the JSON index and metadata, a few kB).
        let bytes = std::fs::metadata(&path).unwrap().len() as usize;
        let mut data = 0;
        for lin in model.ternary_linears() {
            let (n, q) = (lin.weight().elem_count(), lin.quant().unwrap());
            data += n / 4 + n / q.group * q.scale_dtype.dtype().size_in_bytes();
        }
        let ternary: Vec<_> = model
            .ternary_linears()
            .iter()
            .map(|l| l.name().to_string())
            .collect();
        for (name, v) in &params.named {
            if !ternary.contains(name) && !name.ends_with("weight_scale") {
                data += v.elem_count() * 2;
            }
        }
        assert!(
            bytes > data && bytes < data + 16_384,
            "{what}: {bytes} bytes for {data} of data"
        );
        assert_eq!(
            unpacked
                .keys()
                .filter(|k| k.ends_with("weight_scale"))
                .count(),
            0
        );
    }
}

#[test]
fn the_saved_check_fails_when_the_saved_model_is_not_the_trained_one() {
    let dir = tempfile::tempdir().unwrap();
    let (model, params) = tiny(|_| ());
    let path = dir.path().join("packed.safetensors");
    ternlab::export::save_packed(&path, &model, &params).unwrap();
    let ids = candle_core::Tensor::new(&[[3u32, 14, 15, 92, 65, 35]], &Device::Cpu).unwrap();
    assert_eq!(
        ternlab::export::check_packed(&path, &model, &ids).unwrap(),
        0.0
    );
    // The model moves on after the save (one latent row pushed across its levels): the
    // saved file no longer gives its logits.
    let name = "model.layers.1.mlp.down_proj.weight";
    let v = params.get(name).unwrap();
    let row = (v.as_tensor().narrow(0, 0, 1).unwrap() * -3.0).unwrap();
    let moved = v.as_tensor().slice_assign(&[0..1, 0..384], &row).unwrap();
    v.set(&moved).unwrap();
    let err = ternlab::export::check_packed(&path, &model, &ids).unwrap();
    assert!(err > 1e-4, "{err}");
}

/// `ternlab eval ARGS` in `dir`, parsed.
fn eval(dir: &Path, args: &[&str]) -> Value {
    let mut all = vec!["eval"];
    all.extend_from_slice(args);
    let out = common::cli::ternlab(dir, &all, &[]);
    assert_eq!(out.code, Some(0), "{}", out.show());
    serde_json::from_str(&out.stdout).unwrap()
}

#[test]
fn eval_of_a_saved_run_gives_its_val_nll() {
    let dir = tempfile::tempdir().unwrap();
    // With 8-bit activations, which eval must quantize as training did.
    let (run_dir, report) = run(
        dir.path(),
        "evaluated",
        &[
            ("quant.group_size", "32"),
            ("quant.activation_bits", "8"),
            ("train.save", "\"ternary\""),
        ],
    );
    let run_path = run_dir.to_str().unwrap();
    let own = eval(dir.path(), &[run_path, "--device", "cpu"]);
    // The report's held-out NLL, to the bit: the same split, windows, batches and weights.
    assert_eq!(own["nll"], report["val_nll"], "{own}");
    assert_eq!(own["seq_len"], 32);

    // On a text file: the run folder and its packed file are the same model (the file says
    // which layers quantize their inputs); the Hugging Face directory holds W_t rounded to
    // bf16 and cannot say that, a little off.
    let text = common::cli::corpus();
    let on = |model: &str| {
        let args = [
            model,
            "--text",
            &text,
            "--seq-len",
            "64",
            "--batch-size",
            "4",
        ];
        eval(dir.path(), &args)
    };
    let (a, b) = (on(run_path), on(&format!("{run_path}/ternary.safetensors")));
    assert_eq!(a["nll"], b["nll"]);
    assert_eq!(
        a["windows"],
        a["tokens"].as_u64().unwrap().saturating_sub(1) / 64
    );
    let hf = on(&format!("{run_path}/ternary"));
    let (x, y) = (a["nll"].as_f64().unwrap(), hf["nll"].as_f64().unwrap());
    assert!(x != y && (x - y).abs() < 1e-2 * x, "{x} vs {y}");

    // Generation from the saved run, with and without the KV cache: the same text.
    let gen = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            run_path,
            "--prompt",
            "The",
            "--max-new-tokens",
            "8",
        ];
        args.extend_from_slice(extra);
        let out = common::cli::ternlab(dir.path(), &args, &[]);
        assert_eq!(out.code, Some(0), "{}", out.show());
        assert!(out.stderr.contains("new tokens on cpu"), "{}", out.show());
        out.stdout
    };
    let cached = gen(&["--device", "cpu"]);
    assert!(
        cached.starts_with("The") && cached.trim().len() > 3,
        "{cached:?}"
    );
    assert_eq!(cached, gen(&["--device", "cpu", "--no-cache"]));
}

#[test]
fn eval_of_a_run_that_kept_only_its_latents_gives_its_val_nll() {
    let dir = tempfile::tempdir().unwrap();
    // The run's model is rebuilt from its spec and latent/: learned scales and 8-bit
    // activations included, as training evaluated it.
    let (run_dir, report) = run(
        dir.path(),
        "latent",
        &[
            ("quant.group_size", "32"),
            ("quant.activation_bits", "8"),
            ("quant.scale", "\"learned\""),
            ("train.save", "\"latent\""),
        ],
    );
    assert!(!run_dir.join("ternary.safetensors").exists());
    let own = eval(dir.path(), &[run_dir.to_str().unwrap(), "--device", "cpu"]);
    assert_eq!(own["nll"], report["val_nll"], "{own}");
    assert!(
        own["weights"].as_str().unwrap().ends_with("latent"),
        "{own}"
    );
}

#[test]
fn eval_says_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let (run_dir, _) = run(dir.path(), "unsaved", &[]);
    let out = common::cli::ternlab(dir.path(), &["eval", run_dir.to_str().unwrap()], &[]);
    assert_eq!(out.code, Some(2), "{}", out.show());
    assert!(
        out.stderr.contains("train.save = \"ternary\""),
        "{}",
        out.show()
    );
    let out = common::cli::ternlab(dir.path(), &["eval", "./no-such-model"], &[]);
    assert_eq!(out.code, Some(2), "{}", out.show());
}

#[test]
fn generation_with_the_kv_cache_gives_the_tokens_of_generation_without() {
    use ternlab::generate::{generate, Sampler};
    // A trained-ish ternary model would do as well; the random tiny one has flat logits,
    // the harder case for equal argmaxes.
    let (model, _) = tiny(|_| ());
    let prompt = [5u32, 17, 99, 3, 250, 41, 7];
    let with = generate(&model, &prompt, 24, &[], Sampler::greedy(), true).unwrap();
    let without = generate(&model, &prompt, 24, &[], Sampler::greedy(), false).unwrap();
    assert_eq!(with.tokens.len(), 24);
    assert_eq!(with.tokens, without.tokens);
    // The cached logits of the last position are those of the whole sequence, to float noise.
    let seq: Vec<u32> = prompt.iter().chain(&with.tokens).copied().collect();
    let frozen = model.frozen().unwrap();
    let full = frozen
        .forward(
            &candle_core::Tensor::new(&seq[..], &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap(),
        )
        .unwrap();
    let mut kv = ternlab::model::KvCache::default();
    let ids = |s: &[u32]| {
        candle_core::Tensor::new(s, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap()
    };
    frozen.forward_cached(&ids(&seq[..10]), &mut kv).unwrap();
    let mut last = None;
    for t in &seq[10..] {
        last = Some(frozen.forward_cached(&ids(&[*t]), &mut kv).unwrap());
    }
    assert_eq!(kv.len(), seq.len());
    let a = full.get(0).unwrap().get(seq.len() - 1).unwrap();
    let b = last.unwrap().get(0).unwrap().get(0).unwrap();
    let err = max_abs(&(a - b).unwrap());
    eprintln!("cached vs full logits: {err:e}");
    // measured 6.0e-7 (the products of a shorter key matrix, summed in another order)
    assert!(err < 5e-6, "{err}");
    // Sampling is seeded: the same seed, the same tokens.
    let s = Sampler {
        temperature: 0.8,
        top_p: 0.9,
        seed: 3,
    };
    let (x, y) = (
        generate(&model, &prompt, 12, &[], s, true).unwrap(),
        generate(&model, &prompt, 12, &[], s, true).unwrap(),
    );
    assert_eq!(x.tokens, y.tokens);
}

/// A run's samples come in one batch (`generate_greedy_batch`: left padded, each row at its
/// own positions, masked from the padding): each row's tokens are those of its prompt alone
/// (`generate` with the cache), on the random tiny model (flat logits: near-ties everywhere)
/// in f32 on the CPU; and a stop token ends its row only.
#[test]
fn samples_in_one_batch_are_each_prompts_own_tokens() {
    use ternlab::generate::{generate, generate_greedy_batch, Sampler};
    let (model, _) = tiny(|_| ());
    let prompts: Vec<Vec<u32>> = vec![vec![5, 17, 99, 3, 250, 41, 7], vec![42], vec![8, 9, 10, 11]];
    let batch = generate_greedy_batch(&model, &prompts, 20, &[]).unwrap();
    for (p, got) in prompts.iter().zip(&batch) {
        let alone = generate(&model, p, 20, &[], Sampler::greedy(), true).unwrap();
        assert_eq!(got.len(), 20);
        assert_eq!(got, &alone.tokens, "prompt {p:?}");
    }
    // The second row's 5th token as a stop token: each row ends where its own generation does,
    // the others going on.
    let stop = batch[1][4];
    let stopped = generate_greedy_batch(&model, &prompts, 20, &[stop]).unwrap();
    for (p, got) in prompts.iter().zip(&stopped) {
        let alone = generate(&model, p, 20, &[stop], Sampler::greedy(), true).unwrap();
        assert_eq!(got, &alone.tokens, "prompt {p:?} with stop token {stop}");
    }
    assert!(stopped[1].len() < 20, "the stop token ended its row");
}
