//! Where a model comes from: a local Hugging Face directory, a hub repo id resolved through the
//! standard Hugging Face cache (HF_HUB_CACHE / HF_HOME, HF_HUB_OFFLINE, the revision) and
//! downloaded from HF_ENDPOINT when missing there, or a built-in preset with seeded random
//! init. Single-file and sharded safetensors; bf16, f16 and f32 checkpoints (the model decides
//! which parameters become f32).

use super::config::Qwen3Config;
use super::weights::Weights;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use hf_hub::api::sync::{ApiBuilder, ApiError, ApiRepo};
use hf_hub::{Cache, Repo, RepoType};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// The files of one checkpoint on local disk.
#[derive(Debug, Clone)]
pub struct CheckpointFiles {
    pub config: PathBuf,
    pub tokenizer: Option<PathBuf>,
    pub safetensors: Vec<PathBuf>,
    /// Where it was found, for reports: a directory or `repo@revision (snapshot path)`.
    pub origin: String,
}

/// The hub cache folder, as huggingface_hub decides it.
pub fn hub_cache_dir() -> PathBuf {
    if let Ok(p) = std::env::var("HF_HUB_CACHE") {
        return PathBuf::from(p);
    }
    if let Ok(p) = std::env::var("HF_HOME") {
        return PathBuf::from(p).join("hub");
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| ".".into());
    PathBuf::from(home).join(".cache/huggingface/hub")
}

pub fn hub_offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        })
        .unwrap_or(false)
}

/// Finds a checkpoint: an existing directory, else a hub repo id.
pub fn resolve_checkpoint(source: &str, revision: &str) -> Result<CheckpointFiles> {
    let dir = Path::new(source);
    if dir.is_dir() {
        return from_dir(dir);
    }
    let looks_like_repo = source.split('/').count() == 2
        && !source.starts_with('.')
        && !source.starts_with('/')
        && source.split('/').all(|p| !p.is_empty());
    if !looks_like_repo {
        bail!(
            "model.source = {source:?} is neither an existing directory nor a hub repo id \
             like \"Qwen/Qwen3-0.6B\""
        );
    }
    from_hub(source, revision)
}

fn from_dir(dir: &Path) -> Result<CheckpointFiles> {
    let config = dir.join("config.json");
    if !config.is_file() {
        bail!("{}: no config.json in the model directory", dir.display());
    }
    let index = dir.join("model.safetensors.index.json");
    let safetensors = if index.is_file() {
        shard_names(&index)?
            .into_iter()
            .map(|f| dir.join(f))
            .collect()
    } else {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        files
    };
    if safetensors.is_empty() {
        bail!(
            "{}: no *.safetensors weights in the model directory",
            dir.display()
        );
    }
    for f in &safetensors {
        if !f.is_file() {
            bail!("{}: missing weight shard", f.display());
        }
    }
    let tokenizer = Some(dir.join("tokenizer.json")).filter(|p| p.is_file());
    Ok(CheckpointFiles {
        config,
        tokenizer,
        safetensors,
        origin: dir.display().to_string(),
    })
}

/// Shard file names listed by a `model.safetensors.index.json`, in order, without repeats.
fn shard_names(index: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index)?;
    let json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}", index.display()))?;
    let map = json["weight_map"]
        .as_object()
        .with_context(|| format!("{}: no weight_map", index.display()))?;
    let mut names: Vec<String> = map
        .values()
        .filter_map(|v| v.as_str().map(String::from))
        .collect();
    names.sort();
    names.dedup();
    Ok(names)
}

/// Looks a file up in the hub cache; a `revision` may be a branch / tag (through `refs/`) or a
/// commit hash (a snapshot folder of that name).
fn cached(cache: &Cache, repo_id: &str, revision: &str, file: &str) -> Option<PathBuf> {
    let repo = Repo::with_revision(repo_id.to_string(), RepoType::Model, revision.to_string());
    if let Some(p) = cache.repo(repo.clone()).get(file) {
        return Some(p);
    }
    let snapshot = cache
        .path()
        .join(repo.folder_name())
        .join("snapshots")
        .join(revision)
        .join(file);
    snapshot.is_file().then_some(snapshot)
}

