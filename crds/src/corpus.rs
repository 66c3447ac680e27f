//! The manifest corpora, shared by the schema unit tests and the end-to-end replay against a real
//! apiserver: `crds/tests/invalid/*.yaml` must be rejected naming a field, `crds/tests/valid/*.yaml`
//! (edge cases) must be accepted.
//!
//! Each file is one ConsumerPipeline manifest with a header:
//! ```yaml
//! # Invalid: <what is wrong>.
//! # field: spec.scaling            (the path the rejection must name)
//! # message: scaling.minReplicas must not exceed scaling.maxReplicas   (optional: kpipe's own CEL message)
//! ```

use std::path::{Path, PathBuf};

/// One invalid manifest and what its rejection must say.
#[derive(Debug, Clone)]
pub struct InvalidCase {
    pub file: PathBuf,
    /// The field path the error must name, e.g. `spec.scaling.pollInterval`.
    pub field: String,
    /// kpipe's own rule message the error must contain, where one applies.
    pub message: Option<String>,
    /// The manifest text (including the header comments).
    pub manifest: String,
}

#[derive(Debug, thiserror::Error)]
pub enum CorpusError {
    #[error("cannot read corpus {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: missing '# field:' header")]
    MissingField { path: PathBuf },
}

/// One manifest the apiserver must accept (header `# Valid: <what it exercises>.`).
#[derive(Debug, Clone)]
pub struct ValidCase {
    pub file: PathBuf,
    /// The manifest text (including the header comment).
    pub manifest: String,
}

/// The directory of the invalid corpus in this source tree.
pub fn invalid_corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("invalid")
}

/// The directory of the valid corpus in this source tree.
pub fn valid_corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("valid")
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CorpusError + '_ {
    move |source| CorpusError::Io { path: path.to_path_buf(), source }
}

/// The `*.yaml` files of `dir` with their text, sorted by file name.
fn yaml_files(dir: &Path) -> Result<Vec<(PathBuf, String)>, CorpusError> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|file| {
            let text = std::fs::read_to_string(&file).map_err(io(&file))?;
            Ok((file, text))
        })
        .collect()
}

/// Loads every `*.yaml` case of `dir` (the valid corpus), sorted by file name.
pub fn load_valid_corpus(dir: &Path) -> Result<Vec<ValidCase>, CorpusError> {
    Ok(yaml_files(dir)?.into_iter().map(|(file, manifest)| ValidCase { file, manifest }).collect())
}

/// Loads every `*.yaml` case of `dir`, sorted by file name.
pub fn load_invalid_corpus(dir: &Path) -> Result<Vec<InvalidCase>, CorpusError> {
    yaml_files(dir)?
        .into_iter()
        .map(|(file, manifest)| {
            let header = |key: &str| {
                manifest
                    .lines()
                    .take_while(|l| l.starts_with('#'))
                    .find_map(|l| l.strip_prefix(&format!("# {key}:")).map(|v| v.trim().to_string()))
            };
            let field = header("field").ok_or_else(|| CorpusError::MissingField { path: file.clone() })?;
            let message = header("message");
            Ok(InvalidCase { file, field, message, manifest })
        })
        .collect()
}
