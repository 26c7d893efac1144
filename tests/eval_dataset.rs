//! `ternlab eval --dataset wikitext-2`: a benchmark's test split from a hub dataset repo,
//! through the standard hub cache, scored with GPTQ's protocol. A local server
//! (tests/common/hub_server.rs) stands in for the hub and serves, as `Salesforce/wikitext`'s
//! wikitext-2 test file, a small parquet file that this test writes from the bundled corpus;
//! nothing reaches the internet.

mod common;

use candle_core::{Device, Tensor};
use common::cli::{self, run_tiny, Ran};
use common::hub_server::{Hub, HubServer};
use parquet::basic::Compression;
use parquet::data_type::{ByteArray, ByteArrayType};
use parquet::file::properties::WriterProperties;
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use ternlab::device::DeviceChoice;

const REPO: &str = "Salesforce/wikitext";
const FILE: &str = "wikitext-2-raw-v1/test-00000-of-00001.parquet";
const SEQ_LEN: usize = 32;

/// The stand-in test split, shaped as wikitext's rows are (a title line, blank rows as empty
/// strings, paragraphs ending in a newline), plus one null: the first paragraphs of the
/// bundled corpus.
fn rows() -> Vec<Option<String>> {
    let corpus = std::fs::read_to_string(common::repo_root().join("data/train_data.txt")).unwrap();
    let paragraphs: Vec<&str> = corpus.lines().filter(|l| !l.is_empty()).take(3).collect();
    vec![
        Some(String::new()),
        Some(" = Open source software = \n".into()),
        Some(String::new()),
        Some(format!(" {}\n", paragraphs[0])),
        None,
        Some(format!(" {}\n", paragraphs[1])),
        Some(String::new()),
        Some(format!(" {}\n", paragraphs[2])),
    ]
}

