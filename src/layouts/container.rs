//! Where an adapter's tensors are: a safetensors file, a `torch.save` zip (read by the
//! restricted unpickler, [`crate::pickle`], into a private safetensors copy), a PEFT-style
//! directory (`adapter_config.json` + `adapter_model.safetensors` or `.bin`), or a folder of
//! such directories, one per diffusers component (`unet/`, `text_encoder/`, …), as PEFT's
//! diffusers examples and `convert --to peft` lay them out. Containers, not layouts: any
//! layout's tensors may come in them (a layout says whether it reads directories).

use super::common::file_digest;
use super::names::COMPONENTS;
use crate::error::{Category, Error, Result};
use crate::model::Adapter;
use crate::tensors::MappedFile;
use std::path::{Path, PathBuf};

/// One weights file and what lies beside it.
pub struct Input {
    /// The weights file.
    pub weights: PathBuf,
    /// `adapter_config.json`: the directory's, or one beside a bare weights file.
    pub config: Option<PathBuf>,
    /// The directory, when the adapter was given as one.
    pub directory: Option<PathBuf>,
    /// The diffusers component its directory is named for.
    pub component: Option<String>,
}

impl Input {
    /// Open (for pickles: convert) the weights once, for detection and import.
    pub fn open(&self) -> Result<Weights> {
        open_weights(&self.weights)
    }
}

/// The weights files of an adapter path, in component order (one for anything but a folder of
/// per-component directories).
pub struct Located(Vec<Input>);

impl Located {
    pub fn inputs(self) -> Vec<Input> {
        self.0
    }

    /// The first input (what a folder of components is detected by).
    pub fn first(self) -> Result<Input> {
        self.0
            .into_iter()
            .next()
            .ok_or_else(|| Error::new(Category::UnknownLayout, "holds no adapter"))
    }
}

/// Find the weights of an adapter path.
pub fn locate(path: &Path) -> Result<Located> {
    if !path.is_dir() {
        let sibling = path.with_file_name("adapter_config.json");
        return Ok(Located(vec![Input {
            weights: path.to_path_buf(),
            config: sibling.is_file().then_some(sibling),
            directory: None,
            component: path.parent().and_then(component_from_dir),
        }]));
    }
    if path.join("adapter_config.json").is_file() {
        return Ok(Located(vec![directory(path)?]));
    }
    let components = COMPONENTS
        .iter()
        .map(|c| path.join(c))
        .filter(|d| d.join("adapter_config.json").is_file())
        .map(|d| directory(&d))
        .collect::<Result<Vec<_>>>()?;
    if components.is_empty() {
        return Err(Error::new(
            Category::UnknownLayout,
            "a directory adapter must hold `adapter_config.json` (a PEFT adapter directory) or \
             per-component PEFT folders (unet/, text_encoder/, …)",
        )
        .at(path));
    }
    Ok(Located(components))
}

/// A directory holding `adapter_config.json` + `adapter_model.safetensors` (or `.bin`).
fn directory(dir: &Path) -> Result<Input> {
    let config = dir.join("adapter_config.json");
    let mut weights = dir.join("adapter_model.safetensors");
    if !weights.is_file() {
        weights = dir.join("adapter_model.bin");
        if !weights.is_file() {
            return Err(Error::format(
                dir,
                "missing `adapter_model.safetensors` (or `adapter_model.bin`)",
            ));
        }
    }
    Ok(Input {
        weights,
        config: Some(config),
        directory: Some(dir.to_path_buf()),
        component: component_from_dir(dir),
    })
}

/// A diffusers component named by a PEFT directory (`…/unet`, `…/text_encoder_2`).
fn component_from_dir(dir: &Path) -> Option<String> {
    let name = dir.file_name()?.to_str()?;
    COMPONENTS.contains(&name).then(|| name.to_string())
}

/// A weights file, mapped: safetensors as is, a `torch.save` pickle converted into a private
/// temporary safetensors copy (kept alive as long as this value).
pub struct Weights {
    pub mapped: MappedFile,
    /// The safetensors file the importers read (the original, or the temporary copy).
    pub path: PathBuf,
    /// The file the user gave.
    pub original: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

impl Weights {
    /// Read through a converted copy: the provenance names the file the user gave.
    pub fn record_container(&self, adapter: &mut Adapter) -> Result<()> {
        if self.path != self.original {
            adapter.provenance.source_digest = Some(file_digest(&self.original)?);
            adapter
                .provenance
                .user_metadata
                .insert("oftool.container".into(), "torch.save zip (pickle)".into());
        }
        Ok(())
    }
}

/// Whether a file is a PyTorch pickle archive (by its first bytes, whatever its name).
pub fn is_pickle(path: &Path) -> bool {
    let mut head = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut head))
        .is_ok()
        && crate::pickle::is_zip(&head)
}

/// Open a weights file; pickles go through the restricted reader ([`crate::pickle`]).
pub fn open_weights(path: &Path) -> Result<Weights> {
    if !is_pickle(path) {
        return match MappedFile::open(path) {
            Ok(mapped) => Ok(Weights {
                mapped,
                path: path.to_path_buf(),
                original: path.to_path_buf(),
                _tmp: None,
            }),
            // Not safetensors, but a bare pickle (PROTO 2–5): say what it is.
            Err(e) => {
                let mut head = [0u8; 2];
                let bare = std::fs::File::open(path)
                    .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut head))
                    .is_ok()
                    && head[0] == 0x80
                    && (2..=5).contains(&head[1]);
                if bare {
                    Err(Error::unsupported(
                        path,
                        "not a zip-format PyTorch file (a bare pickle, as torch.save wrote before \
                         PyTorch 1.6); re-save it with a current torch, or as safetensors",
                    ))
                } else {
                    Err(e)
                }
            }
        };
    }
    let tensors = crate::pickle::read_state_dict(path)?;
    let tmp = tempfile::tempdir().map_err(|e| Error::io(Path::new("(temporary directory)"), e))?;
    let copy = tmp.path().join("weights.safetensors");
    let views: Vec<(&str, safetensors::Dtype, &[usize], &[u8])> = tensors
        .iter()
        .map(|t| {
            (
                t.name.as_str(),
                t.dtype.safetensors(),
                t.shape.as_slice(),
                t.bytes.as_slice(),
            )
        })
        .collect();
    let mut f = std::fs::File::create(&copy).map_err(|e| Error::io(&copy, e))?;
    crate::tensors::write_safetensors(&mut f, &views, Default::default())?;
    drop(f);
    Ok(Weights {
        mapped: MappedFile::open(&copy)?,
        path: copy,
        original: path.to_path_buf(),
        _tmp: Some(tmp),
    })
}
