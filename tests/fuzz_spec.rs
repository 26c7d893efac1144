//! The spec parser never panics: thousands of inputs, from random bytes to near-valid specs
//! (the committed experiments mutated byte by byte and token by token), go through parsing,
//! layering, sweep expansion and checks. Each must give a plan or a `BadInput` error that
//! names the file. Seeded, so a failure reproduces.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use ternlab::plan::plan_table;
use ternlab::spec::{parse_table, BadInput};

const TOKENS: &[&str] = &[
    "=",
    "[",
    "]",
    "[[",
    "]]",
    "\"",
    "'",
    ",",
    ".",
    "\n",
    " ",
    "#",
    "{",
    "}",
    "-",
    "+",
    "e",
    "0",
    "1",
    "-1",
    "1e400",
    "nan",
    "inf",
    "0.5",
    "\"row\"",
    "true",
    "[]",
    "[[]]",
    "{}",
    "sweep",
    "zip",
    "sweep.zip",
    "\"train.lr\"",
    "\"train.seed\"",
    "\"quant.group_size\"",
    "train",
    "lr",
    "steps",
    "group_size",
    "projections",
    "model",
    "preset",
    "\"tiny\"",
    "data",
    "seq_len",
    "\"\u{feff}\"",
    "\u{0}",
    "\u{1F600}",
    "name",
    "\"../x\"",
];

fn check(text: &str) {
    let file = Path::new("fuzz.toml");
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        parse_table(text, file).and_then(|t| plan_table(file, t, &[]))
    }));
    match outcome {
        Err(_) => panic!("the spec parser panicked on {text:?}"),
        Ok(Ok(_)) => eprintln!("OKPLAN"),
        Ok(Err(e)) => {
            assert!(
                e.downcast_ref::<BadInput>().is_some(),
                "not a BadInput for {text:?}: {e:#}"
            );
            eprintln!(
                "ERR {}",
                format!("{e:#}").chars().take(60).collect::<String>()
            );
            assert!(
                format!("{e:#}").contains("fuzz.toml"),
                "no file name for {text:?}: {e:#}"
            );
        }
    }
}

fn mutate(rng: &mut ChaCha8Rng, base: &str) -> String {
    let mut s: Vec<char> = base.chars().collect();
    for _ in 0..rng.random_range(1..6) {
        let at = rng.random_range(0..=s.len());
        match rng.random_range(0..4) {
            0 if at < s.len() => {
                s.remove(at);
            }
            1 => {
                let t = TOKENS[rng.random_range(0..TOKENS.len())];
                for (i, c) in t.chars().enumerate() {
                    s.insert(at + i, c);
                }
            }
            2 if at < s.len() => s[at] = char::from(rng.random_range(0x20u8..0x7f)),
            _ => {
                let len = rng.random_range(0..20.min(s.len() - at.min(s.len()) + 1));
                s.drain(at.min(s.len())..(at + len).min(s.len()));
            }
        }
    }
    s.into_iter().collect()
}

#[test]
fn the_spec_parser_never_panics() {
    // The environment layers into every spec; keep it out.
    let mut rng = ChaCha8Rng::seed_from_u64(20261126);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut bases = vec![String::new()];
    // Every spec under experiments/, sub-folders (experiments/study/) included.
    let mut dirs = vec![root.join("experiments")];
    while let Some(dir) = dirs.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for path in entries {
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|x| x == "toml") {
                bases.push(std::fs::read_to_string(path).unwrap());
            }
        }
    }
    let mut n = 0;
    for _ in 0..300 {
        let len = rng.random_range(0..200);
        let bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        check(&String::from_utf8_lossy(&bytes));
        let soup: String = (0..rng.random_range(0..40))
            .map(|_| TOKENS[rng.random_range(0..TOKENS.len())])
            .collect();
        check(&soup);
        n += 2;
    }
    for base in &bases {
        for _ in 0..400 {
            check(&mutate(&mut rng, base));
            n += 1;
        }
    }
    assert!(n > 3000);
}