/// The text GPTQ evaluates: `"\n\n".join(testdata['text'])`, a null as an empty row.
fn joined(rows: &[Option<String>]) -> String {
    rows.iter()
        .map(|r| r.as_deref().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n\n")
}

/// `rows` as a snappy-compressed parquet file with one optional UTF-8 column, as the
/// `datasets` library writes wikitext's.
fn parquet_bytes(column: &str, rows: &[Option<String>]) -> Vec<u8> {
    let schema = parse_message_type(&format!(
        "message schema {{ optional binary {column} (UTF8); }}"
    ))
    .unwrap();
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .build();
    let mut bytes = Vec::new();
    let mut writer =
        SerializedFileWriter::new(&mut bytes, Arc::new(schema), Arc::new(props)).unwrap();
    let mut group = writer.next_row_group().unwrap();
    let mut col = group.next_column().unwrap().unwrap();
    let values: Vec<ByteArray> = rows.iter().flatten().map(|s| s.as_str().into()).collect();
    let defined: Vec<i16> = rows.iter().map(|r| i16::from(r.is_some())).collect();
    col.typed::<ByteArrayType>()
        .write_batch(&values, Some(&defined), None)
        .unwrap();
    col.close().unwrap();
    group.close().unwrap();
    writer.close().unwrap();
    bytes
}

/// A hub with the stand-in wikitext-2 file at `main`; returns it, the file's bytes and the
/// commit.
fn wikitext_hub() -> (Hub, Vec<u8>, String) {
    let bytes = parquet_bytes("text", &rows());
    let mut hub = Hub::default();
    let commit = hub.commit_dataset(REPO, "main", &[(FILE, &bytes)]);
    (hub, bytes, commit)
}

/// `ternlab eval ARGS` in `dir` with HF_HOME = `home`, HF_ENDPOINT = `endpoint`, HF_HUB_OFFLINE=1
/// if `offline`, and no other HF_* or proxy variable.
fn eval(dir: &Path, args: &[&str], home: &Path, endpoint: &str, offline: bool) -> Ran {
    let mut all = vec!["eval"];
    all.extend_from_slice(args);
    let mut cmd = cli::command(dir, &all, &[]);
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
    cmd.env("HF_HOME", home).env("HF_ENDPOINT", endpoint);
    if offline {
        cmd.env("HF_HUB_OFFLINE", "1");
    }
    let out = cmd.output().expect("the ternlab binary starts");
    Ran {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The JSON of an eval that must have succeeded.
fn evaluated(ran: &Ran) -> Value {
    assert_eq!(ran.code, Some(0), "{}", ran.show());
    serde_json::from_str(&ran.stdout).unwrap_or_else(|e| panic!("{e}: {}", ran.show()))
}

/// A tiny trained run that saved its model.
fn saved_run(dir: &Path) -> PathBuf {
    run_tiny(dir, "tiny", &[("train.save", "\"ternary\"")]).0
}

#[test]
fn wikitext_2_comes_through_the_hub_cache_and_scores_as_its_joined_text() {
    let dir = tempfile::tempdir().unwrap();
    let run = saved_run(dir.path());
    let run = run.to_str().unwrap();
    let home = dir.path().join("hf-home");
    let (hub, bytes, commit) = wikitext_hub();
    let server = HubServer::start(hub);
    let endpoint = server.url().to_string();
    let seq_len = SEQ_LEN.to_string();

    let args = ["--dataset", "wikitext-2", "--seq-len", &seq_len];
    let online = evaluated(&eval(
        dir.path(),
        &[&[run][..], &args].concat(),
        &home,
        &endpoint,
        false,
    ));
    assert_eq!(online["protocol"], "gptq");
    assert_eq!(online["dataset"]["name"], "wikitext-2");
    assert_eq!(online["dataset"]["source"], format!("{REPO}@main {FILE}"));
    assert_eq!(online["dataset"]["rows"], rows().len());
    let nll = online["nll"].as_f64().unwrap();
    assert!(nll.is_finite() && nll > 0.0, "{online}");
    // It came from the dataset repo's URL on the server, the parquet through the CDN.
    let paths: Vec<String> = server.requests().into_iter().map(|r| r.path).collect();
    assert!(
        paths.contains(&format!("/datasets/{REPO}/resolve/main/{FILE}")),
        "{paths:?}"
    );
    assert!(paths.iter().any(|p| p.starts_with("/cdn/")), "{paths:?}");

    // In the standard cache, where huggingface_hub puts it; the JSON names that path.
    let repo_dir = home.join("hub/datasets--Salesforce--wikitext");
    let cached = repo_dir.join("snapshots").join(&commit).join(FILE);
    assert_eq!(std::fs::read(&cached).unwrap(), bytes);
    assert_eq!(
        std::fs::read_to_string(repo_dir.join("refs/main")).unwrap(),
        commit
    );
    assert_eq!(online["dataset"]["path"], cached.to_str().unwrap());

    // The same number, bit for bit, from the joined rows as a text file.
    let text = dir.path().join("joined.txt");
    std::fs::write(&text, joined(&rows())).unwrap();
    let from_text = evaluated(&eval(
        dir.path(),
        &[
            run,
            "--text",
            text.to_str().unwrap(),
            "--protocol",
            "gptq",
            "--seq-len",
            &seq_len,
        ],
        &home,
        &endpoint,
        false,
    ));
    assert_eq!(from_text["protocol"], "gptq");
    assert_eq!(from_text["dataset"], Value::Null);
    for key in ["tokens", "windows", "predictions"] {
        assert_eq!(from_text[key], online[key], "{key}");
    }
    assert_eq!(from_text["nll"].as_f64().unwrap().to_bits(), nll.to_bits());

    // A text file still scores with the seed's windows unless told otherwise, and that is
    // another number.
    let seed = evaluated(&eval(
        dir.path(),
        &[run, "--text", text.to_str().unwrap(), "--seq-len", &seq_len],
        &home,
        &endpoint,
        false,
    ));
    assert_eq!(seed["protocol"], "seed");
    assert_ne!(seed["nll"].as_f64().unwrap(), nll);

    // The server gone and HF_HUB_OFFLINE=1: the cached file gives the same number.
    drop(server);
    assert!(
        std::net::TcpStream::connect(endpoint.trim_start_matches("http://")).is_err(),
        "the server has stopped"
    );
    let offline = evaluated(&eval(
        dir.path(),
        &[&[run][..], &args].concat(),
        &home,
        &endpoint,
        true,
    ));
    assert_eq!(offline["nll"].as_f64().unwrap().to_bits(), nll.to_bits());
    assert_eq!(offline["dataset"]["path"], online["dataset"]["path"]);
}

#[test]
fn the_gptq_number_is_the_mean_over_windows_of_their_shifted_nll() {
    let dir = tempfile::tempdir().unwrap();
    let run = saved_run(dir.path());
    let text = joined(&rows());
    let file = dir.path().join("joined.txt");
    std::fs::write(&file, &text).unwrap();
    let seq_len = SEQ_LEN.to_string();
    let got = evaluated(&cli::ternlab(
        dir.path(),
        &[
            "eval",
            run.to_str().unwrap(),
            "--text",
            file.to_str().unwrap(),
            "--protocol",
            "gptq",
            "--seq-len",
            &seq_len,
            "--device",
            "cpu",
        ],
        &[],
    ));

    // The same model through the library, each window forwarded alone; the log-softmax and
    // the means written out in f64.
    let loaded = ternlab::eval::load(run.to_str().unwrap(), DeviceChoice::Cpu).unwrap();
    let ids = loaded
        .tokenizer
        .encode(text.as_str(), false)
        .unwrap()
        .get_ids()
        .to_vec();
    let windows = ids.len() / SEQ_LEN;
    assert!(
        windows >= 10 && !ids.len().is_multiple_of(SEQ_LEN),
        "{} tokens: some windows and a remainder to drop",
        ids.len()
    );
    assert_eq!(got["tokens"], ids.len());
    assert_eq!(got["windows"], windows);
    assert_eq!(got["predictions"], windows * (SEQ_LEN - 1));
    let mut window_means = Vec::new();
    for w in ids.chunks_exact(SEQ_LEN) {
        let x = Tensor::new(w, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let logits = loaded.model.forward(&x).unwrap().squeeze(0).unwrap();
        let logits: Vec<Vec<f32>> = logits
            .to_dtype(candle_core::DType::F32)
            .unwrap()
            .to_vec2()
            .unwrap();
        // Position t predicts token t + 1; the last position predicts nothing.
        let nll: f64 = (0..SEQ_LEN - 1)
            .map(|t| {
                let row: Vec<f64> = logits[t].iter().map(|&v| v as f64).collect();
                let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let log_z = max + row.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
                log_z - row[w[t + 1] as usize]
            })
            .sum();
        window_means.push(nll / (SEQ_LEN - 1) as f64);
    }
    let want = window_means.iter().sum::<f64>() / windows as f64;
    let nll = got["nll"].as_f64().unwrap();
    eprintln!(
        "gptq nll: ternlab {nll}, by hand {want}, difference {:e}",
        (nll - want).abs()
    );
    // Measured: 6.8e-7 apart (ternlab's f32 cross-entropy over two windows a batch, against
    // f64 over one); about seven times that is allowed. A wrong window cut or an unshifted
    // target moves the number by far more.
    assert!((nll - want).abs() < 5e-6, "ternlab {nll} vs by hand {want}");
    assert!((got["ppl"].as_f64().unwrap() - want.exp()).abs() < 5e-6 * want.exp());
}

#[test]
fn a_dataset_offline_and_not_cached_or_unknown_is_refused_saying_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    // A model directory that loads; the dataset is refused before it matters.
    let model = common::repo_root().join("tests/fixtures/seed/model");
    let model = model.to_str().unwrap();
    let home = dir.path().join("hf-home");
    let unused = "http://127.0.0.1:9";

    let offline = eval(
        dir.path(),
        &[model, "--dataset", "wikitext-2"],
        &home,
        unused,
        true,
    );
    assert_eq!(offline.code, Some(2), "{}", offline.show());
    for want in ["wikitext-2", REPO, "HF_HUB_OFFLINE", "not found"] {
        assert!(offline.stderr.contains(want), "{want}: {}", offline.show());
    }
    assert!(offline.stdout.is_empty(), "{}", offline.show());

    // A hub (or mirror) without the dataset repo: the endpoint is what to check.
    let empty = HubServer::start(Hub::default());
    let absent = eval(
        dir.path(),
        &[model, "--dataset", "wikitext-2"],
        &home,
        empty.url(),
        false,
    );
    assert_eq!(absent.code, Some(2), "{}", absent.show());
    for want in [
        "--dataset wikitext-2",
        "has no dataset repo \"Salesforce/wikitext\"",
        "HF_ENDPOINT",
    ] {
        assert!(absent.stderr.contains(want), "{want}: {}", absent.show());
    }

    let unknown = eval(
        dir.path(),
        &[model, "--dataset", "foo"],
        &home,
        unused,
        true,
    );
    assert_eq!(unknown.code, Some(2), "{}", unknown.show());
    assert!(unknown.stderr.contains("\"foo\""), "{}", unknown.show());
    assert!(unknown.stderr.contains("wikitext-2"), "{}", unknown.show());

    let both = eval(
        dir.path(),
        &[model, "--dataset", "wikitext-2", "--text", "x.txt"],
        &home,
        unused,
        true,
    );
    assert_eq!(both.code, Some(2), "{}", both.show());
    assert!(
        both.stderr.contains("cannot be used with"),
        "{}",
        both.show()
    );

    let protocol = eval(
        dir.path(),
        &[model, "--protocol", "hf"],
        &home,
        unused,
        true,
    );
    assert_eq!(protocol.code, Some(2), "{}", protocol.show());
    assert!(
        protocol.stderr.contains("\"gptq\" or \"seed\""),
        "{}",
        protocol.show()
    );
}

#[test]
fn the_text_column_is_read_with_nulls_as_empty_rows_and_its_absence_named() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("test.parquet");
    std::fs::write(&file, parquet_bytes("text", &rows())).unwrap();
    // What the hub's files are: snappy-compressed.
    let reader = SerializedFileReader::new(std::fs::File::open(&file).unwrap()).unwrap();
    assert_eq!(
        reader.metadata().row_group(0).column(0).compression(),
        Compression::SNAPPY
    );
    let read = ternlab::dataset::read_text_column(&file, "text").unwrap();
    let want: Vec<String> = rows().into_iter().map(Option::unwrap_or_default).collect();
    assert_eq!(read, want);

    let other = dir.path().join("other.parquet");
    std::fs::write(&other, parquet_bytes("sentence", &rows())).unwrap();
    let err = ternlab::dataset::read_text_column(&other, "text").unwrap_err();
    let err = format!("{err:#}");
    assert!(err.contains("no column \"text\""), "{err}");
    assert!(err.contains("sentence"), "{err}");
}
