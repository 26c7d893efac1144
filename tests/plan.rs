//! The spec and sweep expansion, in process: the seed's defaults, layering (file, environment,
//! --set), grid / zip / seed axes, run ids, and the messages of bad specs.

use std::path::{Path, PathBuf};
use ternlab::data::Sampling;
use ternlab::device::DeviceChoice;
use ternlab::plan::{plan, run_id};
use ternlab::spec::{self, GroupSize, Override, Spec};

/// Figment reads the environment whenever a spec is extracted, and one test here sets a
/// variable: every test takes this lock so none sees another's environment.
static ENV: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ENV.lock().unwrap_or_else(|e| e.into_inner())
}

fn write_spec(dir: &Path, text: &str) -> PathBuf {
    let p = dir.join("spec.toml");
    std::fs::write(&p, text).unwrap();
    p
}

fn err_of(text: &str, overrides: &[&str]) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let p = write_spec(tmp.path(), text);
    let o: Vec<Override> = overrides.iter().map(|s| s.parse().unwrap()).collect();
    let e = plan(&p, &o).expect_err("the spec should be refused");
    assert!(
        e.downcast_ref::<spec::BadInput>().is_some(),
        "not a BadInput: {e:#}"
    );
    let msg = format!("{e:#}");
    assert!(
        msg.contains("spec.toml"),
        "the message names the file: {msg}"
    );
    msg
}

#[test]
fn defaults_are_the_seed_recipe() {
    let _env = serial();
    // scripts/seed_mlx.py: GROUP_SIZE 128, SEQ_LEN 256, BATCH_SIZE 4, NUM_STEPS 250, LR 5e-4,
    // WARMUP_STEPS 30, cosine to 10%, AdamW betas (0.9, 0.95), weight decay 0, seed 0,
    // Qwen/Qwen3-0.6B, all seven projections, 60 greedy tokens for five prompts.
    let s = Spec::default();
    assert_eq!(s.model.source, "Qwen/Qwen3-0.6B");
    assert_eq!(s.quant.group_size, GroupSize::Columns(128));
    assert_eq!(s.quant.projections.len(), 7);
    assert_eq!((s.data.seq_len, s.data.batch_size), (256, 4));
    assert_eq!(s.data.val_fraction, 0.1);
    assert_eq!(s.data.sampling, Sampling::Random);
    assert_eq!(
        (s.train.steps, s.train.warmup_steps, s.train.seed),
        (250, 30, 0)
    );
    assert_eq!((s.train.lr, s.train.min_lr_ratio), (5e-4, 0.1));
    assert_eq!(s.train.betas, [0.9, 0.95]);
    assert_eq!((s.train.eps, s.train.weight_decay), (1e-8, 0.0));
    assert_eq!(s.eval.prompts.len(), 5);
    assert_eq!(s.eval.max_new_tokens, 60);
    // The committed baseline spells out exactly the defaults.
    let base = spec::load(Path::new("experiments/baseline.toml"), &[]).unwrap();
    assert_eq!(base, s);
}

#[test]
fn set_values_parse_as_toml_or_strings() {
    let _env = serial();
    let o: Override = "train.lr=1e-3".parse().unwrap();
    assert_eq!(o.value, toml::Value::Float(1e-3));
    let o: Override = "quant.projections=[\"q_proj\"]".parse().unwrap();
    assert!(o.value.is_array());
    let o: Override = "data.sampling=sequential".parse().unwrap();
    assert_eq!(o.value, toml::Value::String("sequential".into()));
    assert!("train.lr".parse::<Override>().is_err());
}

