use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::merge::merge;
use crate::validate::validate;
use crate::{
    AGENT_API_VERSION, AGENT_KIND, AgentConfig, Config, ConfigError, FieldError, NODE_API_VERSION,
    NODE_KIND, NodeConfig,
};

/// The main configuration file on a host.
pub const DEFAULT_CONFIG_FILE: &str = "/etc/hybridlet/config.yaml";
/// The drop-in directory on a host; `*.yaml` files in it are merged in lexical order over
/// the main file.
pub const DEFAULT_CONFIG_DIR: &str = "/etc/hybridlet/config.d";

/// Where configuration comes from.
#[derive(Debug, Clone)]
pub struct ConfigSources {
    /// The main file.
    pub file: PathBuf,
    /// Whether a missing main file is an error (it was named explicitly) or means
    /// "defaults" (standalone).
    pub file_required: bool,
    /// The drop-in directory, if any; a missing directory is fine.
    pub drop_in_dir: Option<PathBuf>,
}

/// The result of loading: the configuration and what it was built from.
#[derive(Debug, Clone)]
pub struct LoadedConfig {
    /// The validated configuration.
    pub config: Config,
    /// The files that were read, in merge order (empty: embedded defaults).
    pub files: Vec<PathBuf>,
    /// Things worth telling the operator that are not errors.
    pub warnings: Vec<String>,
}

/// Load, merge, decode and validate configuration from the given sources.
pub fn load(sources: &ConfigSources) -> Result<LoadedConfig, ConfigError> {
    let mut inputs: Vec<(PathBuf, String)> = Vec::new();
    match read_file(&sources.file)? {
        Some(text) => inputs.push((sources.file.clone(), text)),
        None if sources.file_required => {
            return Err(ConfigError::Read {
                path: sources.file.clone(),
                source: io::Error::new(io::ErrorKind::NotFound, "no such file"),
            });
        }
        None => {}
    }
    if let Some(dir) = &sources.drop_in_dir {
        for path in drop_in_files(dir)? {
            if let Some(text) = read_file(&path)? {
                inputs.push((path, text));
            }
        }
    }
    let refs: Vec<(&Path, &str)> = inputs
        .iter()
        .map(|(p, t)| (p.as_path(), t.as_str()))
        .collect();
    build(&refs)
}

/// Load configuration from YAML text (one or more documents). `name` is used in messages.
pub fn parse_str(text: &str, name: &Path) -> Result<LoadedConfig, ConfigError> {
    build(&[(name, text)])
}

fn read_file(path: &Path) -> Result<Option<String>, ConfigError> {
    match fs::read(path) {
        Ok(bytes) => String::from_utf8(bytes)
            .map(Some)
            .map_err(|_| ConfigError::Syntax {
                path: path.to_path_buf(),
                message: "file is not UTF-8".to_string(),
            }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ConfigError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn drop_in_files(dir: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(ConfigError::Read {
                path: dir.to_path_buf(),
                source,
            });
        }
    };
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| ConfigError::Read {
            path: dir.to_path_buf(),
            source,
        })?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        // Hidden files are editor swap files and package-manager leftovers, not config.
        if name.starts_with('.') || !name.ends_with(".yaml") {
            continue;
        }
        files.push(entry.path());
    }
    // Lexical order of the byte strings, so 10-a.yaml comes before 20-b.yaml.
    files.sort_by(|a, b| a.as_os_str().cmp(b.as_os_str()));
    Ok(files)
}

enum DocKind {
    Node,
    Agent,
}

fn build(inputs: &[(&Path, &str)]) -> Result<LoadedConfig, ConfigError> {
    let mut errors = Vec::new();
    let mut node: Option<Value> = None;
    let mut agent: Option<Value> = None;
    let mut files = Vec::new();

    for (path, text) in inputs {
        files.push(path.to_path_buf());
        let docs: Vec<Value> =
            serde_saphyr::from_multiple(text).map_err(|e| ConfigError::Syntax {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        for doc in docs {
            let kind = match classify(&doc) {
                Ok(Some(kind)) => kind,
                Ok(None) => continue,
                Err((field, message)) => {
                    errors.push(FieldError {
                        file: Some(path.to_path_buf()),
                        path: field.to_string(),
                        message,
                    });
                    continue;
                }
            };
            // Decode each document on its own first so that unknown fields and wrong types
            // are reported against the file they are in.
            let slot = match kind {
                DocKind::Node => decode::<NodeConfig>(doc.clone(), Some(path)).map(|_| &mut node),
                DocKind::Agent => {
                    decode::<AgentConfig>(doc.clone(), Some(path)).map(|_| &mut agent)
                }
            };
            match slot {
                Ok(slot) => match slot {
                    Some(base) => merge(base, doc),
                    None => *slot = Some(doc),
                },
                Err(e) => errors.push(e),
            }
        }
    }
    if !errors.is_empty() {
        return Err(ConfigError::Invalid { errors });
    }

    let node = node
        .map(|v| decode::<NodeConfig>(v, None))
        .transpose()
        .map_err(|e| ConfigError::Invalid { errors: vec![e] })?;
    let agent = agent
        .map(|v| decode::<AgentConfig>(v, None))
        .transpose()
        .map_err(|e| ConfigError::Invalid { errors: vec![e] })?
        .map(|a| a.spec)
        .unwrap_or_default();
    let config = Config { node, agent };
    let warnings = validate(&config).map_err(|mut errors| {
        // With a single source file every problem is in it: say so.
        if let [only] = files.as_slice() {
            for e in &mut errors {
                e.file.get_or_insert_with(|| only.clone());
            }
        }
        ConfigError::Invalid { errors }
    })?;
    Ok(LoadedConfig {
        config,
        files,
        warnings,
    })
}

fn classify(doc: &Value) -> Result<Option<DocKind>, (&'static str, String)> {
    let map = match doc {
        Value::Null => return Ok(None),
        Value::Object(map) if map.is_empty() => return Ok(None),
        Value::Object(map) => map,
        _ => {
            return Err((
                ".",
                "a configuration document must be a mapping with apiVersion, kind and spec"
                    .to_string(),
            ));
        }
    };
    let expected = format!(
        "expected {NODE_API_VERSION} (kind {NODE_KIND}) or {AGENT_API_VERSION} (kind {AGENT_KIND})"
    );
    let api_version = match map.get("apiVersion") {
        Some(Value::String(s)) => s.as_str(),
        Some(other) => return Err(("apiVersion", format!("{other} is not a string; {expected}"))),
        None => return Err(("apiVersion", format!("required; {expected}"))),
    };
    let kind = match map.get("kind") {
        Some(Value::String(s)) => s.as_str(),
        Some(other) => return Err(("kind", format!("{other} is not a string; {expected}"))),
        None => return Err(("kind", format!("required; {expected}"))),
    };
    match (api_version, kind) {
        (NODE_API_VERSION, NODE_KIND) => Ok(Some(DocKind::Node)),
        (AGENT_API_VERSION, AGENT_KIND) => Ok(Some(DocKind::Agent)),
        (NODE_API_VERSION, other) | (AGENT_API_VERSION, other) => Err((
            "kind",
            format!("{other:?} is not a kind of {api_version}; {expected}"),
        )),
        (other, _) => Err((
            "apiVersion",
            format!("{other:?} is not supported; {expected}"),
        )),
    }
}

fn decode<T: DeserializeOwned>(value: Value, file: Option<&Path>) -> Result<T, FieldError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        FieldError {
            file: file.map(Path::to_path_buf),
            path,
            message: e.into_inner().to_string(),
        }
    })
}
