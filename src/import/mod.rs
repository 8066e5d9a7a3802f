//! Importers: recognise an adapter's layout and map it onto the canonical model exactly.
//!
//! Detection follows formats.md §9.2: tensor keys are authoritative, metadata disambiguates.

pub mod boft;
mod common;
pub mod lycoris;
pub mod onetrainer;
pub mod peft;
pub mod peft_legacy;

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
    /// PEFT OFT 0.7–0.13 (`oft_r`) and 0.14–0.15 (`oft_r` + `oft_s`).
    PeftOftLegacy,
    /// PEFT BOFT or kohya `networks.boft` (`boft_R`, `boft_s`).
    Boft,
    /// OneTrainer `OFT_2` or kohya `networks.oft_v2` (`oft_R.weight` under trainer prefixes).
    OneTrainer,
    /// LyCORIS 2.0 `oft_diag` (the rotation itself).
    LycorisOftDiag,
}

impl Layout {
    pub fn name(self) -> &'static str {
        match self {
            Layout::Oft => "oft",
            Layout::PeftOft => "peft-oft",
            Layout::LycorisDiagOft => "lycoris-diag-oft",
            Layout::LycorisBoft => "lycoris-boft",
            Layout::KohyaOft => "kohya-oft",
            Layout::PeftOftLegacy => "peft-oft-legacy",
            Layout::Boft => "boft",
            Layout::OneTrainer => "onetrainer-oft2",
            Layout::LycorisOftDiag => "lycoris-oft-diag",
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
        return detect_dir(path);
    }
    let file = MappedFile::open(path)?;
    detect_file(path, &file)
}

/// A PEFT directory's layout: the config's `peft_type`, then the tensors (formats.md §9.2).
fn detect_dir(path: &Path) -> Result<Layout> {
    if !path.join("adapter_config.json").is_file()
        && let Some(c) = COMPONENTS
            .iter()
            .map(|c| path.join(c))
            .find(|d| d.join("adapter_config.json").is_file())
    {
        return detect_dir(&c);
    }
    let dir = peft_dir(path)?;
    let peft_type = peft::peft_type(&dir.config)?;
    let file = MappedFile::open(&dir.weights)?;
    let layout = detect_file(&dir.weights, &file)?;
    let fits = match peft_type.as_str() {
        "OFT" => matches!(layout, Layout::PeftOft | Layout::PeftOftLegacy),
        "BOFT" => layout == Layout::Boft,
        other => {
            return Err(Error::unsupported(
                &dir.config,
                format!("peft_type `{other}` is not an OFT or BOFT adapter"),
            ));
        }
    };
    if !fits {
        return Err(Error::format(
            path,
            format!(
                "adapter_config.json says peft_type `{peft_type}` but the tensors are {}",
                layout.name()
            ),
        ));
    }
    if layout == Layout::PeftOft {
        peft::check_config_supported(&dir.config)?;
    }
    Ok(layout)
}