#[test]
fn grid_zip_and_seed_axes_expand_in_order() {
    let _env = serial();
    let tmp = tempfile::tempdir().unwrap();
    let p = write_spec(
        tmp.path(),
        r#"
name = "x"
[sweep]
"quant.group_size" = [64, "row"]
"train.seed" = [0, 1, 2]
[[sweep.zip]]
"train.lr" = [1e-3, 3e-3]
"train.warmup_steps" = [10, 20]
"#,
    );
    let pl = plan(&p, &[]).unwrap();
    assert_eq!(pl.runs.len(), 2 * 3 * 2);
    // The last axis varies fastest; zipped keys move together.
    let r = &pl.runs[1];
    assert_eq!(r.spec.quant.group_size, GroupSize::Columns(64));
    assert_eq!(
        (
            r.spec.train.seed,
            r.spec.train.lr,
            r.spec.train.warmup_steps
        ),
        (0, 3e-3, 20)
    );
    let last = pl.runs.last().unwrap();
    assert_eq!(last.spec.quant.group_size, GroupSize::Row);
    assert_eq!(
        (last.spec.train.seed, last.spec.train.warmup_steps),
        (2, 20)
    );
    assert_eq!(
        r.id,
        format!(
            "group_size=64_seed=0_lr=0.003_warmup_steps=20_{}",
            &r.config_hash[..8]
        )
    );
    // Unique, and the same when planned again.
    let ids: std::collections::HashSet<_> = pl.runs.iter().map(|r| r.id.clone()).collect();
    assert_eq!(ids.len(), pl.runs.len());
    let again = plan(&p, &[]).unwrap();
    assert!(pl.runs.iter().zip(&again.runs).all(|(a, b)| a.id == b.id));
    // A --set on a grid key pins that axis; on another key it changes every run's hash.
    let pinned = plan(&p, &["train.seed=5".parse().unwrap()]).unwrap();
    assert_eq!(pinned.runs.len(), 2 * 2);
    assert!(pinned
        .runs
        .iter()
        .all(|r| r.spec.train.seed == 5 && r.id.contains("_seed=5_")));
    // Pinned to a value of the sweep, a run keeps its id from the full sweep.
    let seed1 = plan(&p, &["train.seed=1".parse().unwrap()]).unwrap();
    assert!(seed1
        .runs
        .iter()
        .all(|r| pl.runs.iter().any(|q| q.id == r.id)));
    let longer = plan(&p, &["train.steps=7".parse().unwrap()]).unwrap();
    assert!(longer
        .runs
        .iter()
        .zip(&pl.runs)
        .all(|(a, b)| a.config_hash != b.config_hash));
}

#[test]
fn run_id_without_a_sweep_names_the_seed() {
    let _env = serial();
    let s = Spec::default();
    let hash = ternlab::plan::config_hash(&s);
    assert_eq!(run_id(&s, &[], &hash), format!("seed=0_{}", &hash[..8]));
    // The device is not part of the experiment.
    let mut on_cpu = s.clone();
    on_cpu.run.device = DeviceChoice::Cpu;
    assert_eq!(ternlab::plan::config_hash(&on_cpu), hash);
}

#[test]
fn environment_layers_under_set() {
    let _env = serial();
    let tmp = tempfile::tempdir().unwrap();
    let p = write_spec(tmp.path(), "name = \"x\"\n[train]\nsteps = 9\n");
    std::env::set_var("TERNLAB_TRAIN__STEPS", "11");
    let from_env = plan(&p, &[]).unwrap();
    let from_set = plan(&p, &["train.steps=13".parse().unwrap()]).unwrap();
    std::env::remove_var("TERNLAB_TRAIN__STEPS");
    assert_eq!(from_env.runs[0].spec.train.steps, 11);
    assert_eq!(from_set.runs[0].spec.train.steps, 13);
}

#[test]
fn bad_specs_name_the_key() {
    let _env = serial();
    let cases: &[(&str, &[&str], &[&str])] = &[
        ("[train]\nlrr = 1e-3\n", &[], &["train.lrr", "train.lr"]),
        ("[train]\nsteps = \"ten\"\n", &[], &["train.steps"]),
        ("[train]\nlr = -1.0\n", &[], &["train.lr", "-1"]),
        (
            "[train]\nbetas = [0.9, 1.0]\n",
            &[],
            &["train.betas[1]", "[0, 1)"],
        ),
        (
            "[data]\nval_fraction = 1.0\n",
            &[],
            &["data.val_fraction", "(0, 1)"],
        ),
        (
            "[data]\nsampling = \"shuffled\"\n",
            &[],
            &["data.sampling", "sequential"],
        ),
        (
            "[quant]\ngroup_size = 0\n",
            &[],
            &["quant.group_size", "row"],
        ),
        (
            "[quant]\nprojections = [\"qproj\"]\n",
            &[],
            &["quant.projections", "qproj", "q_proj"],
        ),
        ("[run]\ndevice = \"tpu\"\n", &[], &["run.device", "cuda:N"]),
        (
            "[model]\npreset = \"huge\"\n",
            &[],
            &["model.preset", "tiny"],
        ),
        (
            "[sweep]\n\"train.lrr\" = [1e-3]\n",
            &[],
            &["train.lrr", "train.lr"],
        ),
        ("[sweep]\n\"train.lr\" = []\n", &[], &["train.lr", "empty"]),
        ("[sweep]\n\"train.lr\" = 1e-3\n", &[], &["train.lr", "list"]),
        (
            "[sweep]\n\"train.lr\" = [1e-3, -2.0]\n",
            &[],
            &["train.lr", "-2", "sweep run"],
        ),
        (
            "[[sweep.zip]]\n\"train.lr\" = [1e-3]\n\"train.steps\" = [1, 2]\n",
            &[],
            &["train.steps", "same length"],
        ),
        (
            "name = \"x\"\n",
            &["train.stepz=3"],
            &["train.stepz", "train.steps"],
        ),
        ("[train\nlr = 1\n", &[], &["TOML", "line 1"]),
        (
            "[train]\ndense_dtype = \"bf16\"\n",
            &[],
            &["train.dense_dtype", "\"bf16\"", "\"checkpoint\"", "\"f32\""],
        ),
        (
            "name = \"x\"\n",
            &["train.bias_correction=yes"],
            &["train.bias_correction", "boolean"],
        ),
    ];
    for (text, overrides, wants) in cases {
        let msg = err_of(text, overrides);
        for w in *wants {
            assert!(
                msg.contains(w),
                "for {text:?}: {msg:?} should contain {w:?}"
            );
        }
    }
}

