//! `model.source = "Qwen/Qwen3-0.6B"` with a cold Hugging Face cache, end to end: the real
//! `ternlab` binary downloads through hf-hub's client from a local hub
//! (tests/common/hub_server.rs, reached through HF_ENDPOINT) into a fresh HF_HOME per test,
//! then trains. The repo holds the parity fixture (tests/fixtures/parity/model, vocab 256)
//! with a 256-entry byte-level tokenizer at `main`, and other weights on the branch `v2`.
//! Checked: the standard cache layout after a cold download and its reuse without the network
//! (offline, and with the server gone), branch and commit-hash revisions, a renamed repo's
//! redirect, and exit code 2 with a message naming model.source, the repo, the revision and
//! the remedy for a missing repo, a missing revision, a refused connection, a bad HF_ENDPOINT
//! and a download cut short (which leaves nothing in the cache that passes for the file, and
//! which a rerun against a healthy server completes).

mod common;

use common::cli::{self, quote, Ran};
use common::hub_server::{blob_id, is_lfs, sha256_hex, Fault, Hub, HubServer};
use common::{fixture_config, fixture_dir};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::TokenizerBuilder;

const REPO: &str = "Qwen/Qwen3-0.6B";
const REPO_DIR: &str = "models--Qwen--Qwen3-0.6B";

// ---------------------------------------------------------------------------------------------
// The served repo
// ---------------------------------------------------------------------------------------------

