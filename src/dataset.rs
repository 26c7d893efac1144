//! Evaluation text from hub datasets, for `ternlab eval --dataset NAME`: a table of the
//! benchmarks ternlab knows (which file of which hub dataset repo, at which revision, and the
//! column that holds the text), the file fetched through the standard hub cache
//! (`model::hub::dataset_file`), and its rows read from parquet and joined as the benchmark's
//! reference code joins them. With that, and one tokenizer, the tokens are the ones that
//! published perplexities were computed on (wikitext-2 as GPTQ builds it:
//! `"\n\n".join(testdata['text'])`).

use crate::model::hub::dataset_file;
use crate::spec::BadInput;
use anyhow::{anyhow, bail, Context, Result};
use parquet::basic::{Repetition, Type as PhysicalType};
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;
use parquet::schema::types::Type;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One known evaluation dataset: a file of a hub dataset repo and how its rows become text.
#[derive(Debug, Clone, Copy)]
pub struct Dataset {
    /// What `--dataset` calls it.
    pub name: &'static str,
    /// The hub dataset repo (`datasets/<repo>` on the hub).
    pub repo: &'static str,
    pub revision: &'static str,
    /// The parquet file inside the repo.
    pub file: &'static str,
    /// The string column that holds the text, one row a line or paragraph.
    pub column: &'static str,
    /// What the rows are joined with.
    pub separator: &'static str,
}

/// The datasets `--dataset` takes. wikitext-2 is GPTQ's test split (`get_wikitext2` in its
/// datautils.py), from the repo the `datasets` library now loads "wikitext" from.
pub const DATASETS: &[Dataset] = &[Dataset {
    name: "wikitext-2",
    repo: "Salesforce/wikitext",
    revision: "main",
    file: "wikitext-2-raw-v1/test-00000-of-00001.parquet",
    column: "text",
    separator: "\n\n",
}];

/// The dataset called `name`; an unknown name is an error listing the known ones.
pub fn find(name: &str) -> Result<&'static Dataset> {
    DATASETS.iter().find(|d| d.name == name).ok_or_else(|| {
        let known: Vec<&str> = DATASETS.iter().map(|d| d.name).collect();
        BadInput(format!(
            "--dataset {name:?}: not a dataset ternlab knows; known: {}",
            known.join(", ")
        ))
        .into()
    })
}

/// A dataset's text as evaluated, and where it came from.
#[derive(Debug, Clone)]
pub struct DatasetText {
    pub text: String,
    /// The parquet file in the hub cache.
    pub path: PathBuf,
    pub rows: usize,
}

impl Dataset {
    /// `repo@revision file`.
    pub fn source(&self) -> String {
        format!("{}@{} {}", self.repo, self.revision, self.file)
    }

    /// The file from the hub cache (downloaded into it when missing, unless HF_HUB_OFFLINE),
    /// its rows joined with the separator. A file that cannot be had is bad input (exit 2),
    /// named with the dataset.
    pub fn load(&self) -> Result<DatasetText> {
        let path = dataset_file(self.repo, self.revision, self.file)
            .map_err(|e| BadInput(format!("--dataset {}: {e:#}", self.name)))?;
        let rows = read_text_column(&path, self.column)
            .with_context(|| format!("--dataset {} ({})", self.name, self.source()))?;
        Ok(DatasetText {
            text: rows.join(self.separator),
            path,
            rows: rows.len(),
        })
    }
}

/// Every value of the string column `column` of a parquet file, in order. A null reads as
/// the empty string: wikitext's blank lines are empty strings already, and GPTQ's join, which
/// would fail on a null, gives no other reading to follow.
pub fn read_text_column(path: &Path, column: &str) -> Result<Vec<String>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let reader = SerializedFileReader::new(file)
        .with_context(|| format!("{}: not a readable parquet file", path.display()))?;
    let schema = reader.metadata().file_metadata().schema();
    let fields = schema.get_fields();
    let field = fields.iter().find(|f| f.name() == column).ok_or_else(|| {
        let names: Vec<&str> = fields.iter().map(|f| f.name()).collect();
        anyhow!(
            "{}: no column {column:?} (its columns: {})",
            path.display(),
            names.join(", ")
        )
    })?;
    let repeated = field.get_basic_info().has_repetition()
        && field.get_basic_info().repetition() == Repetition::REPEATED;
    if !field.is_primitive() || field.get_physical_type() != PhysicalType::BYTE_ARRAY || repeated {
        bail!(
            "{}: column {column:?} is not a string column ({:?})",
            path.display(),
            field
        );
    }
    // Only the text column is decoded, whatever else the file holds.
    let projection = Type::group_type_builder(schema.name())
        .with_fields(vec![Arc::clone(field)])
        .build()?;
    let mut rows = Vec::with_capacity(reader.metadata().file_metadata().num_rows().max(0) as usize);
    for (i, row) in reader.get_row_iter(Some(projection))?.enumerate() {
        let row = row.with_context(|| format!("{}: reading row {i}", path.display()))?;
        let text = match row.get_column_iter().next().map(|(_, f)| f) {
            Some(Field::Str(s)) => s.clone(),
            Some(Field::Bytes(b)) => String::from_utf8(b.data().to_vec())
                .map_err(|_| anyhow!("{}: row {i} of {column:?} is not UTF-8", path.display()))?,
            Some(Field::Null) | None => String::new(),
            Some(other) => bail!(
                "{}: row {i} of {column:?} is not a string: {other}",
                path.display()
            ),
        };
        rows.push(text);
    }
    Ok(rows)
}
