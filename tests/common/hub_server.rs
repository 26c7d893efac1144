//! A local stand-in for the Hugging Face hub, for the download tests (tests/hub.rs,
//! tests/eval_dataset.rs): an HTTP/1.1 server on 127.0.0.1 (one thread, one request per
//! connection) that answers `/{repo_id}/resolve/{revision}/{filename}` (model repos) and
//! `/datasets/{repo_id}/resolve/{revision}/{filename}` (dataset repos) as huggingface.co does,
//! as far as hf-hub's sync client reads it:
//!
//! - a revision is a branch (`main`, ...) or a 40-hex commit hash; every answer about a file
//!   carries `X-Repo-Commit` (the commit the revision resolved to) and honours `Range`
//!   (`206` with `Content-Range: bytes a-b/size`, as the client's `bytes=0-0` probe needs);
//! - a small (git) file answers directly, with `ETag: "<blob id>"` (git's blob id is a SHA-1;
//!   a 40-hex stand-in here, which the client only uses as a file name);
//! - a large (LFS) file, here every `*.safetensors` and `*.parquet`, answers `302 Found` with
//!   an absolute `Location` on the "CDN" (`/cdn/<sha256>` on this server),
//!   `X-Linked-Etag: "<sha256>"`, `X-Linked-Size` and the pointer file's own `ETag`; the CDN
//!   serves the bytes with ranges;
//! - a renamed repo answers `307` with a relative `Location` to its new name;
//! - unknown repos, revisions and files answer `404` with `X-Error-Code` `RepoNotFound`,
//!   `RevisionNotFound` or `EntryNotFound`.
//!
//! A [`Fault`] cuts one file's body short. Every request is logged. The server thread stops
//! when the [`HubServer`] is dropped (or after [`MAX_REQUESTS`] requests or [`MAX_LIFETIME`]).
#![allow(dead_code)]