fn from_hub(repo_id: &str, revision: &str) -> Result<CheckpointFiles> {
    let hub = HubRepo::new(repo_id, revision);
    let config = hub
        .get("config.json")?
        .with_context(|| hub.not_found("config.json"))?;
    // What the cache already holds decides first, so a fully cached model resolves without
    // asking the network for files it does not have (an unsharded model has no index).
    let cached_single = hub.cached("model.safetensors");
    let cached_index = hub.cached("model.safetensors.index.json");
    let index = match (&cached_single, cached_index) {
        (Some(_), _) => None,
        (None, Some(i)) => Some(i),
        (None, None) => hub.get("model.safetensors.index.json")?,
    };
    let safetensors = if let Some(index) = index {
        shard_names(&index)?
            .iter()
            .map(|f| hub.get(f)?.with_context(|| hub.not_found(f)))
            .collect::<Result<Vec<_>>>()?
    } else {
        let single = match cached_single {
            Some(p) => Some(p),
            None => hub.get("model.safetensors")?,
        };
        vec![single.with_context(|| hub.not_found("model.safetensors"))?]
    };
    let tokenizer = hub.get("tokenizer.json")?;
    // Optional, beside config.json: where generation stops (`train::eos_ids`).
    for f in ["generation_config.json", "tokenizer_config.json"] {
        hub.get(f)?;
    }
    let origin = format!(
        "{repo_id}@{revision} ({})",
        config.parent().unwrap_or(Path::new("")).display()
    );
    Ok(CheckpointFiles {
        config,
        tokenizer,
        safetensors,
        origin,
    })
}

/// The hub's base URL, as huggingface_hub decides it: `HF_ENDPOINT` without trailing slashes
/// (a mirror, or a local server), else https://huggingface.co.
pub fn hub_endpoint() -> Result<String> {
    let value = std::env::var("HF_ENDPOINT").unwrap_or_default();
    let endpoint = value.trim().trim_end_matches('/');
    if endpoint.is_empty() {
        return Ok(DEFAULT_HUB_ENDPOINT.into());
    }
    let host = endpoint
        .strip_prefix("https://")
        .or_else(|| endpoint.strip_prefix("http://"));
    if host.is_none_or(|h| h.is_empty() || h.starts_with('/')) {
        bail!(
            "HF_ENDPOINT = {value:?} is not an http(s) URL; set it to the base URL of a \
             Hugging Face hub or mirror, like \"{DEFAULT_HUB_ENDPOINT}\", or unset it"
        );
    }
    Ok(endpoint.to_string())
}

pub const DEFAULT_HUB_ENDPOINT: &str = "https://huggingface.co";

/// One repo at one revision: files from the hub cache, else downloaded through hf-hub's
/// client into that cache (unless offline).
struct HubRepo<'a> {
    repo_id: &'a str,
    revision: &'a str,
    cache: Cache,
    offline: bool,
    /// The client and its endpoint, made when the first download is needed (a cached or
    /// offline model never reads HF_ENDPOINT).
    api: std::cell::OnceCell<(ApiRepo, String)>,
    /// What the hub answered for files it does not have, by file name.
    absent: std::cell::RefCell<std::collections::BTreeMap<String, String>>,
}

/// Why a download did not give the file.
enum Failed {
    /// The revision has no such file (an optional one may be absent).
    NoSuchFile(String),
    Error(anyhow::Error),
}

impl<'a> HubRepo<'a> {
    fn new(repo_id: &'a str, revision: &'a str) -> Self {
        Self {
            repo_id,
            revision,
            cache: Cache::new(hub_cache_dir()),
            offline: hub_offline(),
            api: std::cell::OnceCell::new(),
            absent: Default::default(),
        }
    }

    fn cached(&self, file: &str) -> Option<PathBuf> {
        cached(&self.cache, self.repo_id, self.revision, file)
    }

