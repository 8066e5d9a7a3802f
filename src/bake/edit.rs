//! One adapter layer applied to some rows of one base tensor, and where its parameters are:
//! in the layer, or still in a `.oft` file ([`crate::oft_file::read_deferred`]), read when the
//! bake reaches the tensor and dropped when it is done.

use crate::apply::Blend;
use crate::base::RowSlice;
use crate::error::Result;
use crate::model::{Layer, Side};
use crate::oft_file::DeferredParams;
use std::borrow::Cow;
use std::ops::Range;

/// One adapter layer applied to some rows of one base tensor.
pub(crate) struct Edit<'a> {
    /// The layer, or the part of it one tensor takes (a fused module on a split base). For a
    /// deferred edit its stages hold no parameters: private, so that a backend reaches the
    /// layer only through [`Edit::layer`], which reads them; a layer without its values cannot
    /// be rotated by mistake.
    layer: Cow<'a, Layer>,
    source: Source<'a>,
    pub rows: RowSlice,
    pub blend: Blend,
}

/// Where an edit's stage parameters are.
enum Source<'a> {
    /// In the edit's layer.
    Loaded,
    /// In a `.oft` file: layer `index` of `params`, which `whole` is without its values; the
    /// edit takes rows `part` of it when the layer is split across tensors.
    Deferred {
        params: &'a DeferredParams,
        index: usize,
        whole: &'a Layer,
        part: Option<Vec<Range<usize>>>,
    },
}

impl<'a> Edit<'a> {
    /// An edit whose layer holds its parameters.
    pub fn new(layer: Cow<'a, Layer>, rows: RowSlice, blend: Blend) -> Self {
        Edit {
            layer,
            source: Source::Loaded,
            rows,
            blend,
        }
    }

    /// An edit of layer `index` of a deferred `.oft` file: `whole` is that layer as read
    /// (without values), `layer` the part of it this tensor takes (rows `part` of it, or all).
    pub fn deferred(
        layer: Cow<'a, Layer>,
        rows: RowSlice,
        blend: Blend,
        params: &'a DeferredParams,
        index: usize,
        whole: &'a Layer,
        part: Option<Vec<Range<usize>>>,
    ) -> Self {
        Edit {
            layer,
            source: Source::Deferred {
                params,
                index,
                whole,
                part,
            },
            rows,
            blend,
        }
    }

    /// The layer with its parameters: borrowed when it holds them, else read from the file
    /// now (and dropped with the returned value).
    pub fn layer(&self) -> Result<Cow<'_, Layer>> {
        match &self.source {
            Source::Loaded => Ok(Cow::Borrowed(&*self.layer)),
            Source::Deferred {
                params,
                index,
                whole,
                part,
            } => {
                let full = params.load(*index, whole)?;
                Ok(Cow::Owned(match part {
                    None => full,
                    Some(part) => crate::base::slice_part(&full, part),
                }))
            }
        }
    }

    /// The side the layer rotates.
    pub fn side(&self) -> Side {
        self.layer.side
    }

    /// The layer's row scale (never deferred).
    pub fn row_scale(&self) -> Option<&[f64]> {
        self.layer.row_scale.as_ref().map(|(_, v)| v.as_slice())
    }

    /// Bytes of parameters this edit holds in memory (none while they are in a `.oft` file).
    pub fn resident_bytes(&self) -> u64 {
        let f64s = match self.source {
            Source::Loaded => {
                self.layer.stages.iter().map(|s| s.q.len()).sum::<usize>()
                    + self.row_scale().map_or(0, <[f64]>::len)
            }
            Source::Deferred { .. } => 0,
        };
        8 * f64s as u64
    }

    /// Whether the parameters are still in the file.
    #[cfg(test)]
    pub fn is_deferred(&self) -> bool {
        matches!(self.source, Source::Deferred { .. })
    }
}