/// A byte-level BPE without merges: one token per byte, 256 entries (the model's vocab_size).
fn byte_tokenizer_json() -> Vec<u8> {
    let mut alphabet: Vec<char> = ByteLevel::alphabet().into_iter().collect();
    alphabet.sort();
    assert_eq!(alphabet.len(), 256);
    let vocab: Vocab = alphabet
        .iter()
        .enumerate()
        .map(|(i, c)| (c.to_string(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, Vec::new())
        .build()
        .unwrap();
    let tokenizer =
        TokenizerBuilder::<BPE, NormalizerWrapper, ByteLevel, ByteLevel, ByteLevel>::new()
            .with_model(bpe)
            .with_pre_tokenizer(Some(ByteLevel::new(false, true, true)))
            .with_decoder(Some(ByteLevel::default()))
            .with_post_processor(Some(ByteLevel::default()))
            .build()
            .unwrap();
    assert_eq!(tokenizer.get_vocab_size(true), 256);
    tokenizer.to_string(true).unwrap().into_bytes()
}

/// The files of one commit, by name.
type Files = BTreeMap<String, Vec<u8>>;

struct Served {
    hub: Hub,
    main: String,
    v2: String,
    main_files: Files,
    v2_files: Files,
}

/// `Qwen/Qwen3-0.6B`: `main` -> the parity fixture, `v2` -> seeded random weights of the same
/// shapes (same config and tokenizer).
fn served() -> Served {
    let model = fixture_dir().join("model");
    let config = std::fs::read(model.join("config.json")).unwrap();
    let tokenizer = byte_tokenizer_json();
    let tmp = tempfile::tempdir().unwrap();
    let weights = ternlab::model::load::random_weights(&fixture_config(), 11).unwrap();
    candle_core::safetensors::save(&weights, tmp.path().join("v2.safetensors")).unwrap();
    let files = |weights: Vec<u8>| -> Files {
        [
            ("config.json", config.clone()),
            // Where generation stops (train::eos_ids reads them beside config.json).
            (
                "generation_config.json",
                br#"{"eos_token_id": [10, 0]}"#.to_vec(),
            ),
            ("model.safetensors", weights),
            ("tokenizer.json", tokenizer.clone()),
            (
                "tokenizer_config.json",
                br#"{"tokenizer_class": "Qwen2Tokenizer", "eos_token": null}"#.to_vec(),
            ),
        ]
        .into_iter()
        .map(|(n, b)| (n.to_string(), b))
        .collect()
    };
    let main_files = files(std::fs::read(model.join("model.safetensors")).unwrap());
    let v2_files = files(std::fs::read(tmp.path().join("v2.safetensors")).unwrap());
    assert_ne!(
        main_files["model.safetensors"],
        v2_files["model.safetensors"]
    );
    let as_refs = |f: &Files| -> Vec<(String, Vec<u8>)> {
        f.iter().map(|(n, b)| (n.clone(), b.clone())).collect()
    };
    let mut hub = Hub::default();
    let commit = |hub: &mut Hub, branch: &str, f: &Files| {
        let owned = as_refs(f);
        let list: Vec<(&str, &[u8])> = owned
            .iter()
            .map(|(n, b)| (n.as_str(), b.as_slice()))
            .collect();
        hub.commit(REPO, branch, &list)
    };
    let main = commit(&mut hub, "main", &main_files);
    let v2 = commit(&mut hub, "v2", &v2_files);
    assert_ne!(main, v2);
    Served {
        hub,
        main,
        v2,
        main_files,
        v2_files,
    }
}

// ---------------------------------------------------------------------------------------------
// Running ternlab
// ---------------------------------------------------------------------------------------------

/// A test's folder: its HF_HOME (`hf-home`, the cache in `hf-home/hub`) and its specs and
/// results.
struct Case {
    tmp: tempfile::TempDir,
    runs: usize,
}

/// What one `ternlab run` did, and where its results went.
struct Outcome {
    ran: Ran,
    results: PathBuf,
}

impl Outcome {
    fn report(&self) -> Value {
        let dir = self.results.join("hubtest");
        let runs: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}\n{}", dir.display(), self.ran.show()))
            .map(|e| e.unwrap().path())
            .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'))
            .collect();
        assert_eq!(runs.len(), 1, "one run folder: {runs:?}");
        cli::read_json(&runs[0].join("report.json"))
    }

    /// The report of a run that must have trained its 2 steps.
    fn trained(&self) -> Value {
        assert_eq!(
            self.ran.code,
            Some(0),
            "ternlab run failed: {}",
            self.ran.show()
        );
        let report = self.report();
        assert_eq!(report["status"], "completed");
        let curve = loss_curve(&report);
        assert_eq!(curve.len(), 2, "loss_curve {curve:?}");
        assert!(curve.iter().all(|l| l.is_finite()), "loss_curve {curve:?}");
        report
    }

    /// The error of a run that must have been refused before writing anything.
    fn refused(&self) -> String {
        assert_eq!(self.ran.code, Some(2), "{}", self.ran.show());
        assert!(
            !self.results.exists(),
            "nothing may be written under {}",
            self.results.display()
        );
        let stderr = self.ran.stderr.clone();
        eprintln!("refused as it should be:\n{stderr}");
        assert!(stderr.contains("key `model.source`"), "{stderr}");
        stderr
    }
}

fn loss_curve(report: &Value) -> Vec<f64> {
    report["loss_curve"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect()
}

impl Case {
    fn new() -> Self {
        Self {
            tmp: tempfile::tempdir().unwrap(),
            runs: 0,
        }
    }

    fn home(&self) -> PathBuf {
        self.tmp.path().join("hf-home")
    }

    fn repo_dir(&self, repo_dir: &str) -> PathBuf {
        self.home().join("hub").join(repo_dir)
    }

    /// `ternlab run` on a 2-step spec with `model.source = source` at `revision`, with
    /// HF_HOME = this case's, HF_ENDPOINT = `endpoint` and HF_HUB_OFFLINE=1 if `offline`; no
    /// other HF_* or proxy variable reaches it.
    fn run(&mut self, source: &str, revision: &str, endpoint: &str, offline: bool) -> Outcome {
        self.runs += 1;
        let spec_text = cli::spec_text(
            "hubtest",
            &[
                ("model.preset", ""),
                ("model.source", &quote(source)),
                ("model.revision", &quote(revision)),
                ("data.seq_len", "16"),
                ("quant.group_size", "32"),
                ("train.steps", "2"),
            ],
            "",
        );
        let spec = cli::write_spec(
            self.tmp.path(),
            &format!("spec-{}.toml", self.runs),
            &spec_text,
        );
        let results = self.tmp.path().join(format!("results-{}", self.runs));
        let mut cmd = cli::command(
            self.tmp.path(),
            &cli::spec_args("run", &spec, &results),
            &[],
        );
        for k in [
            "HF_ENDPOINT",
            "HF_HOME",
            "HF_HUB_CACHE",
            "HF_HUB_OFFLINE",
            "HF_TOKEN",
            "ALL_PROXY",
            "all_proxy",
            "HTTPS_PROXY",
            "https_proxy",
            "HTTP_PROXY",
            "http_proxy",
        ] {
            cmd.env_remove(k);
        }
        cmd.env("HF_HOME", self.home()).env("HF_ENDPOINT", endpoint);
        if offline {
            cmd.env("HF_HUB_OFFLINE", "1");
        }
        let out = cmd.output().expect("the ternlab binary starts");
        Outcome {
            ran: Ran {
                code: out.status.code(),
                stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            },
            results,
        }
    }
}

/// The blob name hf-hub gives a file: the sha256 for an LFS file (X-Linked-Etag), else the
/// git blob id (ETag).
fn etag(name: &str, bytes: &[u8]) -> String {
    if is_lfs(name) {
        sha256_hex(bytes)
    } else {
        blob_id(bytes)
    }
}

/// The standard layout: `refs/<branch>` holds `commit`; `snapshots/<commit>/<file>` is a
/// relative link to `blobs/<etag>` holding the served bytes, for exactly `files`; no partial
/// download is left in `blobs`.
fn assert_cached(repo_dir: &Path, branch: Option<&str>, commit: &str, files: &Files) {
    if let Some(branch) = branch {
        let refs = std::fs::read_to_string(repo_dir.join("refs").join(branch)).unwrap();
        assert_eq!(refs.trim(), commit, "refs/{branch}");
    }
    let snapshot = repo_dir.join("snapshots").join(commit);
    let mut listed: Vec<String> = std::fs::read_dir(&snapshot)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    listed.sort();
    assert_eq!(
        listed,
        files.keys().cloned().collect::<Vec<_>>(),
        "{}",
        snapshot.display()
    );
    for (name, bytes) in files {
        let link = snapshot.join(name);
        let blob = Path::new("../../blobs").join(etag(name, bytes));
        #[cfg(unix)]
        assert_eq!(
            std::fs::read_link(&link).unwrap(),
            blob,
            "{}",
            link.display()
        );
        assert_eq!(&std::fs::read(&link).unwrap(), bytes, "{}", link.display());
        assert_eq!(
            &std::fs::read(repo_dir.join("blobs").join(blob.file_name().unwrap())).unwrap(),
            bytes
        );
    }
    let parts: Vec<_> = std::fs::read_dir(repo_dir.join("blobs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".part"))
        .collect();
    assert!(parts.is_empty(), "partial downloads left: {parts:?}");
}

/// The model origin a report must name for `revision` resolved to `commit`.
fn assert_origin(report: &Value, case: &Case, revision: &str, commit: &str) {
    let origin = report["model_origin"].as_str().unwrap();
    assert!(origin.contains(&format!("{REPO}@{revision}")), "{origin}");
    let snapshot = case.repo_dir(REPO_DIR).join("snapshots").join(commit);
    assert!(origin.contains(&snapshot.display().to_string()), "{origin}");
}

/// An endpoint where nothing listens.
fn dead_endpoint() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    url
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn cold_cache_downloads_trains_and_fills_the_standard_cache() {
    let s = served();
    let server = HubServer::start(s.hub.clone());
    let mut case = Case::new();
    let out = case.run(REPO, "main", server.url(), false);
    let report = out.trained();
    assert_origin(&report, &case, "main", &s.main);
    assert_cached(
        &case.repo_dir(REPO_DIR),
        Some("main"),
        &s.main,
        &s.main_files,
    );

    // What the client asked: for each file a `bytes=0-0` probe of the resolve URL (headers
    // only), then the whole body; the LFS weights through the CDN redirect; the absent index
    // answered 404 and left out.
    let log = server.requests();
    let resolve = |f: &str| format!("/{REPO}/resolve/main/{f}");
    let asked = |path: &str, range: &str| {
        log.iter()
            .any(|r| r.path == path && r.range.as_deref() == Some(range) && r.method == "GET")
    };
    for f in [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(asked(&resolve(f), "bytes=0-0"), "{f}: {log:#?}");
        assert!(asked(&resolve(f), "bytes=0-"), "{f}: {log:#?}");
    }
    let cdn = format!("/cdn/{}", sha256_hex(&s.main_files["model.safetensors"]));
    assert!(
        asked(&resolve("model.safetensors"), "bytes=0-0"),
        "{log:#?}"
    );
    assert!(asked(&cdn, "bytes=0-0"), "{log:#?}");
    assert!(asked(&cdn, "bytes=0-"), "{log:#?}");
    let index = log
        .iter()
        .find(|r| r.path == resolve("model.safetensors.index.json"))
        .expect("the index is asked for");
    assert_eq!(index.status, 404);
    assert!(log.iter().all(|r| r
        .user_agent
        .as_deref()
        .is_some_and(|u| u.contains("hf-hub/0.4.3"))));
    assert!(
        log.iter().all(|r| r.authorization.is_none()),
        "no token was set"
    );

    // A second run finds everything in the cache and asks nothing.
    let before = server.requests().len();
    let again = case.run(REPO, "main", server.url(), false);
    assert_origin(&again.trained(), &case, "main", &s.main);
    assert_eq!(server.requests().len(), before, "{:#?}", server.requests());
}

#[test]
fn revisions_by_branch_and_commit_hash_get_their_own_bytes() {
    let s = served();
    let server = HubServer::start(s.hub.clone());
    let mut case = Case::new();
    let repo_dir = case.repo_dir(REPO_DIR);

    let by_hash = case.run(REPO, &s.v2, server.url(), false).trained();
    assert_origin(&by_hash, &case, &s.v2, &s.v2);
    assert_cached(&repo_dir, None, &s.v2, &s.v2_files);
    assert!(server
        .requests()
        .iter()
        .any(|r| r.path == format!("/{REPO}/resolve/{}/config.json", s.v2)));

    let by_branch = case.run(REPO, "v2", server.url(), false).trained();
    assert_origin(&by_branch, &case, "v2", &s.v2);
    assert_cached(&repo_dir, Some("v2"), &s.v2, &s.v2_files);

    let main = case.run(REPO, "main", server.url(), false).trained();
    assert_origin(&main, &case, "main", &s.main);
    assert_cached(&repo_dir, Some("main"), &s.main, &s.main_files);

    // The first loss is that of the weights as loaded: equal for the same bytes, apart for
    // the others.
    let first = |r: &Value| loss_curve(r)[0];
    let (a, b, m) = (first(&by_hash), first(&by_branch), first(&main));
    assert!(
        (a - b).abs() <= 1e-6 * a.abs(),
        "v2 by hash {a} vs by branch {b}"
    );
    assert!(
        (a - m).abs() > 1e-3,
        "v2 {a} vs main {m}: the weights should differ"
    );
}

#[test]
fn a_filled_cache_trains_with_the_server_gone() {
    let s = served();
    let server = HubServer::start(s.hub.clone());
    let endpoint = server.url().to_string();
    let mut case = Case::new();
    case.run(REPO, "main", &endpoint, false).trained();
    drop(server);
    assert!(
        std::net::TcpStream::connect(endpoint.trim_start_matches("http://")).is_err(),
        "the server has stopped"
    );

    // HF_HUB_OFFLINE=1, by branch and by commit hash.
    let offline = case.run(REPO, "main", &endpoint, true).trained();
    assert_origin(&offline, &case, "main", &s.main);
    let by_hash = case.run(REPO, &s.main, &endpoint, true).trained();
    assert_origin(&by_hash, &case, &s.main, &s.main);
    // Online, but with every file cached: the network is not needed.
    let online = case.run(REPO, "main", &endpoint, false).trained();
    assert_origin(&online, &case, "main", &s.main);
    assert_cached(
        &case.repo_dir(REPO_DIR),
        Some("main"),
        &s.main,
        &s.main_files,
    );

    // A revision never downloaded: offline, the error says so.
    let err = case.run(REPO, "v2", &endpoint, true).refused();
    assert!(err.contains(&format!("{REPO}@v2")), "{err}");
    assert!(err.contains("HF_HUB_OFFLINE"), "{err}");
}

#[test]
fn a_missing_repo_or_revision_is_refused_naming_it() {
    let s = served();
    let server = HubServer::start(s.hub.clone());
    let mut case = Case::new();

    let err = case
        .run("Qwen/Qwen3-Nope", "main", server.url(), false)
        .refused();
    assert_names(
        &err,
        &[
            "Qwen/Qwen3-Nope@main",
            server.url(),
            "has no model repo",
            "RepoNotFound",
            "check model.source",
        ],
    );
    assert!(!case
        .repo_dir("models--Qwen--Qwen3-Nope")
        .join("snapshots")
        .exists());

    let err = case.run(REPO, "nope", server.url(), false).refused();
    assert_names(
        &err,
        &[
            &format!("{REPO}@nope"),
            "has no revision \"nope\"",
            "RevisionNotFound",
            "set model.revision",
        ],
    );
    assert!(!case.repo_dir(REPO_DIR).join("snapshots").exists());
}

#[test]
fn an_unreachable_or_malformed_endpoint_is_refused_naming_it() {
    let mut case = Case::new();
    let dead = dead_endpoint();
    let err = case.run(REPO, "main", &dead, false).refused();
    assert_names(
        &err,
        &[
            &format!("{REPO}@main"),
            "cannot reach the hub",
            &dead,
            "HF_ENDPOINT",
            "HF_HUB_OFFLINE=1",
        ],
    );
    assert!(!case.repo_dir(REPO_DIR).join("snapshots").exists());

    let err = case.run(REPO, "main", "huggingface.co", false).refused();
    assert!(err.contains("HF_ENDPOINT = \"huggingface.co\""), "{err}");
    assert!(err.contains("https://huggingface.co"), "{err}");
}

#[test]
fn a_cut_download_is_not_cached_as_complete_and_a_rerun_resumes_it() {
    let s = served();
    let weights = &s.main_files["model.safetensors"];
    let sha = sha256_hex(weights);
    let server = HubServer::start(s.hub.clone());
    let keep = weights.len() / 3;
    server.set_fault(Some(Fault {
        sha256: sha.clone(),
        keep,
        content_length: true,
    }));
    let mut case = Case::new();
    let repo_dir = case.repo_dir(REPO_DIR);
    let err = case.run(REPO, "main", server.url(), false).refused();
    assert_names(
        &err,
        &[
            &format!("{REPO}@main"),
            "downloading model.safetensors",
            "broke off",
            "run again",
        ],
    );
    // Neither the blob nor the snapshot entry exists; the bytes received wait as a `.part`.
    assert!(!repo_dir.join("blobs").join(&sha).exists());
    assert!(!repo_dir
        .join("snapshots")
        .join(&s.main)
        .join("model.safetensors")
        .exists());
    let part = repo_dir.join("blobs").join(format!("{sha}.part"));
    let got = std::fs::metadata(&part)
        .map(|m| m.len() as usize)
        .unwrap_or(0);
    assert!(got > 0 && got <= keep, "{}: {got} bytes", part.display());
    // Offline, nothing passes for the file.
    let err = case.run(REPO, "main", server.url(), true).refused();
    assert!(err.contains("model.safetensors of"), "{err}");
    assert!(err.contains("HF_HUB_OFFLINE"), "{err}");

    server.set_fault(None);
    let before = server.requests().len();
    case.run(REPO, "main", server.url(), false).trained();
    assert_cached(&repo_dir, Some("main"), &s.main, &s.main_files);
    let resumed = format!("bytes={got}-");
    assert!(
        server.requests()[before..]
            .iter()
            .any(|r| r.path == format!("/cdn/{sha}") && r.range.as_deref() == Some(&resumed)),
        "the rerun resumes at byte {got}: {:#?}",
        &server.requests()[before..]
    );
}

#[test]
fn a_body_cut_without_a_length_fails_its_sha256_and_leaves_nothing() {
    let s = served();
    let weights = &s.main_files["model.safetensors"];
    let sha = sha256_hex(weights);
    let server = HubServer::start(s.hub.clone());
    server.set_fault(Some(Fault {
        sha256: sha.clone(),
        keep: weights.len() / 2,
        content_length: false,
    }));
    let mut case = Case::new();
    let repo_dir = case.repo_dir(REPO_DIR);
    let err = case.run(REPO, "main", server.url(), false).refused();
    assert_names(
        &err,
        &[
            &format!("{REPO}@main"),
            "downloading model.safetensors",
            &format!("not the {sha}"),
            "run again",
        ],
    );
    let blobs: Vec<String> = std::fs::read_dir(repo_dir.join("blobs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&sha) && !n.ends_with(".lock"))
        .collect();
    assert!(blobs.is_empty(), "{blobs:?}");
    let link = repo_dir
        .join("snapshots")
        .join(&s.main)
        .join("model.safetensors");
    assert!(
        std::fs::symlink_metadata(&link).is_err(),
        "{}",
        link.display()
    );

    server.set_fault(None);
    case.run(REPO, "main", server.url(), false).trained();
    assert_cached(&repo_dir, Some("main"), &s.main, &s.main_files);
}

#[test]
fn a_renamed_repo_is_followed_through_its_redirect_and_the_endpoint_slash_dropped() {
    let s = served();
    let mut hub = s.hub.clone();
    hub.rename("Qwen/Qwen3-0.6B-Old", REPO);
    let server = HubServer::start(hub);
    let mut case = Case::new();
    // A trailing slash on HF_ENDPOINT is dropped, as huggingface_hub does (the server answers
    // `//Qwen/...` with 404).
    let endpoint = format!("{}/", server.url());
    let report = case
        .run("Qwen/Qwen3-0.6B-Old", "main", &endpoint, false)
        .trained();
    let origin = report["model_origin"].as_str().unwrap();
    assert!(origin.contains("Qwen/Qwen3-0.6B-Old@main"), "{origin}");
    // Cached under the name asked for, as hf-hub does.
    assert_cached(
        &case.repo_dir("models--Qwen--Qwen3-0.6B-Old"),
        Some("main"),
        &s.main,
        &s.main_files,
    );
    assert!(server.requests().iter().any(|r| r.status == 307));
}

/// `err` names every one of `wants`.
fn assert_names(err: &str, wants: &[&str]) {
    for want in wants {
        assert!(err.contains(want), "missing {want:?}: {err}");
    }
}