    /// The file from the cache, else downloaded; `None` when offline and not cached, or when
    /// the revision has no such file.
    fn get(&self, file: &str) -> Result<Option<PathBuf>> {
        if let Some(p) = self.cached(file) {
            return Ok(Some(p));
        }
        if self.offline {
            return Ok(None);
        }
        match self.download(file) {
            Ok(p) => Ok(Some(p)),
            Err(Failed::NoSuchFile(answer)) => {
                self.absent.borrow_mut().insert(file.to_string(), answer);
                Ok(None)
            }
            Err(Failed::Error(e)) => Err(e),
        }
    }

    /// `repo@revision (hub cache ...)`.
    fn where_(&self) -> String {
        format!(
            "{}@{} (hub cache {}{})",
            self.repo_id,
            self.revision,
            self.cache.path().display(),
            if self.offline {
                ", HF_HUB_OFFLINE is set"
            } else {
                ""
            }
        )
    }

    /// The error for a required file that neither the cache nor the hub has.
    fn not_found(&self, file: &str) -> String {
        if self.offline {
            format!(
                "{file} of {} not found; download it once with network access, or unset \
                 HF_HUB_OFFLINE",
                self.where_()
            )
        } else {
            let endpoint = self.api.get().map(|(_, e)| e.as_str()).unwrap_or("?");
            let answer = match self.absent.borrow().get(file) {
                Some(a) => format!(" ({a})"),
                None => String::new(),
            };
            format!(
                "{file} of {} not found: the hub at {endpoint} has no {file} at revision \
                 {:?}{answer}; check model.source and model.revision",
                self.where_(),
                self.revision
            )
        }
    }

    fn api(&self) -> Result<&(ApiRepo, String)> {
        if let Some(a) = self.api.get() {
            return Ok(a);
        }
        let endpoint = hub_endpoint()?;
        let api = ApiBuilder::from_cache(self.cache.clone())
            .with_endpoint(endpoint.clone())
            .with_progress(true)
            .build()
            .context("starting the hub client")?;
        let repo = api.repo(Repo::with_revision(
            self.repo_id.to_string(),
            RepoType::Model,
            self.revision.to_string(),
        ));
        Ok(self.api.get_or_init(|| (repo, endpoint)))
    }

    fn download(&self, file: &str) -> Result<PathBuf, Failed> {
        let (repo, endpoint) = self.api().map_err(|e| {
            Failed::Error(e.context(format!(
                "{}@{}: {file} is not in the hub cache {} and must be downloaded",
                self.repo_id,
                self.revision,
                self.cache.path().display()
            )))
        })?;
        let url = repo.url(file);
        let pointer = repo
            .download(file)
            .map_err(|e| self.explain(file, &url, endpoint, e))?;
        check_blob(&pointer).map_err(|e| {
            Failed::Error(e.context(format!(
                "{}@{}: downloading {file} from {endpoint}",
                self.repo_id, self.revision
            )))
        })?;
        Ok(pointer)
    }

