//! Where a model comes from, through the real loading code and without the network: a Hugging
//! Face hub cache laid out as huggingface_hub writes it (refs, snapshots, blobs; HF_HOME,
//! HF_HUB_CACHE, HF_HUB_OFFLINE, branch and commit revisions, the errors for a missing repo or
//! revision), sharded checkpoints (an index and two shards, in the cache and in a local
//! directory) giving the same tensors and logits as the single file, a whole `ternlab run`
//! from the cache through the CLI (and exit code 2 with nothing written when the repo is
//! missing), old (transformers 4.x) and new (5.x) `config.json` formats and the configs that
//! must be refused, bf16 / f16 checkpoints, and an untied output head. The source model is
//! the parity fixture in tests/fixtures/parity/model.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use ternlab::data::{Batcher, Sampling};
use ternlab::model::load::{
    hub_cache_dir, hub_offline, random_weights, read_weights, resolve_checkpoint,
};
use ternlab::model::{cross_entropy, Projection, Qwen3, Qwen3Config, TernarySpec, Weights};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// The environment is process-global and cargo runs tests on threads: every test that reads
/// the HF_* variables in this process holds this lock while it sets them.
static ENV_LOCK: Mutex<()> = Mutex::new(());

const HF_VARS: [&str; 3] = ["HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE"];

/// Holds `ENV_LOCK`; restores the HF_* variables as they were when dropped.
struct HubEnv {
    saved: Vec<(&'static str, Option<OsString>)>,
    _lock: MutexGuard<'static, ()>,
}

impl HubEnv {
    /// Locks, then sets HF_HOME = `home`, HF_HUB_OFFLINE = 1 and unsets HF_HUB_CACHE.
    fn offline(home: &Path) -> Self {
        let lock = ENV_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let saved = HF_VARS.iter().map(|k| (*k, std::env::var_os(k))).collect();
        let env = Self { saved, _lock: lock };
        env.set("HF_HOME", Some(home.as_os_str()));
        env.set("HF_HUB_CACHE", None);
        env.set("HF_HUB_OFFLINE", Some("1".as_ref()));
        env
    }

    fn set(&self, key: &str, value: Option<&std::ffi::OsStr>) {
        match value {
            Some(v) => std::env::set_var(key, v),
            None => std::env::remove_var(key),
        }
    }
}

impl Drop for HubEnv {
    fn drop(&mut self) {
        for (k, v) in &self.saved {
            self.set(k, v.as_deref());
        }
    }
}

fn hex_sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A stable 40-hex commit hash made from `seed`.
fn commit_hash(seed: &str) -> String {
    hex_sha256(seed.as_bytes())[..40].to_string()
}

/// Adds one commit of `repo_id` to a hub cache folder the way huggingface_hub lays it out:
/// `models--org--name/blobs/<sha256>` holds the bytes, `snapshots/<commit>/<file>` links to the
/// blob (a copy where symlinks are unavailable), `refs/main` holds the commit hash.
/// Returns the snapshot folder.
fn add_to_hub_cache(hub: &Path, repo_id: &str, commit: &str, files: &[(&str, &Path)]) -> PathBuf {
    assert_eq!(commit.len(), 40);
    let repo_dir = hub.join(format!("models--{}", repo_id.replace('/', "--")));
    let blobs = repo_dir.join("blobs");
    let snapshot = repo_dir.join("snapshots").join(commit);
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo_dir.join("refs")).unwrap();
    std::fs::write(repo_dir.join("refs/main"), commit).unwrap();
    for (name, src) in files {
        let bytes = std::fs::read(src).unwrap();
        let blob = hex_sha256(&bytes);
        std::fs::write(blobs.join(&blob), &bytes).unwrap();
        let link = snapshot.join(name);
        #[cfg(unix)]
        std::os::unix::fs::symlink(Path::new("../../blobs").join(&blob), &link).unwrap();
        #[cfg(not(unix))]
        std::fs::write(&link, &bytes).unwrap();
    }
    snapshot
}

fn fixture_model_dir() -> PathBuf {
    fixture_dir().join("model")
}

