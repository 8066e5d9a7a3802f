//! Importers: recognise an adapter's layout and map it onto the canonical model exactly.
//!
//! Detection follows formats.md §9.2: tensor keys are authoritative, metadata disambiguates.

pub mod lycoris;
pub mod peft;

use crate::error::{Error, Result};
use crate::model::Adapter;
use crate::oft_file;
use crate::tensors::MappedFile;
use std::path::{Path, PathBuf};

/// The layouts oftool recognises (some only to name them in an error).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    Oft,
    /// PEFT OFT ≥ 0.16 (`oft_R.weight`).
    PeftOft,
    /// LyCORIS diag-oft ≥ 2.2 (`oft_blocks` + `alpha`).
    LycorisDiagOft,
    /// LyCORIS BOFT (4-D `oft_blocks`).
    LycorisBoft,
    /// kohya legacy `networks.oft` (`oft_unet_…`).
    KohyaOft,
}

impl Layout {
    pub fn name(self) -> &'static str {
        match self {
            Layout::Oft => "oft",
            Layout::PeftOft => "peft-oft",
            Layout::LycorisDiagOft => "lycoris-diag-oft",
            Layout::LycorisBoft => "lycoris-boft",
            Layout::KohyaOft => "kohya-oft",
        }
    }
}

/// Where a PEFT directory keeps its files.
pub struct PeftDir {
    pub config: PathBuf,
    pub weights: PathBuf,
}

/// Find `adapter_config.json` + `adapter_model.safetensors` in `dir`.
pub fn peft_dir(dir: &Path) -> Result<PeftDir> {
    let config = dir.join("adapter_config.json");
    if !config.is_file() {
        return Err(Error::format(
            dir,
            "a directory adapter must hold `adapter_config.json` (a PEFT adapter directory)",
        ));
    }
    let weights = dir.join("adapter_model.safetensors");
    if !weights.is_file() {
        if dir.join("adapter_model.bin").is_file() {
            return Err(Error::unsupported(
                dir,
                "`adapter_model.bin` (pickle) is not read yet; save the adapter with safe_serialization=True",
            ));
        }
        return Err(Error::format(dir, "missing `adapter_model.safetensors`"));
    }
    Ok(PeftDir { config, weights })
}

/// Identify the layout of `path` from its keys (and config, for directories).
pub fn detect(path: &Path) -> Result<Layout> {
    if path.is_dir() {
        let dir = peft_dir(path)?;
        peft::check_config_supported(&dir.config)?;
        return Ok(Layout::PeftOft);
    }
    let file = MappedFile::open(path)?;
    detect_file(path, &file)
}

fn detect_file(path: &Path, file: &MappedFile) -> Result<Layout> {
    if oft_file::is_oft(&file.metadata) {
        return Ok(Layout::Oft);
    }
    let st = file.tensors();
    let names = st.names();
    let has = |suffix: &str| names.iter().any(|n| n.ends_with(suffix));
    if has(".oft_R.weight") || has(".oft_embedding_R.weight") {
        if has(".oft_R.scaled_oft") {
            return Err(Error::unsupported(
                path,
                "OneTrainer scaled OFT files are not imported yet",
            ));
        }
        return Ok(Layout::PeftOft);
    }
    if has(".oft_r") || has(".oft_s") {
        return Err(Error::unsupported(
            path,
            "PEFT OFT from PEFT ≤ 0.15 (`oft_r`/`oft_s` tensors) is not imported yet; \
             only PEFT ≥ 0.16 (`oft_R.weight`) is",
        ));
    }
    if has(".boft_R") {
        return Err(Error::unsupported(
            path,
            "BOFT adapters (`boft_R`) are not imported yet",
        ));
    }
    if has(".oft_diag") {
        return Err(Error::unsupported(
            path,
            "LyCORIS 2.0 `oft_diag` files are not imported yet",
        ));
    }
    let blocks: Vec<&&str> = names
        .iter()
        .filter(|n| n.ends_with(".oft_blocks"))
        .collect();
    if !blocks.is_empty() {
        let four_d = blocks
            .iter()
            .any(|n| st.tensor(n).map(|t| t.shape().len() == 4).unwrap_or(false));
        return Ok(if four_d {
            Layout::LycorisBoft
        } else if blocks.iter().any(|n| n.starts_with("oft_unet_")) {
            Layout::KohyaOft
        } else {
            Layout::LycorisDiagOft
        });
    }
    if names.iter().any(|n| n.contains(".oft_blocks.")) {
        return Err(Error::unsupported(
            path,
            "kohya Flux legacy OFT files (`oft_blocks.<i>`) are not imported yet",
        ));
    }
    Err(Error::format(
        path,
        "no OFT tensors found (looked for `oft_R.weight`, `oft_blocks`, `oft_r`, `boft_R`, `oft_diag`); is this an OFT adapter?",
    ))
}

/// Read any supported adapter into the canonical model, as its producer computes it.
pub fn load(path: &Path) -> Result<Adapter> {
    load_with(path, lycoris::Semantics::Producer)
}

/// Read an adapter as a given runtime reads it (only `oft_blocks` files differ between readers).
pub fn load_with(path: &Path, semantics: lycoris::Semantics) -> Result<Adapter> {
    if path.is_dir() {
        let dir = peft_dir(path)?;
        return peft::import(&dir.weights, Some(&dir.config), component_from_dir(path));
    }
    let file = MappedFile::open(path)?;
    match detect_file(path, &file)? {
        Layout::Oft => oft_file::read(path),
        Layout::PeftOft => {
            let sibling = path.with_file_name("adapter_config.json");
            let config = sibling.is_file().then_some(sibling);
            let component = path.parent().and_then(component_from_dir);
            peft::import(path, config.as_deref(), component)
        }
        Layout::LycorisDiagOft | Layout::LycorisBoft | Layout::KohyaOft => {
            lycoris::import(path, &file, semantics)
        }
    }
}

/// A diffusers component named by a PEFT directory (`…/unet`, `…/text_encoder_2`).
fn component_from_dir(dir: &Path) -> Option<String> {
    let name = dir.file_name()?.to_str()?;
    ["unet", "text_encoder", "text_encoder_2", "transformer"]
        .contains(&name)
        .then(|| name.to_string())
}

/// blake3 of a file's bytes, streamed.
pub fn file_digest(path: &Path) -> Result<String> {
    let mut h = blake3::Hasher::new();
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    h.update_reader(f).map_err(|e| Error::io(path, e))?;
    Ok(h.finalize().to_hex().to_string())
}