    /// hf-hub's error as what happened and what to do.
    fn explain(&self, file: &str, url: &str, endpoint: &str, e: ApiError) -> Failed {
        let (repo_id, revision) = (self.repo_id, self.revision);
        let at = format!("{repo_id}@{revision}");
        let from_env = if std::env::var("HF_ENDPOINT").is_ok_and(|v| !v.trim().is_empty()) {
            "HF_ENDPOINT"
        } else {
            "the default; HF_ENDPOINT sets another"
        };
        let offline_hint = format!(
            "without a network, copy a hub cache that holds {at} to {} and set \
             HF_HUB_OFFLINE=1",
            self.cache.path().display()
        );
        let msg = match e {
            ApiError::RequestError(err) => match *err {
                ureq::Error::Status(code, resp) => {
                    let error_code = resp.header("x-error-code").unwrap_or("").to_string();
                    let detail = match resp.header("x-error-message") {
                        Some(m) => format!("HTTP {code} {error_code}: {m}"),
                        None => format!("HTTP {code} {error_code}").trim_end().to_string(),
                    };
                    match (code, error_code.as_str()) {
                        (_, "RepoNotFound") | (401, "") => format!(
                            "{at}: the hub at {endpoint} has no model repo {repo_id:?} ({detail} \
                             for {url}); check model.source: a hub repo id like \
                             \"Qwen/Qwen3-0.6B\", or an existing local directory (a private or \
                             gated repo answers the same without a token: log in with \
                             `huggingface-cli login`)"
                        ),
                        (_, "RevisionNotFound") => format!(
                            "{at}: {repo_id} has no revision {revision:?} on {endpoint} \
                             ({detail} for {url}); set model.revision to a branch, tag or \
                             commit hash of {repo_id} (\"main\" is the default branch)"
                        ),
                        (404, _) => return Failed::NoSuchFile(format!("{detail} for {url}")),
                        (403, _) => format!(
                            "{at}: the hub at {endpoint} refuses {file} ({detail} for {url}); \
                             for a gated repo accept its terms on the hub and log in with \
                             `huggingface-cli login`"
                        ),
                        _ => format!(
                            "{at}: the hub at {endpoint} answered {detail} {} for {url}; try \
                             again later; {offline_hint}",
                            resp.status_text()
                        ),
                    }
                }
                ureq::Error::Transport(t) => format!(
                    "{at}: cannot reach the hub at {endpoint} ({from_env}) for {file}: {t}; \
                     check the network and HF_ENDPOINT; {offline_hint}"
                ),
            },
            ApiError::IoError(io) if is_cut_connection(&io) => format!(
                "{at}: downloading {file} from {endpoint} broke off: {io}; nothing incomplete \
                 is used as the file (the part already received waits in {} as a .part file \
                 and the next run resumes it): run again",
                self.blobs_dir().display()
            ),
            ApiError::IoError(io) => format!(
                "{at}: writing {file} into the hub cache {}: {io}; check its permissions and \
                 free space (HF_HUB_CACHE or HF_HOME move it)",
                self.cache.path().display()
            ),
            ApiError::InvalidResume => format!(
                "{at}: a partial download of {file} in {} (a .part file) is longer than the \
                 file on the hub; delete that .part file and run again",
                self.blobs_dir().display()
            ),
            ApiError::LockAcquisition(lock) => format!(
                "{at}: another process is downloading {file} (it holds {}); wait for it to \
                 finish and run again",
                lock.display()
            ),
            e @ (ApiError::MissingHeader(_)
            | ApiError::InvalidHeader(_)
            | ApiError::ParseIntError(_)) => format!(
                "{at}: the answer of {endpoint} for {url} is not a Hugging Face hub's: {e}; \
                 check that HF_ENDPOINT names a hub or a mirror of one"
            ),
            other => format!("{at}: downloading {file} from {endpoint}: {other}"),
        };
        Failed::Error(anyhow::anyhow!(msg))
    }

    fn blobs_dir(&self) -> PathBuf {
        let repo = Repo::with_revision(
            self.repo_id.to_string(),
            RepoType::Model,
            self.revision.to_string(),
        );
        self.cache.path().join(repo.folder_name()).join("blobs")
    }
}

/// A transfer that stopped before its end: the body closed early, a reset, a timeout.
fn is_cut_connection(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe | TimedOut
    )
}