fn fixture_config_json() -> Value {
    let text = std::fs::read_to_string(fixture_model_dir().join("config.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn write_json(path: &Path, v: &Value) {
    std::fs::write(path, serde_json::to_string_pretty(v).unwrap()).unwrap();
}

fn dense() -> TernarySpec {
    TernarySpec::new(vec![], ternlab::spec::GroupSize::Columns(16))
}

fn build(cfg: &Qwen3Config, weights: Weights) -> (Qwen3, ternlab::model::Params) {
    Qwen3::new(cfg, weights, &dense(), &Device::Cpu).unwrap()
}

/// The first batch of the fixture's token stream: inputs and next-token targets (2, 16).
fn batch() -> (Tensor, Tensor) {
    let m = fixture_meta();
    let mut b = Batcher::new(&m.tokens, m.seq_len, m.batch_size, Sampling::Sequential, 0).unwrap();
    b.next_batch(&Device::Cpu).unwrap()
}

fn logits(model: &Qwen3) -> Tensor {
    model.forward(&batch().0).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    let (a, b) = (
        a.to_dtype(DType::F32).unwrap(),
        b.to_dtype(DType::F32).unwrap(),
    );
    max_abs(&(a - b).unwrap()) as f32
}

fn assert_same_weights(got: &Weights, want: &Weights) {
    let mut got_names: Vec<_> = got.keys().collect();
    let mut want_names: Vec<_> = want.keys().collect();
    got_names.sort();
    want_names.sort();
    assert_eq!(got_names, want_names, "tensor names");
    for (name, w) in want {
        let g = &got[name];
        assert_eq!(g.dtype(), w.dtype(), "{name}: dtype");
        assert_eq!(g.dims(), w.dims(), "{name}: shape");
        assert_eq!(max_abs_diff(g, w), 0.0, "{name}: values");
    }
}

/// The fixture's config.json with vocab_size 4096 (the bundled tokenizer's size), its
/// seeded random weights, and the bundled tokenizer, written to `dir` (not a cache).
fn write_vocab4096_model(dir: &Path) -> (Qwen3Config, Weights) {
    std::fs::create_dir_all(dir).unwrap();
    let mut cfg_json = fixture_config_json();
    cfg_json["vocab_size"] = json!(4096);
    write_json(&dir.join("config.json"), &cfg_json);
    let cfg = Qwen3Config::from_hf_str(&cfg_json.to_string()).unwrap();
    let weights = random_weights(&cfg, 3).unwrap();
    candle_core::safetensors::save(&weights, dir.join("model.safetensors")).unwrap();
    std::fs::copy(
        repo_root().join("data/tiny-tokenizer.json"),
        dir.join("tokenizer.json"),
    )
    .unwrap();
    (cfg, weights)
}

const MODEL_FILES: [&str; 3] = ["config.json", "model.safetensors", "tokenizer.json"];

/// An HF_HOME holding `acme/tiny-qwen3` (vocab 4096, with tokenizer) at `commit`.
fn hf_home_with_tiny_repo(root: &Path, commit: &str) -> (PathBuf, PathBuf, Weights) {
    let staging = root.join("staging-tiny");
    let (_, weights) = write_vocab4096_model(&staging);
    let home = root.join("hf-home");
    let files: Vec<(&str, PathBuf)> = MODEL_FILES.iter().map(|f| (*f, staging.join(f))).collect();
    let files: Vec<(&str, &Path)> = files.iter().map(|(f, p)| (*f, p.as_path())).collect();
    let snapshot = add_to_hub_cache(&home.join("hub"), "acme/tiny-qwen3", commit, &files);
    (home, snapshot, weights)
}

// ---------------------------------------------------------------------------------------------
// 1a. The hub cache, offline
// ---------------------------------------------------------------------------------------------

#[test]
fn hub_cache_resolves_offline_by_branch_and_commit() {
    let tmp = tempfile::tempdir().unwrap();
    let commit = commit_hash("tiny-qwen3 main");
    let (home, snapshot, weights) = hf_home_with_tiny_repo(tmp.path(), &commit);
    // A second cache, for HF_HUB_CACHE, holding the same repo at another commit.
    let alt_hub = tmp.path().join("alt-hub");
    let alt_commit = commit_hash("tiny-qwen3 alt");
    let staging = tmp.path().join("staging-tiny");
    let files: Vec<(&str, PathBuf)> = MODEL_FILES.iter().map(|f| (*f, staging.join(f))).collect();
    let files: Vec<(&str, &Path)> = files.iter().map(|(f, p)| (*f, p.as_path())).collect();
    let alt_snapshot = add_to_hub_cache(&alt_hub, "acme/tiny-qwen3", &alt_commit, &files);
    let empty_hub = tmp.path().join("empty-hub");
    std::fs::create_dir_all(&empty_hub).unwrap();

    let env = HubEnv::offline(&home);
    assert_eq!(hub_cache_dir(), home.join("hub"));
    assert!(hub_offline());

    // By branch, through refs/main.
    let files = resolve_checkpoint("acme/tiny-qwen3", "main").unwrap();
    assert_eq!(files.config, snapshot.join("config.json"));
    assert_eq!(files.safetensors, vec![snapshot.join("model.safetensors")]);
    assert_eq!(files.tokenizer, Some(snapshot.join("tokenizer.json")));
    assert!(
        files.origin.contains("acme/tiny-qwen3@main"),
        "origin {:?}",
        files.origin
    );
    // The links resolve to the blobs: the weights are the ones written.
    assert_same_weights(&read_weights(&files).unwrap(), &weights);
    let cfg = Qwen3Config::from_hf_json(&files.config).unwrap();
    assert_eq!(cfg.vocab_size, 4096);

    // By commit hash, through snapshots/<hash>.
    let by_commit = resolve_checkpoint("acme/tiny-qwen3", &commit).unwrap();
    assert_eq!(by_commit.config, snapshot.join("config.json"));
    assert_eq!(
        by_commit.safetensors,
        vec![snapshot.join("model.safetensors")]
    );
    assert_eq!(by_commit.tokenizer, Some(snapshot.join("tokenizer.json")));

    // A revision and a repo that are not in the cache: the error says where it looked and
    // that the hub was not asked.
    for (repo, rev) in [("acme/tiny-qwen3", "nope"), ("acme/missing", "main")] {
        let err = format!("{:#}", resolve_checkpoint(repo, rev).unwrap_err());
        assert!(err.contains("HF_HUB_OFFLINE"), "{repo}@{rev}: {err}");
        assert!(err.contains(repo), "{repo}@{rev}: {err}");
        assert!(
            err.contains(&format!("{repo}@{rev}")),
            "{repo}@{rev}: {err}"
        );
    }

    // HF_HUB_OFFLINE spellings.
    for (v, want) in [("true", true), ("ON", true), ("yes", true), ("0", false)] {
        env.set("HF_HUB_OFFLINE", Some(v.as_ref()));
        assert_eq!(hub_offline(), want, "HF_HUB_OFFLINE={v}");
    }
    env.set("HF_HUB_OFFLINE", Some("1".as_ref()));

    // HF_HUB_CACHE wins over HF_HOME.
    env.set("HF_HUB_CACHE", Some(alt_hub.as_os_str()));
    assert_eq!(hub_cache_dir(), alt_hub);
    let alt = resolve_checkpoint("acme/tiny-qwen3", "main").unwrap();
    assert_eq!(alt.config, alt_snapshot.join("config.json"));
    assert_eq!(
        alt.safetensors,
        vec![alt_snapshot.join("model.safetensors")]
    );
    // ... even when it lacks the repo that HF_HOME has.
    env.set("HF_HUB_CACHE", Some(empty_hub.as_os_str()));
    let err = format!(
        "{:#}",
        resolve_checkpoint("acme/tiny-qwen3", "main").unwrap_err()
    );
    assert!(err.contains(&empty_hub.display().to_string()), "{err}");
    drop(env);
}

// ---------------------------------------------------------------------------------------------
// 1b. Sharded checkpoints
// ---------------------------------------------------------------------------------------------

const SHARDS: [&str; 2] = [
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
];

/// Writes the fixture as config.json + model.safetensors.index.json + two shards into `dir`.
fn write_sharded_fixture(dir: &Path, weights: &Weights) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(
        fixture_model_dir().join("config.json"),
        dir.join("config.json"),
    )
    .unwrap();
    let mut names: Vec<&String> = weights.keys().collect();
    names.sort();
    let half = names.len() / 2;
    let mut weight_map = serde_json::Map::new();
    let mut total_size = 0usize;
    for (i, shard) in SHARDS.iter().enumerate() {
        let part = if i == 0 {
            &names[..half]
        } else {
            &names[half..]
        };
        let tensors: Weights = part
            .iter()
            .map(|n| ((*n).clone(), weights[*n].clone()))
            .collect();
        for (n, t) in &tensors {
            weight_map.insert(n.clone(), json!(shard));
            total_size += t.elem_count() * t.dtype().size_in_bytes();
        }
        candle_core::safetensors::save(&tensors, dir.join(shard)).unwrap();
    }
    write_json(
        &dir.join("model.safetensors.index.json"),
        &json!({"metadata": {"total_size": total_size}, "weight_map": weight_map}),
    );
}

#[test]
fn sharded_checkpoints_load_like_the_single_file() {
    let tmp = tempfile::tempdir().unwrap();
    let single = fixture_weights();
    let reference = logits(&build(&fixture_config(), single.clone()).0);

    // A local directory; a stale extra file that the index does not list must not be read.
    let local = tmp.path().join("local-sharded");
    write_sharded_fixture(&local, &single);
    let mut stale = single.clone();
    let embed = &stale["model.embed_tokens.weight"];
    let zeros = embed.zeros_like().unwrap();
    stale.insert("model.embed_tokens.weight".into(), zeros);
    candle_core::safetensors::save(&stale, local.join("zz-stale.safetensors")).unwrap();

    let files = resolve_checkpoint(local.to_str().unwrap(), "main").unwrap();
    let want: Vec<PathBuf> = SHARDS.iter().map(|s| local.join(s)).collect();
    assert_eq!(files.safetensors, want);
    let local_weights = read_weights(&files).unwrap();
    assert_same_weights(&local_weights, &single);
    let got = logits(&build(&fixture_config(), local_weights).0);
    assert_eq!(max_abs_diff(&got, &reference), 0.0, "local sharded logits");

    // The same shards in the hub cache.
    let home = tmp.path().join("hf-home");
    let commit = commit_hash("sharded");
    let names = [
        "config.json",
        "model.safetensors.index.json",
        SHARDS[0],
        SHARDS[1],
    ];
    let paths: Vec<PathBuf> = names.iter().map(|n| local.join(n)).collect();
    let files: Vec<(&str, &Path)> = names
        .iter()
        .zip(&paths)
        .map(|(n, p)| (*n, p.as_path()))
        .collect();
    let snapshot = add_to_hub_cache(&home.join("hub"), "acme/sharded-qwen3", &commit, &files);
    let env = HubEnv::offline(&home);
    let hub_files = resolve_checkpoint("acme/sharded-qwen3", "main").unwrap();
    drop(env);
    let want: Vec<PathBuf> = SHARDS.iter().map(|s| snapshot.join(s)).collect();
    assert_eq!(hub_files.safetensors, want);
    assert_eq!(hub_files.tokenizer, None);
    let hub_weights = read_weights(&hub_files).unwrap();
    assert_same_weights(&hub_weights, &single);
    let got = logits(&build(&fixture_config(), hub_weights).0);
    assert_eq!(max_abs_diff(&got, &reference), 0.0, "hub sharded logits");

    // A shard listed by the index but missing is an error naming it.
    std::fs::remove_file(local.join(SHARDS[1])).unwrap();
    let err = format!(
        "{:#}",
        resolve_checkpoint(local.to_str().unwrap(), "main").unwrap_err()
    );
    assert!(err.contains(SHARDS[1]), "{err}");
}

// ---------------------------------------------------------------------------------------------
// 1c. `ternlab run` from the hub cache
// ---------------------------------------------------------------------------------------------

/// `ternlab run <spec> --results <results>` with an offline hub cache at `home`.
fn ternlab_run(cwd: &Path, home: &Path, source: &str, results: &Path) -> std::process::Output {
    let data = repo_root().join("data/train_data.txt");
    let quote = |s: &str| toml::Value::String(s.into()).to_string();
    let spec = format!(
        "name = \"hubtest\"\n\
         [model]\nsource = {}\n\
         [data]\npath = {}\nseq_len = 32\nbatch_size = 2\n\
         [quant]\ngroup_size = 32\n\
         [train]\nsteps = 3\n\
         [eval]\nmax_new_tokens = 3\nprompts = [\"Hello\"]\n\
         [run]\ndevice = \"cpu\"\n",
        quote(source),
        quote(data.to_str().unwrap()),
    );
    let spec_path = cwd.join("hubtest.toml");
    std::fs::write(&spec_path, spec).unwrap();
    let mut cmd = Command::new(ternlab_bin());
    cmd.arg("run")
        .arg(&spec_path)
        .arg("--results")
        .arg(results)
        .current_dir(cwd)
        .env("HF_HOME", home)
        .env("HF_HUB_OFFLINE", "1")
        .env_remove("HF_HUB_CACHE");
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("TERNLAB_") {
            cmd.env_remove(k);
        }
    }
    cmd.output().unwrap()
}

