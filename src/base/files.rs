//! Which safetensors files a base path stands for: one file, the shards of a sharded checkpoint
//! (its folder or `*.safetensors.index.json`), or the components of a diffusers pipeline folder.
//! Only paths and names here; headers are read by [`super::Base::open`].

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// How the base is laid out on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Storage {
    /// One safetensors file (given directly, or the only one in a folder).
    File(PathBuf),
    /// A sharded checkpoint: its index file; the shards and the rest of the folder are beside it.
    Sharded {
        /// The `*.safetensors.index.json` file.
        index: PathBuf,
    },
    /// A diffusers pipeline folder: its root; each component is a subfolder.
    Pipeline {
        /// The pipeline folder.
        root: PathBuf,
    },
}

impl Storage {
    /// The folder an output mirrors (`None` for a single file).
    pub fn root(&self) -> Option<&Path> {
        match self {
            Storage::File(_) => None,
            Storage::Sharded { index } => Some(index.parent().unwrap_or(Path::new("."))),
            Storage::Pipeline { root } => Some(root),
        }
    }
}

/// One group of files that share a name space: a whole model, or one pipeline component.
pub(super) struct FileGroup {
    pub component: Option<String>,
    /// (path, path relative to the output root).
    pub files: Vec<(PathBuf, PathBuf)>,
}

/// Pipeline components whose subfolders hold weights an adapter can target.
pub use crate::layouts::names::COMPONENTS;

/// The entries of `dir`, sorted.
pub(crate) fn list_dir(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    v.sort();
    Ok(v)
}

fn is_index(p: &Path) -> bool {
    p.to_string_lossy().ends_with(".safetensors.index.json")
}

fn is_safetensors(p: &Path) -> bool {
    p.extension().is_some_and(|e| e == "safetensors")
}

/// The safetensors files of a model folder: its shards when it has an index, else its files.
fn model_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = list_dir(dir)?;
    if let Some(index) = entries.iter().find(|p| is_index(p)) {
        return shard_files(index);
    }
    Ok(entries.into_iter().filter(|p| is_safetensors(p)).collect())
}

/// The shards an index names (each once, sorted); names must be plain file names.
fn shard_files(index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::format(index, format!("not valid JSON: {e}")))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::format(index, "no `weight_map` object"))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files: Vec<PathBuf> = Vec::new();
    for f in map.values() {
        let name = f
            .as_str()
            .filter(|n| !n.contains('/') && !n.contains('\\') && *n != ".." && !n.is_empty())
            .ok_or_else(|| {
                Error::format(index, format!("shard name {f} is not a plain file name"))
            })?;
        let p = dir.join(name);
        if !files.contains(&p) {
            files.push(p);
        }
    }
    files.sort();
    Ok(files)
}

/// What `base` is.
pub(super) fn classify(base: &Path) -> Result<Storage> {
    if !base.exists() {
        return Err(Error::io(
            base,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
        ));
    }
    if base.is_file() {
        return Ok(if is_index(base) {
            Storage::Sharded {
                index: base.to_path_buf(),
            }
        } else {
            Storage::File(base.to_path_buf())
        });
    }
    let entries = list_dir(base)?;
    let indexes: Vec<&PathBuf> = entries.iter().filter(|p| is_index(p)).collect();
    if let [index] = indexes.as_slice() {
        return Ok(Storage::Sharded {
            index: (*index).clone(),
        });
    }
    if !groups_of_pipeline(base)?.is_empty() {
        return Ok(Storage::Pipeline {
            root: base.to_path_buf(),
        });
    }
    let st: Vec<&PathBuf> = entries.iter().filter(|p| is_safetensors(p)).collect();
    match st.as_slice() {
        [one] => Ok(Storage::File((*one).clone())),
        _ => Err(Error::usage(format!(
            "{}: not a checkpoint oftool understands (a .safetensors file, a sharded folder with a \
             *.safetensors.index.json, or a diffusers folder with unet/, text_encoder/, … subfolders)",
            base.display()
        ))),
    }
}

fn groups_of_pipeline(root: &Path) -> Result<Vec<FileGroup>> {
    let mut groups = Vec::new();
    for c in COMPONENTS {
        let d = root.join(c);
        if d.is_dir() {
            let files = model_files(&d)?;
            if !files.is_empty() {
                groups.push(FileGroup {
                    component: Some(c.to_string()),
                    files: files
                        .iter()
                        .map(|p| (p.clone(), relative(p, root)))
                        .collect(),
                });
            }
        }
    }
    Ok(groups)
}

fn relative(p: &Path, root: &Path) -> PathBuf {
    p.strip_prefix(root)
        .map(Path::to_path_buf)
        .unwrap_or_else(|_| p.to_path_buf())
}

/// The file groups of a layout, in a fixed order.
pub(super) fn groups(layout: &Storage) -> Result<Vec<FileGroup>> {
    match layout {
        Storage::File(p) => Ok(vec![FileGroup {
            component: None,
            files: vec![(p.clone(), PathBuf::from(p.file_name().unwrap_or_default()))],
        }]),
        Storage::Sharded { index } => {
            let dir = index.parent().unwrap_or(Path::new("."));
            let files = shard_files(index)?
                .into_iter()
                .map(|p| {
                    let r = relative(&p, dir);
                    (p, r)
                })
                .collect();
            Ok(vec![FileGroup {
                component: None,
                files,
            }])
        }
        Storage::Pipeline { root } => groups_of_pipeline(root),
    }
}