use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub const MAX_REQUESTS: usize = 10_000;
pub const MAX_LIFETIME: Duration = Duration::from_secs(600);

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The stand-in for a git blob id: 40 hex digits that change with the bytes.
pub fn blob_id(bytes: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(format!("blob {}\0", bytes.len()).as_bytes());
    h.update(bytes);
    h.finalize()
        .iter()
        .take(20)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Whether the hub keeps a file in LFS (and answers it with a redirect to the CDN).
pub fn is_lfs(file: &str) -> bool {
    file.ends_with(".safetensors") || file.ends_with(".parquet")
}

#[derive(Default, Clone)]
struct RepoData {
    /// commit -> file -> bytes.
    commits: BTreeMap<String, BTreeMap<String, Arc<Vec<u8>>>>,
    /// branch -> commit.
    branches: BTreeMap<String, String>,
}

/// The repos a [`HubServer`] serves.
#[derive(Default, Clone)]
pub struct Hub {
    /// By the repo's part of a URL: `owner/name` for a model, `datasets/owner/name` for a
    /// dataset.
    repos: BTreeMap<String, RepoData>,
    /// old repo id -> new repo id.
    renamed: BTreeMap<String, String>,
}

impl Hub {
    /// Adds a commit holding `files` to the model repo `repo_id` and points `branch` at it;
    /// returns the commit hash.
    pub fn commit(&mut self, repo_id: &str, branch: &str, files: &[(&str, &[u8])]) -> String {
        self.commit_at(repo_id, branch, files)
    }

    /// [`Hub::commit`] for the dataset repo `repo_id`.
    pub fn commit_dataset(
        &mut self,
        repo_id: &str,
        branch: &str,
        files: &[(&str, &[u8])],
    ) -> String {
        self.commit_at(&format!("datasets/{repo_id}"), branch, files)
    }

    /// Adds a commit to the repo at `url_part` (its commit hashes then differ from those of a
    /// model and a dataset of the same name).
    fn commit_at(&mut self, url_part: &str, branch: &str, files: &[(&str, &[u8])]) -> String {
        let mut h = Sha256::new();
        h.update(format!("{url_part}\0{branch}\0").as_bytes());
        for (name, bytes) in files {
            h.update(format!("{name}\0{}\0", sha256_hex(bytes)).as_bytes());
        }
        let commit: String = h
            .finalize()
            .iter()
            .take(20)
            .map(|b| format!("{b:02x}"))
            .collect();
        let repo = self.repos.entry(url_part.to_string()).or_default();
        repo.commits.insert(
            commit.clone(),
            files
                .iter()
                .map(|(n, b)| (n.to_string(), Arc::new(b.to_vec())))
                .collect(),
        );
        repo.branches.insert(branch.to_string(), commit.clone());
        commit
    }

    /// `old` answers with a redirect to `new`, as the hub does for a renamed repo.
    pub fn rename(&mut self, old: &str, new: &str) {
        self.renamed.insert(old.to_string(), new.to_string());
    }

    fn blob_by_sha256(&self, sha: &str) -> Option<Arc<Vec<u8>>> {
        self.repos
            .values()
            .flat_map(|r| r.commits.values())
            .flat_map(|files| files.values())
            .find(|b| sha256_hex(b) == sha)
            .cloned()
    }
}

/// Cuts the body of every full download of the file with this sha256 after `keep` bytes and
/// closes the connection; the `bytes=0-0` probe is answered whole.
#[derive(Clone, Debug)]
pub struct Fault {
    pub sha256: String,
    pub keep: usize,
    /// Whether the cut answer still announces the whole length in `Content-Length` (else it
    /// has none, and only the closed connection ends the body).
    pub content_length: bool,
}

/// One request as the server saw it.
#[derive(Clone, Debug)]
pub struct Logged {
    pub method: String,
    pub path: String,
    pub range: Option<String>,
    pub user_agent: Option<String>,
    pub authorization: Option<String>,
    pub status: u16,
}

struct State {
    hub: Hub,
    fault: Option<Fault>,
    log: Vec<Logged>,
}

pub struct HubServer {
    url: String,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl HubServer {
    pub fn start(hub: Hub) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0");
        listener.set_nonblocking(true).unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State {
            hub,
            fault: None,
            log: Vec::new(),
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (state, stop, url) = (state.clone(), stop.clone(), url.clone());
            std::thread::spawn(move || serve(listener, &url, &state, &stop))
        };
        Self {
            url,
            state,
            stop,
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:<port>`, for HF_ENDPOINT.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The requests so far, in order.
    pub fn requests(&self) -> Vec<Logged> {
        self.state.lock().unwrap().log.clone()
    }

    pub fn set_fault(&self, fault: Option<Fault>) {
        self.state.lock().unwrap().fault = fault;
    }
}

impl Drop for HubServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(listener: TcpListener, url: &str, state: &Mutex<State>, stop: &AtomicBool) {
    let started = Instant::now();
    let mut served = 0;
    while !stop.load(Ordering::SeqCst) && served < MAX_REQUESTS && started.elapsed() < MAX_LIFETIME
    {
        match listener.accept() {
            Ok((stream, _)) => {
                served += 1;
                let _ = handle(stream, url, state);
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

struct Request {
    method: String,
    path: String,
    headers: BTreeMap<String, String>,
}

fn read_request(stream: &mut TcpStream) -> std::io::Result<Option<Request>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        if buf.len() > 64 * 1024 {
            return Ok(None);
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&buf);
    let mut lines = text.split("\r\n");
    let mut first = lines.next().unwrap_or("").split(' ');
    let (method, path) = (first.next().unwrap_or(""), first.next().unwrap_or(""));
    let headers = lines
        .take_while(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok(Some(Request {
        method: method.to_string(),
        path: path.to_string(),
        headers,
    }))
}

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Arc<Vec<u8>>,
    /// The body's bytes to send: all of `body`, or a range of it.
    span: std::ops::Range<usize>,
    /// Send only this many bytes of the span, then close.
    cut: Option<(usize, bool)>,
}

impl Response {
    fn new(status: u16) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: Arc::new(Vec::new()),
            span: 0..0,
            cut: None,
        }
    }

    fn header(mut self, k: &str, v: impl Into<String>) -> Self {
        self.headers.push((k.to_string(), v.into()));
        self
    }

    fn text(mut self, text: &str) -> Self {
        self.body = Arc::new(text.as_bytes().to_vec());
        self.span = 0..text.len();
        self.header("Content-Type", "text/plain; charset=utf-8")
    }

    fn error(status: u16, code: &str, message: &str) -> Self {
        Self::new(status)
            .header("X-Error-Code", code)
            .header("X-Error-Message", message)
            .text(message)
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        206 => "Partial Content",
        302 => "Found",
        307 => "Temporary Redirect",
        404 => "Not Found",
        405 => "Method Not Allowed",
        416 => "Range Not Satisfiable",
        _ => "Other",
    }
}

fn handle(mut stream: TcpStream, url: &str, state: &Mutex<State>) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    let Some(req) = read_request(&mut stream)? else {
        return Ok(());
    };
    let resp = {
        let mut state = state.lock().unwrap();
        let resp = answer(&req, url, &state.hub, state.fault.as_ref());
        state.log.push(Logged {
            method: req.method.clone(),
            path: req.path.clone(),
            range: req.headers.get("range").cloned(),
            user_agent: req.headers.get("user-agent").cloned(),
            authorization: req.headers.get("authorization").cloned(),
            status: resp.status,
        });
        resp
    };
    let mut head = format!("HTTP/1.1 {} {}\r\n", resp.status, reason(resp.status));
    for (k, v) in &resp.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    let with_length = resp.cut.is_none_or(|(_, with)| with);
    if with_length {
        head.push_str(&format!("Content-Length: {}\r\n", resp.span.len()));
    }
    head.push_str("Connection: close\r\n\r\n");
    stream.write_all(head.as_bytes())?;
    if req.method != "HEAD" {
        let body = &resp.body[resp.span.clone()];
        let send = match resp.cut {
            Some((keep, _)) => &body[..keep.min(body.len())],
            None => body,
        };
        stream.write_all(send)?;
    }
    stream.flush()?;
    stream.shutdown(std::net::Shutdown::Both)
}

/// `bytes=a-b` / `bytes=a-` against a body of `len` bytes: the span, or `Err` when it
/// starts past the end; `None` without (or with an unreadable) Range header.
fn parse_range(range: Option<&String>, len: usize) -> Option<Result<std::ops::Range<usize>, ()>> {
    let spec = range?.strip_prefix("bytes=")?;
    let (a, b) = spec.split_once('-')?;
    let start: usize = a.trim().parse().ok()?;
    let end = match b.trim() {
        "" => len.saturating_sub(1),
        b => b.parse::<usize>().ok()?.min(len.saturating_sub(1)),
    };
    if start >= len || end < start {
        return Some(Err(()));
    }
    Some(Ok(start..end + 1))
}

/// The bytes of a file, whole or the requested range, with the fault applied.
fn serve_bytes(
    req: &Request,
    bytes: &Arc<Vec<u8>>,
    resp: Response,
    fault: Option<&Fault>,
) -> Response {
    let len = bytes.len();
    let mut resp = resp
        .header("Accept-Ranges", "bytes")
        .header("Content-Type", "application/octet-stream");
    resp.body = bytes.clone();
    match parse_range(req.headers.get("range"), len) {
        None => {
            resp.status = 200;
            resp.span = 0..len;
        }
        Some(Ok(span)) => {
            resp.status = 206;
            resp = resp.header(
                "Content-Range",
                format!("bytes {}-{}/{len}", span.start, span.end - 1),
            );
            resp.span = span;
        }
        Some(Err(())) => {
            let mut r = Response::new(416).header("Content-Range", format!("bytes */{len}"));
            r.headers.extend(resp.headers);
            return r;
        }
    }
    if let Some(f) = fault {
        if resp.span.len() > 1 && sha256_hex(bytes) == f.sha256 {
            resp.cut = Some((f.keep, f.content_length));
        }
    }
    resp
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = s.get(i + 1..i + 3).filter(|_| b[i] == b'%');
        if let Some(v) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn answer(req: &Request, url: &str, hub: &Hub, fault: Option<&Fault>) -> Response {
    if req.method != "GET" && req.method != "HEAD" {
        return Response::new(405).text("only GET and HEAD");
    }
    let path = req.path.split('?').next().unwrap_or("");
    let segments: Vec<&str> = path.strip_prefix('/').unwrap_or(path).split('/').collect();
    // The CDN: LFS blobs by sha256.
    if let ["cdn", sha] = segments.as_slice() {
        return match hub.blob_by_sha256(sha) {
            Some(bytes) => serve_bytes(
                req,
                &bytes,
                Response::new(200).header("ETag", format!("\"{sha}\"")),
                fault,
            ),
            None => Response::new(404).text("NoSuchKey"),
        };
    }
    // /{repo_id}/resolve/{revision}/{file...}, with `datasets/` before a dataset's repo id; a
    // repo id has one or two parts.
    let first = usize::from(segments.first() == Some(&"datasets"));
    let Some(at) = segments
        .iter()
        .skip(first)
        .take(3)
        .position(|s| *s == "resolve")
        .map(|i| i + first)
    else {
        return Response::new(404).text("Not Found");
    };
    if at == first || segments.len() < at + 3 {
        return Response::new(404).text("Not Found");
    }
    let repo_id = segments[..at].join("/");
    let raw_revision = segments[at + 1];
    let revision = percent_decode(raw_revision);
    let file = segments[at + 2..].join("/");
    if let Some(new) = hub.renamed.get(&repo_id) {
        return Response::new(307)
            .header("Location", format!("/{new}/resolve/{raw_revision}/{file}"))
            .text("Temporary Redirect");
    }
    let Some(repo) = hub.repos.get(&repo_id) else {
        return Response::error(404, "RepoNotFound", "Repository not found");
    };
    let commit = match repo.branches.get(&revision) {
        Some(c) => c.clone(),
        None if repo.commits.contains_key(&revision) => revision.clone(),
        None => {
            return Response::error(
                404,
                "RevisionNotFound",
                &format!("Invalid rev id: {revision}"),
            )
        }
    };
    let Some(bytes) = repo.commits[&commit].get(&file) else {
        return Response::error(404, "EntryNotFound", "Entry not found")
            .header("X-Repo-Commit", commit.clone());
    };
    if is_lfs(&file) {
        let sha = sha256_hex(bytes);
        let location = format!("{url}/cdn/{sha}");
        // The pointer file git stores instead of the bytes; its blob id is the ETag.
        let pointer = format!(
            "version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {}\n",
            bytes.len()
        );
        return Response::new(302)
            .header("Location", location.clone())
            .header("X-Repo-Commit", commit)
            .header("X-Linked-Etag", format!("\"{sha}\""))
            .header("X-Linked-Size", bytes.len().to_string())
            .header("ETag", format!("\"{}\"", blob_id(pointer.as_bytes())))
            .text(&format!("Found. Redirecting to {location}"));
    }
    let resp = Response::new(200)
        .header("X-Repo-Commit", commit)
        .header("ETag", format!("\"{}\"", blob_id(bytes)));
    serve_bytes(req, bytes, resp, fault)
}
