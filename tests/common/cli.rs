//! The harness of the CLI tests (tests/faults.rs, tests/sweep_cli.rs): running the real
//! `ternlab` binary, writing tiny specs, and reading back what it printed and wrote.
#![allow(dead_code)]

use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

/// What one `ternlab` invocation did.
pub struct Ran {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Ran {
    pub fn show(&self) -> String {
        format!(
            "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// `ternlab ARGS` in `cwd`, without inherited `TERNLAB_*` variables, plus `env`.
pub fn command(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(super::ternlab_bin());
    cmd.args(args).current_dir(cwd);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("TERNLAB_") {
            cmd.env_remove(k);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// Runs `ternlab ARGS` in `cwd` (see [`command`]) and waits for it.
pub fn ternlab(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> Ran {
    let out = command(cwd, args, env)
        .output()
        .expect("the ternlab binary starts");
    Ran {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The arguments `<cmd> <spec> --results <results>`.
pub fn spec_args<'a>(cmd: &'a str, spec: &'a Path, results: &'a Path) -> Vec<&'a str> {
    vec![
        cmd,
        spec.to_str().unwrap(),
        "--results",
        results.to_str().unwrap(),
    ]
}

/// `ternlab <cmd> <spec> --results <results> [extra...]`, run in the spec's folder.
pub fn on_spec(
    cmd: &str,
    spec: &Path,
    results: &Path,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Ran {
    let mut args = spec_args(cmd, spec, results);
    args.extend_from_slice(extra);
    ternlab(spec.parent().unwrap(), &args, env)
}

/// `s` as a TOML string literal.
pub fn quote(s: &str) -> String {
    toml::Value::String(s.into()).to_string()
}

/// The bundled training corpus, data/train_data.txt.
pub fn corpus() -> String {
    super::repo_root()
        .join("data/train_data.txt")
        .to_str()
        .unwrap()
        .to_string()
}

/// A tiny spec: the `tiny` preset on the bundled corpus, 3 steps of 2 x 32 tokens on the CPU.
/// `set` replaces or adds `section.key` lines (an empty value removes the key); `tail` is
/// appended as written (a `[sweep]` table).
pub fn spec_text(name: &str, set: &[(&str, &str)], tail: &str) -> String {
    let mut sections: Vec<(String, Vec<(String, String)>)> = [
        ("model", vec![("preset", quote("tiny"))]),
        (
            "data",
            vec![
                ("path", quote(&corpus())),
                ("seq_len", "32".into()),
                ("batch_size", "2".into()),
            ],
        ),
        (
            "train",
            vec![("steps", "3".into()), ("warmup_steps", "1".into())],
        ),
        (
            "eval",
            vec![
                ("max_new_tokens", "2".into()),
                ("prompts", "[\"The\"]".into()),
            ],
        ),
        ("run", vec![("device", quote("cpu"))]),
    ]
    .into_iter()
    .map(|(s, kv)| {
        (
            s.to_string(),
            kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
        )
    })
    .collect();
    for (path, value) in set {
        let (section, key) = path.split_once('.').expect("section.key");
        let idx = match sections.iter().position(|(s, _)| s == section) {
            Some(i) => i,
            None => {
                sections.push((section.to_string(), Vec::new()));
                sections.len() - 1
            }
        };
        let lines = &mut sections[idx].1;
        lines.retain(|(k, _)| k != key);
        if !value.is_empty() {
            lines.push((key.to_string(), value.to_string()));
        }
    }
    let mut text = format!("name = {}\n", quote(name));
    for (section, lines) in &sections {
        text.push_str(&format!("\n[{section}]\n"));
        for (k, v) in lines {
            text.push_str(&format!("{k} = {v}\n"));
        }
    }
    text.push('\n');
    text.push_str(tail);
    text
}

/// Writes `text` to `dir/file` and returns that path.
pub fn write_spec(dir: &Path, file: &str, text: &str) -> PathBuf {
    let path = dir.join(file);
    std::fs::write(&path, text).unwrap();
    path
}

/// The (run id, state) rows of `ternlab plan`'s output.
pub fn plan_rows(stdout: &str) -> Vec<(String, String)> {
    stdout
        .lines()
        .skip_while(|l| !l.starts_with("run "))
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let mut w = l.split_whitespace();
            (w.next().unwrap().to_string(), w.next().unwrap().to_string())
        })
        .collect()
}

/// `ternlab plan` with a `--set` for each of `set`; panics unless it succeeds.
fn plan(spec: &Path, results: &Path, set: &[&str]) -> Vec<(String, String)> {
    let mut extra = Vec::new();
    for s in set {
        extra.extend(["--set", s]);
    }
    let out = on_spec("plan", spec, results, &extra, &[]);
    assert_eq!(out.code, Some(0), "plan failed: {}", out.show());
    plan_rows(&out.stdout)
}

/// The run ids of a spec (with a `--set` for each of `set`), in plan order.
pub fn plan_ids(spec: &Path, results: &Path, set: &[&str]) -> Vec<String> {
    plan(spec, results, set)
        .into_iter()
        .map(|(id, _)| id)
        .collect()
}

/// The state of each run of a spec, by run id.
pub fn plan_states(spec: &Path, results: &Path) -> BTreeMap<String, String> {
    plan(spec, results, &[]).into_iter().collect()
}

/// Run ids that a sweep trained, from its `<id>: building the model on ...` lines.
pub fn trained_ids(stderr: &str) -> Vec<String> {
    stderr
        .lines()
        .filter_map(|l| {
            l.split_once(": building the model on ")
                .map(|(id, _)| id.to_string())
        })
        .collect()
}

pub fn read_json(path: &Path) -> Value {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

/// The text and modification time of a file, to prove it was not rewritten.
pub fn snapshot(path: &Path) -> (String, SystemTime) {
    (
        std::fs::read_to_string(path).unwrap(),
        std::fs::metadata(path).unwrap().modified().unwrap(),
    )
}

/// Trains the tiny spec `name` with `set` (see [`spec_text`]) through `ternlab run` in `dir`;
/// returns the run's folder and its report.json.
pub fn run_tiny(dir: &Path, name: &str, set: &[(&str, &str)]) -> (PathBuf, serde_json::Value) {
    let results = dir.join("results");
    let spec = write_spec(dir, &format!("{name}.toml"), &spec_text(name, set, ""));
    let out = on_spec("run", &spec, &results, &[], &[]);
    assert_eq!(out.code, Some(0), "{}", out.show());
    let run = std::fs::read_dir(results.join(name))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.join("report.json").is_file())
        .expect("a run folder with a report");
    let report = std::fs::read_to_string(run.join("report.json")).unwrap();
    (run, serde_json::from_str(&report).unwrap())
}
