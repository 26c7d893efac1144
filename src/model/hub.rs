//! The Hugging Face hub side of `load` (model repos) and of `eval --dataset` (dataset repos):
//! the standard cache (HF_HUB_CACHE / HF_HOME, HF_HUB_OFFLINE, revisions as branches or
//! commits), downloads from HF_ENDPOINT through hf-hub's client, and the checks hf-hub leaves
//! out (a blob's sha256, cut connections).

use super::load::{shard_names, CheckpointFiles};
use anyhow::{bail, Context, Result};
use hf_hub::api::sync::{ApiBuilder, ApiError, ApiRepo};
use hf_hub::{Cache, Repo, RepoType};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

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

/// Looks a file up in the hub cache; the repo's revision may be a branch / tag (through
/// `refs/`) or a commit hash (a snapshot folder of that name).
fn cached(cache: &Cache, repo: &Repo, file: &str) -> Option<PathBuf> {
    if let Some(p) = cache.repo(repo.clone()).get(file) {
        return Some(p);
    }
    let snapshot = cache
        .path()
        .join(repo.folder_name())
        .join("snapshots")
        .join(repo.revision())
        .join(file);
    snapshot.is_file().then_some(snapshot)
}

/// One file of the dataset repo `repo_id` at `revision`: from the hub cache, else downloaded
/// into it (`<cache>/datasets--<owner>--<name>/snapshots/<commit>/<file>`, where
/// huggingface_hub puts it). Offline and not cached, or absent on the hub, is an error that
/// says which and what to do.
pub fn dataset_file(repo_id: &str, revision: &str, file: &str) -> Result<PathBuf> {
    let hub = HubRepo::new(repo_id, revision, RepoType::Dataset);
    hub.get(file)?.with_context(|| hub.not_found(file))
}

pub(super) fn from_hub(repo_id: &str, revision: &str) -> Result<CheckpointFiles> {
    let hub = HubRepo::new(repo_id, revision, RepoType::Model);
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

/// One repo (a model's or a dataset's) at one revision: files from the hub cache, else
/// downloaded through hf-hub's client into that cache (unless offline).
struct HubRepo<'a> {
    repo_id: &'a str,
    revision: &'a str,
    repo_type: RepoType,
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
    fn new(repo_id: &'a str, revision: &'a str, repo_type: RepoType) -> Self {
        Self {
            repo_id,
            revision,
            repo_type,
            cache: Cache::new(hub_cache_dir()),
            offline: hub_offline(),
            api: std::cell::OnceCell::new(),
            absent: Default::default(),
        }
    }

    fn repo(&self) -> Repo {
        Repo::with_revision(
            self.repo_id.to_string(),
            self.repo_type,
            self.revision.to_string(),
        )
    }

    fn cached(&self, file: &str) -> Option<PathBuf> {
        cached(&self.cache, &self.repo(), file)
    }

    fn kind(&self) -> &'static str {
        match self.repo_type {
            RepoType::Model => "model",
            RepoType::Dataset => "dataset",
            RepoType::Space => "space",
        }
    }

    /// `repo@revision` for a model (as the spec names it), `dataset repo@revision` for a dataset.
    fn at(&self) -> String {
        match self.repo_type {
            RepoType::Model => format!("{}@{}", self.repo_id, self.revision),
            _ => format!("{} {}@{}", self.kind(), self.repo_id, self.revision),
        }
    }

    /// What to check when the hub lacks the repo, a revision or a file. A model's repo and
    /// revision are the spec's; a dataset's come from ternlab's table (`crate::dataset`), so
    /// there the endpoint is what can be wrong.
    fn what_to_check(&self) -> &'static str {
        match self.repo_type {
            RepoType::Model => "check model.source and model.revision",
            _ => "check that HF_ENDPOINT (if set) names the hub or a mirror that carries it",
        }
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
            "{} (hub cache {}{})",
            self.at(),
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
                 {:?}{answer}; {}",
                self.where_(),
                self.revision,
                self.what_to_check()
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
        let repo = api.repo(self.repo());
        Ok(self.api.get_or_init(|| (repo, endpoint)))
    }

    fn download(&self, file: &str) -> Result<PathBuf, Failed> {
        let (repo, endpoint) = self.api().map_err(|e| {
            Failed::Error(e.context(format!(
                "{}: {file} is not in the hub cache {} and must be downloaded",
                self.at(),
                self.cache.path().display()
            )))
        })?;
        let url = repo.url(file);
        let pointer = repo
            .download(file)
            .map_err(|e| self.explain(file, &url, endpoint, e))?;
        check_blob(&pointer).map_err(|e| {
            Failed::Error(e.context(format!("{}: downloading {file} from {endpoint}", self.at())))
        })?;
        Ok(pointer)
    }

    /// hf-hub's error as what happened and what to do.
    fn explain(&self, file: &str, url: &str, endpoint: &str, e: ApiError) -> Failed {
        let (repo_id, revision) = (self.repo_id, self.revision);
        let at = self.at();
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
                    let model = matches!(self.repo_type, RepoType::Model);
                    match (code, error_code.as_str()) {
                        (_, "RepoNotFound") | (401, "") if !model => format!(
                            "{at}: the hub at {endpoint} has no {} repo {repo_id:?} ({detail} \
                             for {url}); {} (a private or gated repo answers the same without \
                             a token: log in with `huggingface-cli login`)",
                            self.kind(),
                            self.what_to_check()
                        ),
                        (_, "RepoNotFound") | (401, "") => format!(
                            "{at}: the hub at {endpoint} has no model repo {repo_id:?} ({detail} \
                             for {url}); check model.source: a hub repo id like \
                             \"Qwen/Qwen3-0.6B\", or an existing local directory (a private or \
                             gated repo answers the same without a token: log in with \
                             `huggingface-cli login`)"
                        ),
                        (_, "RevisionNotFound") if !model => format!(
                            "{at}: {repo_id} has no revision {revision:?} on {endpoint} \
                             ({detail} for {url}); {}",
                            self.what_to_check()
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
        self.cache
            .path()
            .join(self.repo().folder_name())
            .join("blobs")
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