/// A fresh download's blob is named by the hash the hub announced for it: for a large (LFS)
/// file that is its sha256 (X-Linked-Etag). hf-hub 0.4.3 checks neither the size nor the hash,
/// so a body cut short without a Content-Length, or a resumed `.part` that the server answered
/// from the start, would be linked into the snapshot as if complete. Checks the sha256 and, on
/// a mismatch, takes the file out of the cache again.
fn check_blob(pointer: &Path) -> Result<()> {
    let blob = std::fs::canonicalize(pointer)
        .with_context(|| format!("following {}", pointer.display()))?;
    let name = blob.file_name().and_then(|n| n.to_str()).unwrap_or("");
    if name.len() != 64 || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(());
    }
    let mut hasher = Sha256::new();
    let mut f =
        std::fs::File::open(&blob).with_context(|| format!("reading {}", blob.display()))?;
    let size = std::io::copy(&mut f, &mut hasher)
        .with_context(|| format!("reading {}", blob.display()))?;
    let got: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if got != name.to_ascii_lowercase() {
        // The link too: hf-hub would not replace a link left dangling.
        let _ = std::fs::remove_file(pointer);
        let _ = std::fs::remove_file(&blob);
        bail!(
            "the {size} bytes received have sha256 {got}, not the {name} that the hub \
             announced (a transfer cut short or garbled); they were removed from the cache: \
             run again"
        );
    }
    Ok(())
}

/// Reads every tensor of the checkpoint onto the CPU (dtype as stored).
pub fn read_weights(files: &CheckpointFiles) -> Result<Weights> {
    let mut all = Weights::new();
    for f in &files.safetensors {
        let tensors = candle_core::safetensors::load(f, &Device::Cpu)
            .with_context(|| format!("reading {}", f.display()))?;
        for (name, t) in tensors {
            if all.contains_key(&name) {
                bail!(
                    "{}: tensor {name} also appears in another weight file of the checkpoint",
                    f.display()
                );
            }
            match t.dtype() {
                DType::F32 | DType::BF16 | DType::F16 => {}
                other => bail!("{}: tensor {name} has dtype {other:?}", f.display()),
            }
            all.insert(name, t);
        }
    }
    Ok(all)
}

/// Seeded random init as transformers' Qwen3 `_init_weights`: every matrix N(0, 0.02),
/// every norm weight 1, stored in bf16 as Qwen3 checkpoints ship (so a preset trains like the
/// real model: bf16 embeddings and norms under `train.dense_dtype = "checkpoint"`). Same seed,
/// same weights, on every machine.
pub fn random_weights(cfg: &Qwen3Config, seed: u64) -> Result<Weights> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let normal = Normal::new(0f32, 0.02).expect("valid std");
    let mut w = Weights::new();
    let mut matrix = |w: &mut Weights, name: String, rows: usize, cols: usize| -> Result<()> {
        let data: Vec<f32> = (0..rows * cols).map(|_| normal.sample(&mut rng)).collect();
        w.insert(name, Tensor::from_vec(data, (rows, cols), &Device::Cpu)?);
        Ok(())
    };
    let ones = |n: usize| Tensor::ones(n, DType::F32, &Device::Cpu);
    let (e, f, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let (h, k, d) = (
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
    );
    matrix(&mut w, "model.embed_tokens.weight".into(), v, e)?;
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        matrix(&mut w, format!("{p}.self_attn.q_proj.weight"), h * d, e)?;
        matrix(&mut w, format!("{p}.self_attn.k_proj.weight"), k * d, e)?;
        matrix(&mut w, format!("{p}.self_attn.v_proj.weight"), k * d, e)?;
        matrix(&mut w, format!("{p}.self_attn.o_proj.weight"), e, h * d)?;
        matrix(&mut w, format!("{p}.mlp.gate_proj.weight"), f, e)?;
        matrix(&mut w, format!("{p}.mlp.up_proj.weight"), f, e)?;
        matrix(&mut w, format!("{p}.mlp.down_proj.weight"), e, f)?;
        for n in ["self_attn.q_norm", "self_attn.k_norm"] {
            w.insert(format!("{p}.{n}.weight"), ones(d)?);
        }
        for n in ["input_layernorm", "post_attention_layernorm"] {
            w.insert(format!("{p}.{n}.weight"), ones(e)?);
        }
    }
    w.insert("model.norm.weight".into(), ones(e)?);
    if !cfg.tie_word_embeddings {
        matrix(&mut w, "lm_head.weight".into(), v, e)?;
    }
    for t in w.values_mut() {
        *t = t.to_dtype(DType::BF16)?;
    }
    Ok(w)
}
