//! Importers: recognise an adapter's layout and map it onto the canonical model exactly.
//!
//! Detection follows formats.md §9.2: tensor keys are authoritative, metadata disambiguates.

pub mod authors;
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
    /// The OFT authors' attention-processor files (`processor.to_q_oft.R`).
    Authors,
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
            Layout::OneTrainer => "oft-v2",
            Layout::LycorisOftDiag => "lycoris-oft-diag",
            Layout::Authors => "oft-authors",
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
    Ok(PeftDir { config, weights })
}

/// Identify the layout of `path` from its keys (and config, for directories).
pub fn detect(path: &Path) -> Result<Layout> {
    if path.is_dir() {
        return detect_dir(path);
    }
    let file = open_weights(path)?;
    detect_file(path, &file.mapped)
}

/// A weights file, mapped: safetensors as is, a `torch.save` pickle converted into a private
/// temporary safetensors copy (kept alive as long as this value).
pub struct Weights {
    pub mapped: MappedFile,
    /// The safetensors file the importers read (the original, or the temporary copy).
    pub path: PathBuf,
    _tmp: Option<tempfile::TempDir>,
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
        _tmp: Some(tmp),
    })
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
    let file = open_weights(&dir.weights)?;
    dir_layout(path, &dir, &file)
}

/// The layout of a PEFT directory whose weights are open: the tensors' layout, which the
/// config's `peft_type` must agree with.
fn dir_layout(path: &Path, dir: &PeftDir, file: &Weights) -> Result<Layout> {
    let peft_type = peft::peft_type(&dir.config)?;
    let layout = detect_file(&dir.weights, &file.mapped)?;
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
    if authors::is_authors(&names) {
        found.push(Layout::Authors);
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
             `oft_blocks.<i>`, `oft_r`, `oft_s`, `boft_R`, `boft_s`, `oft_diag`, `processor.to_q_oft.R`, \
             and `.oft` metadata); \
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
    // Open the weights once (a pickle is converted once) for detection and import.
    let (weights, opened, config, component, layout) = if path.is_dir() {
        let dir = peft_dir(path)?;
        let opened = open_weights(&dir.weights)?;
        let layout = dir_layout(path, &dir, &opened)?;
        (
            dir.weights,
            opened,
            Some(dir.config),
            component_from_dir(path),
            layout,
        )
    } else {
        let opened = open_weights(path)?;
        let layout = detect_file(path, &opened.mapped)?;
        let sibling = path.with_file_name("adapter_config.json");
        let config = sibling.is_file().then_some(sibling);
        let component = path.parent().and_then(component_from_dir);
        (path.to_path_buf(), opened, config, component, layout)
    };
    let original = weights;
    let path = opened.path.as_path();
    let mapped = &opened.mapped;
    let mut adapter = match layout {
        Layout::Oft => oft_file::read(path),
        Layout::PeftOft => peft::import(path, config.as_deref(), component),
        Layout::PeftOftLegacy => peft_legacy::import(path, config.as_deref(), component),
        Layout::Boft => boft::import(path, config.as_deref(), component),
        Layout::OneTrainer => onetrainer::import(path, mapped),
        Layout::LycorisOftDiag => lycoris::import_oft_diag(path, mapped),
        Layout::LycorisDiagOft | Layout::LycorisBoft | Layout::KohyaOft => {
            lycoris::import(path, mapped, semantics)
        }
        Layout::Authors => authors::import(path, mapped),
    }?;
    if path != original {
        // Read through a converted copy: the provenance names the file the user gave.
        adapter.provenance.source_digest = Some(file_digest(&original)?);
        adapter
            .provenance
            .user_metadata
            .insert("oftool.container".into(), "torch.save zip (pickle)".into());
    }
    Ok(adapter)
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
