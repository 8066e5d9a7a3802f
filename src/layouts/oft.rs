//! The `.oft` format itself (spec/oft-format.md): recognised by its `format = oft` metadata,
//! read and written by [`crate::oft_file`].

use super::{Claim, Layout, Probe, Reader, Source, Variant, Writes};
use crate::error::Result;
use crate::model::Adapter;
use crate::oft_file;

pub static LAYOUT: Layout = Layout {
    id: "oft",
    aliases: &[],
    about: "The spec-defined `.oft` format (spec/oft-format.md)",
    reads: Some(Reader {
        keys: &[],
        companions: &[],
        markers: &["`.oft` metadata"],
        directories: false,
        detect,
        variants: &[&FILE],
    }),
    writes: Writes::Canonical,
    metadata_keys: &[oft_file::META_FORMAT, "oft."],
};

static FILE: Variant = Variant::new("", import);

fn detect(probe: &Probe<'_>) -> Result<Vec<Claim>> {
    Ok(if oft_file::is_oft(&probe.file.metadata) {
        vec![Claim::marker(&FILE)]
    } else {
        Vec::new()
    })
}

fn import(src: &Source<'_>) -> Result<Adapter> {
    oft_file::read(src.path)
}