#[test]
fn auto_dtype_resolves_by_device() {
    let _env = serial();
    use candle_core::Device;
    use ternlab::choice::Choice;
    use ternlab::spec::{ComputeDtype, TrainDtype};
    assert_eq!(Spec::default().train.dtype, TrainDtype::Auto);
    // The seed's semantics by default.
    assert!(!Spec::default().train.bias_correction);
    assert_eq!(
        Spec::default().train.dense_dtype,
        ternlab::spec::DenseDtype::Checkpoint
    );
    // bf16 only where the fused CUDA kernels run; the CPU keeps f32.
    // As report.json writes them.
    let resolved = |d: TrainDtype| d.resolve(&Device::Cpu).name();
    assert_eq!(resolved(TrainDtype::Auto), "f32");
    assert_eq!(resolved(TrainDtype::Fixed(ComputeDtype::Bf16)), "bf16");
    assert_eq!(resolved(TrainDtype::Fixed(ComputeDtype::Tf32)), "tf32");
}

#[test]
fn named_values_are_written_back_as_written() {
    let _env = serial();
    let tmp = tempfile::tempdir().unwrap();
    // config.toml, report.json's config and the config hash see the names the spec wrote:
    // "cuda" stays "cuda" (not "cuda:0").
    for (device, preset, sampling, dtype) in [
        ("cuda", "qwen3-0.6b", "sequential", "tf32"),
        ("cuda:1", "tiny", "random", "auto"),
        ("metal", "tiny", "random", "bf16"),
        ("cpu", "tiny", "random", "f32"),
    ] {
        let text = format!(
            "[model]\npreset = \"{preset}\"\n[data]\nsampling = \"{sampling}\"\n\
             [train]\ndtype = \"{dtype}\"\n[run]\ndevice = \"{device}\"\n"
        );
        let p = write_spec(tmp.path(), &text);
        let spec = &plan(&p, &[]).unwrap().runs[0].spec;
        let written: toml::Table = toml::from_str(&toml::to_string(spec).unwrap()).unwrap();
        let back: toml::Table = toml::from_str(&text).unwrap();
        for (section, key) in [
            ("model", "preset"),
            ("data", "sampling"),
            ("train", "dtype"),
            ("run", "device"),
        ] {
            assert_eq!(written[section][key], back[section][key], "{section}.{key}");
        }
    }
}

#[test]
fn bad_names_are_refused_with_the_valid_ones() {
    let _env = serial();
    let cases: &[(&str, &[&str])] = &[
        (
            "[train]\ndtype = \"fp16\"\n",
            &[
                "`train.dtype`",
                "\"fp16\"",
                "\"auto\"",
                "\"tf32\"",
                "\"bf16\"",
            ],
        ),
        (
            "[run]\ndevice = \"cuda:x\"\n",
            &["`run.device`", "\"cuda:x\"", "\"cpu\"", "cuda:N"],
        ),
        (
            "[data]\nsampling = 3\n",
            &["`data.sampling`", "\"random\" or \"sequential\""],
        ),
        (
            "[model]\npreset = \"Tiny\"\n",
            &[
                "`model.preset`",
                "\"Tiny\"",
                "\"tiny\", \"small\" or \"qwen3-0.6b\"",
            ],
        ),
        (
            "[sweep]\n\"train.dtype\" = [\"f32\", \"f16\"]\n",
            &["`train.dtype`", "\"f16\"", "sweep run"],
        ),
    ];
    for (text, wants) in cases {
        let msg = err_of(text, &[]);
        for w in *wants {
            assert!(
                msg.contains(w),
                "for {text:?}: {msg:?} should contain {w:?}"
            );
        }
    }
}
