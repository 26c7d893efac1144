//! Names the source this build was made from, for reports and `ternlab --version`: the git
//! commit (12 hex digits), with `+dirty` where the tracked files it is built from (`WATCHED`)
//! differ from it, or `unknown` where there is no git or no repository (a source archive).
//! Set as the `TERNLAB_SOURCE` environment variable of the crate's compilation.

use std::path::PathBuf;
use std::process::Command;

/// The files the build is made from.
const WATCHED: [&str; 5] = ["src", "tests", "Cargo.toml", "Cargo.lock", "build.rs"];

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn main() {
    // Built again when the sources change (the dirty mark) and when HEAD, the branch it names
    // or the index moves (a commit, a checkout); paths git does not have are left out, since
    // cargo would run this script on every build for them.
    for p in WATCHED {
        println!("cargo:rerun-if-changed={p}");
    }
    let mut watch = vec!["HEAD".to_string(), "index".into(), "packed-refs".into()];
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watch.push(branch);
    }
    for name in watch {
        if let Some(path) = git(&["rev-parse", "--git-path", &name]) {
            if PathBuf::from(&path).exists() {
                println!("cargo:rerun-if-changed={path}");
            }
        }
    }
    let source = match git(&["rev-parse", "--short=12", "HEAD"]) {
        Some(commit) => {
            // (the files watched above: a changed README makes no other binary)
            let mut status = vec!["status", "--porcelain", "--untracked-files=no", "--"];
            status.extend(WATCHED);
            let dirty = git(&status).is_some_and(|s| !s.is_empty());
            format!("{commit}{}", if dirty { "+dirty" } else { "" })
        }
        None => "unknown".to_string(),
    };
    println!("cargo:rustc-env=TERNLAB_SOURCE={source}");
}