#[test]
fn cli_trains_a_model_from_the_hub_cache_offline() {
    let tmp = tempfile::tempdir().unwrap();
    let (home, _, _) = hf_home_with_tiny_repo(tmp.path(), &commit_hash("cli"));
    let results = tmp.path().join("results");
    let out = ternlab_run(tmp.path(), &home, "acme/tiny-qwen3", &results);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "ternlab run failed: {stderr}");

    // Run folders; `.locks` holds the per-run lock files.
    let runs: Vec<PathBuf> = std::fs::read_dir(results.join("hubtest"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .collect();
    assert_eq!(runs.len(), 1, "one run folder: {runs:?}");
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(runs[0].join("report.json")).unwrap())
            .unwrap();
    let origin = report["model_origin"].as_str().unwrap();
    assert!(
        origin.contains("acme/tiny-qwen3"),
        "model_origin {origin:?}"
    );
    assert!(origin.contains(&home.display().to_string()), "{origin:?}");
    assert_eq!(report["status"], "completed");
    let curve: Vec<f64> = report["loss_curve"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(curve.len(), 3, "loss_curve {curve:?}");
    assert!(curve.iter().all(|l| l.is_finite()), "loss_curve {curve:?}");
    assert_eq!(report["samples"].as_array().unwrap().len(), 1);
}

#[test]
fn cli_refuses_a_repo_missing_from_the_offline_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let (home, _, _) = hf_home_with_tiny_repo(tmp.path(), &commit_hash("cli-missing"));
    let results = tmp.path().join("results");
    let out = ternlab_run(tmp.path(), &home, "acme/missing", &results);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(stderr.contains("model.source"), "{stderr}");
    assert!(stderr.contains("acme/missing"), "{stderr}");
    assert!(stderr.contains("HF_HUB_OFFLINE"), "{stderr}");
    assert!(
        !results.exists(),
        "nothing may be written under {results:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// 2. config.json formats
// ---------------------------------------------------------------------------------------------

/// The fixture config as a transformers 4.x release writes it: top-level `rope_theta` (an
/// integer, as in Qwen/Qwen3-0.6B), `torch_dtype`, `rope_scaling: null`.
fn old_format(new: &Value) -> Value {
    let mut old = new.clone();
    let obj = old.as_object_mut().unwrap();
    let theta = obj
        .remove("rope_parameters")
        .unwrap()
        .get("rope_theta")
        .unwrap()
        .as_f64()
        .unwrap();
    obj.insert("rope_theta".into(), json!(theta as u64));
    obj.remove("dtype");
    obj.insert("torch_dtype".into(), json!("bfloat16"));
    obj.insert("rope_scaling".into(), Value::Null);
    obj.remove("layer_types");
    obj.insert("transformers_version".into(), json!("4.51.0"));
    old
}

#[test]
fn old_and_new_config_formats_parse_alike() {
    let new = fixture_config_json();
    let old = old_format(&new);
    assert!(old.get("rope_parameters").is_none() && old.get("rope_theta").is_some());
    let from_new = Qwen3Config::from_hf_str(&new.to_string()).unwrap();
    let from_old = Qwen3Config::from_hf_str(&old.to_string()).unwrap();
    assert_eq!(from_new, from_old);
    assert_eq!(from_new, fixture_config());
    assert_eq!(from_new.head_dim, 16);
    // Without head_dim, transformers' Qwen3Config default of 128 applies (not hidden / heads).
    let mut no_head_dim = new.clone();
    no_head_dim.as_object_mut().unwrap().remove("head_dim");
    assert_eq!(
        Qwen3Config::from_hf_str(&no_head_dim.to_string())
            .unwrap()
            .head_dim,
        128
    );
    assert_eq!(from_new.num_key_value_heads, 2);
    assert!(from_new.tie_word_embeddings);

    // The fixture's theta is also the fallback default; a different one must be read from
    // either place.
    let mut new_1m = new.clone();
    new_1m["rope_parameters"]["rope_theta"] = json!(1_000_000.0);
    let old_1m = old_format(&new_1m);
    let a = Qwen3Config::from_hf_str(&new_1m.to_string()).unwrap();
    let b = Qwen3Config::from_hf_str(&old_1m.to_string()).unwrap();
    assert_eq!(a.rope_theta, 1_000_000.0);
    assert_eq!(a, b);
}

#[test]
fn unsupported_configs_are_refused_naming_the_key() {
    let new = fixture_config_json();
    let refuse = |v: &Value, key: &str| {
        let err = format!(
            "{:#}",
            Qwen3Config::from_hf_str(&v.to_string()).unwrap_err()
        );
        assert!(err.contains(key), "error should name {key}: {err}");
    };
    let mut llama = new.clone();
    llama["model_type"] = json!("llama");
    refuse(&llama, "model_type");
    refuse(&old_format(&llama), "model_type");

    let mut scaled = old_format(&new);
    scaled["rope_scaling"] = json!({"rope_type": "yarn", "factor": 4.0,
        "original_max_position_embeddings": 32768});
    refuse(&scaled, "rope_scaling");

    let mut yarn = new.clone();
    yarn["rope_parameters"]["rope_type"] = json!("yarn");
    refuse(&yarn, "rope_type");
}

// ---------------------------------------------------------------------------------------------
// 3. bf16 and f16 checkpoints
// ---------------------------------------------------------------------------------------------

#[test]
fn bf16_and_f16_checkpoints_compute_as_their_values_in_f32() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = fixture_config();
    let f32_weights = fixture_weights();
    let unrounded = logits(&build(&cfg, f32_weights.clone()).0);
    for dtype in [DType::BF16, DType::F16] {
        let dir = tmp.path().join(format!("{dtype:?}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(
            fixture_model_dir().join("config.json"),
            dir.join("config.json"),
        )
        .unwrap();
        let stored: Weights = f32_weights
            .iter()
            .map(|(n, t)| (n.clone(), t.to_dtype(dtype).unwrap()))
            .collect();
        candle_core::safetensors::save(&stored, dir.join("model.safetensors")).unwrap();

        let files = resolve_checkpoint(dir.to_str().unwrap(), "main").unwrap();
        let loaded = read_weights(&files).unwrap();
        assert_eq!(loaded.len(), f32_weights.len());
        assert!(
            loaded.values().all(|t| t.dtype() == dtype),
            "{dtype:?}: read as stored"
        );
        // Dense parameters keep the checkpoint's dtype (train.dense_dtype = "checkpoint"),
        // ternary latents become f32.
        let (model, params) = build(&cfg, loaded.clone());
        assert!(
            params.named.iter().all(|(_, v)| v.dtype() == dtype),
            "{dtype:?}: dense parameters keep the checkpoint's dtype"
        );
        let ternary = TernarySpec::new(
            vec![Projection::Q, Projection::Down],
            ternlab::spec::GroupSize::Columns(16),
        );
        let (_, params) = Qwen3::new(&cfg, loaded.clone(), &ternary, &Device::Cpu).unwrap();
        for (name, v) in &params.named {
            let latent = name.ends_with("q_proj.weight") || name.ends_with("down_proj.weight");
            let want = if latent { DType::F32 } else { dtype };
            assert_eq!(v.dtype(), want, "{dtype:?}: {name}");
        }
        let kept = logits(&model);
        // train.dense_dtype = "f32": the stored values, widened (what run.rs does).
        let widened: Weights = loaded
            .into_iter()
            .map(|(n, t)| (n, t.to_dtype(DType::F32).unwrap()))
            .collect();
        let got = logits(&build(&cfg, widened).0);

        let rounded: Weights = f32_weights
            .iter()
            .map(|(n, t)| {
                let r = t.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap();
                (n.clone(), r)
            })
            .collect();
        let want = logits(&build(&cfg, rounded).0);
        let err = rel_err(&got, &want);
        assert!(
            err < 1e-6,
            "{dtype:?}: vs rounded f32, relative error {err:e}"
        );
        // Kept in the checkpoint's dtype, the embedding rows enter the first layer in that
        // dtype and its input norm rounds to it, as in the seed (MLX): a small difference.
        let first_norm = rel_err(&kept, &want);
        assert!(
            first_norm > 1e-6 && first_norm < 2e-2,
            "{dtype:?}: kept vs widened, relative error {first_norm:e}"
        );
        let moved = rel_err(&got, &unrounded);
        eprintln!(
            "{dtype:?}: vs rounded f32 {err:e}, vs unrounded f32 {moved:e}, kept {first_norm:e}"
        );
        assert!(
            moved > 1e-6,
            "{dtype:?}: the logits should differ from the unrounded f32 model's ({moved:e})"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 4. Untied output head
// ---------------------------------------------------------------------------------------------

/// A local model dir: the fixture's config with `tie_word_embeddings` = `tied`, and `weights`.
fn write_model_dir(dir: &Path, tied: bool, weights: &Weights) -> Qwen3Config {
    std::fs::create_dir_all(dir).unwrap();
    let mut cfg_json = fixture_config_json();
    cfg_json["tie_word_embeddings"] = json!(tied);
    write_json(&dir.join("config.json"), &cfg_json);
    candle_core::safetensors::save(weights, dir.join("model.safetensors")).unwrap();
    Qwen3Config::from_hf_json(&dir.join("config.json")).unwrap()
}

fn load_dir(dir: &Path) -> Weights {
    read_weights(&resolve_checkpoint(dir.to_str().unwrap(), "main").unwrap()).unwrap()
}

#[test]
fn untied_head_is_its_own_parameter() {
    let tmp = tempfile::tempdir().unwrap();
    let tied_weights = fixture_weights();
    let embed = tied_weights["model.embed_tokens.weight"].clone();
    let mut with_head = tied_weights.clone();
    with_head.insert("lm_head.weight".into(), embed.copy().unwrap());

    let untied_dir = tmp.path().join("untied");
    let cfg = write_model_dir(&untied_dir, false, &with_head);
    assert!(!cfg.tie_word_embeddings);
    let (untied, untied_params) = build(&cfg, load_dir(&untied_dir));
    let (tied, tied_params) = build(&fixture_config(), tied_weights.clone());

    // (a) lm_head = embedding: the same function.
    let (x, y) = batch();
    let untied_logits = untied.forward(&x).unwrap();
    let tied_logits = tied.forward(&x).unwrap();
    let err = rel_err(&untied_logits, &tied_logits);
    assert!(err < 1e-6, "untied vs tied logits: relative error {err:e}");

    // (b) One more parameter, and the embedding's gradient no longer carries the head's.
    assert!(tied_params.get("lm_head.weight").is_none());
    let head = untied_params
        .get("lm_head.weight")
        .expect("untied params hold lm_head.weight");
    assert_eq!(untied_params.named.len(), tied_params.named.len() + 1);
    let g_untied = cross_entropy(&untied_logits, &y)
        .unwrap()
        .backward()
        .unwrap();
    let g_tied = cross_entropy(&tied_logits, &y).unwrap().backward().unwrap();
    let embed_untied = g_untied
        .get(untied_params.get("model.embed_tokens.weight").unwrap())
        .unwrap();
    let embed_tied = g_tied
        .get(tied_params.get("model.embed_tokens.weight").unwrap())
        .unwrap();
    let head_grad = g_untied.get(head).expect("lm_head.weight has a gradient");
    let apart = rel_err(embed_untied, embed_tied);
    eprintln!("embedding gradient, untied vs tied: relative difference {apart:e}");
    assert!(
        apart > 1e-2,
        "untied embedding gradient equals the tied one ({apart:e})"
    );
    // The tied embedding gets both paths: input embedding + output head.
    let both = (embed_untied + head_grad).unwrap();
    let err = rel_err(&both, embed_tied);
    assert!(err < 1e-5, "tied grad vs embed + head grads: {err:e}");

    // (c) An untied config whose checkpoint has no lm_head.weight.
    let headless_dir = tmp.path().join("headless");
    let cfg = write_model_dir(&headless_dir, false, &tied_weights);
    let err = match Qwen3::new(&cfg, load_dir(&headless_dir), &dense(), &Device::Cpu) {
        Ok(_) => panic!("an untied model without lm_head.weight must not build"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("lm_head.weight"), "{err}");

    // And a tied config ignores an lm_head.weight present in its checkpoint.
    let mut other_head = tied_weights.clone();
    other_head.insert("lm_head.weight".into(), embed.zeros_like().unwrap());
    let tied_dir = tmp.path().join("tied-with-head");
    let cfg = write_model_dir(&tied_dir, true, &other_head);
    let (model, params) = build(&cfg, load_dir(&tied_dir));
    assert!(params.get("lm_head.weight").is_none());
    assert_eq!(max_abs_diff(&model.forward(&x).unwrap(), &tied_logits), 0.0);
}