fn detect_file(path: &Path, file: &MappedFile) -> Result<Layout> {
    if oft_file::is_oft(&file.metadata) {
        return Ok(Layout::Oft);
    }
    let st = file.tensors();
    let names = st.names();
    let has = |suffix: &str| names.iter().any(|n| n.ends_with(suffix));
    let has_part = |part: &str| names.iter().any(|n| n.contains(part));
    let mut found = Vec::new();
    if has(".oft_R.weight") || has(".oft_embedding_R.weight") || has(".oft_R.scaled_oft") {
        found.push(if onetrainer::is_trainer_file(&names, &file.metadata) {
            Layout::OneTrainer
        } else {
            Layout::PeftOft
        });
    }
    if has(".oft_r") || has(".oft_s") {
        found.push(Layout::PeftOftLegacy);
    }
    if has(".boft_R") || has(".boft_s") {
        found.push(Layout::Boft);
    }
    if has(".oft_diag") {
        found.push(Layout::LycorisOftDiag);
    }
    if has_part(".oft_blocks.") {
        return Err(Error::unsupported(
            path,
            "kohya's legacy Flux OFT (`oft_blocks.<i>`, one rotation per split of the fused \
             qkv/linear1 weights) is not imported: its splits of different sizes are no single \
             block-diagonal rotation in format 1.0, and kohya's own merge of it is broken \
             (formats.md §4.2); bake it with sd-scripts' training-time forward instead",
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
        found.push(if four_d {
            Layout::LycorisBoft
        } else if blocks.iter().any(|n| n.starts_with("oft_unet_")) {
            Layout::KohyaOft
        } else {
            Layout::LycorisDiagOft
        });
    }
    match found.as_slice() {
        [one] => Ok(*one),
        [] => Err(Error::format(
            path,
            "no OFT tensors found (looked for `oft_R.weight`, `oft_R.scaled_oft`, `oft_blocks`, \
             `oft_blocks.<i>`, `oft_r`, `oft_s`, `boft_R`, `boft_s`, `oft_diag`, and `.oft` metadata); \
             is this an OFT adapter?",
        )),
        many => Err(Error::format(
            path,
            format!(
                "mixed layouts in one file ({}): refusing to guess",
                many.iter().map(|l| l.name()).collect::<Vec<_>>().join(", ")
            ),
        )),
    }
}

/// Read any supported adapter into the canonical model, as its producer computes it.
pub fn load(path: &Path) -> Result<Adapter> {
    load_with(path, lycoris::Semantics::Producer)
}

/// Read an adapter as a given runtime reads it (only `oft_blocks` files differ between readers).
pub fn load_with(path: &Path, semantics: lycoris::Semantics) -> Result<Adapter> {
    if path.is_dir() && !path.join("adapter_config.json").is_file() {
        return load_components(path, semantics);
    }
    let (weights, config, component, layout) = if path.is_dir() {
        let layout = detect_dir(path)?;
        let dir = peft_dir(path)?;
        (
            dir.weights,
            Some(dir.config),
            component_from_dir(path),
            layout,
        )
    } else {
        let file = MappedFile::open(path)?;
        let layout = detect_file(path, &file)?;
        let sibling = path.with_file_name("adapter_config.json");
        let config = sibling.is_file().then_some(sibling);
        let component = path.parent().and_then(component_from_dir);
        (path.to_path_buf(), config, component, layout)
    };
    let path = weights.as_path();
    match layout {
        Layout::Oft => oft_file::read(path),
        Layout::PeftOft => peft::import(path, config.as_deref(), component),
        Layout::PeftOftLegacy => peft_legacy::import(path, config.as_deref(), component),
        Layout::Boft => boft::import(path, config.as_deref(), component),
        Layout::OneTrainer => onetrainer::import(path, &MappedFile::open(path)?),
        Layout::LycorisOftDiag => lycoris::import_oft_diag(path, &MappedFile::open(path)?),
        Layout::LycorisDiagOft | Layout::LycorisBoft | Layout::KohyaOft => {
            lycoris::import(path, &MappedFile::open(path)?, semantics)
        }
    }
}

/// The diffusers pipeline components a folder of per-component PEFT adapters may hold.
pub const COMPONENTS: [&str; 4] = ["unet", "text_encoder", "text_encoder_2", "transformer"];

/// A folder of per-component PEFT directories (`unet/`, `text_encoder/`, …), as diffusers
/// pipelines and `convert --to diffusers` lay them out: one adapter, layers in component order.
fn load_components(path: &Path, semantics: lycoris::Semantics) -> Result<Adapter> {
    let mut merged: Option<Adapter> = None;
    for c in COMPONENTS {
        let d = path.join(c);
        if d.join("adapter_config.json").is_file() {
            let a = load_with(&d, semantics)?;
            match &mut merged {
                None => merged = Some(a),
                Some(m) => m.layers.extend(a.layers),
            }
        }
    }
    merged.ok_or_else(|| {
        Error::format(
            path,
            "holds neither adapter_config.json nor per-component PEFT folders (unet/, text_encoder/, …)",
        )
    })
}

/// A diffusers component named by a PEFT directory (`…/unet`, `…/text_encoder_2`).
fn component_from_dir(dir: &Path) -> Option<String> {
    let name = dir.file_name()?.to_str()?;
    COMPONENTS.contains(&name).then(|| name.to_string())
}

/// blake3 of a file's bytes, streamed.
pub fn file_digest(path: &Path) -> Result<String> {
    let mut h = blake3::Hasher::new();
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    h.update_reader(f).map_err(|e| Error::io(path, e))?;
    Ok(h.finalize().to_hex().to_string())
}
