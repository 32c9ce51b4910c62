//! The KV cache of one sequence. Each sequence owns its cache, so a batch can mix sequences of
//! any lengths and a scheduler can add or drop rows between steps without touching the others.

use candle_core::{DType, Device, Tensor};

/// Keys and values of one layer: buffers `[kv_heads, capacity, head_dim]`, of which the first
/// `len` positions are filled. Appends write in place; the buffer doubles when full, so a
/// decode step costs O(new tokens), not a copy of the whole cache.
#[derive(Default)]
struct LayerKv {
    k: Option<Tensor>,
    v: Option<Tensor>,
    len: usize,
}

/// Not `Clone`: the buffers are written in place, so a copy would alias them.
pub struct SeqCache {
    layers: Vec<LayerKv>,
}

impl SeqCache {
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: (0..num_layers).map(|_| LayerKv::default()).collect(),
        }
    }

    /// Number of positions already cached (the position of the next token).
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, |l| l.len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets everything (the buffers are kept for reuse).
    pub fn clear(&mut self) {
        for l in &mut self.layers {
            l.len = 0;
        }
    }

    /// Keeps only the first `len` positions.
    pub fn truncate(&mut self, len: usize) {
        for l in &mut self.layers {
            l.len = l.len.min(len);
        }
    }

    /// Bytes held by the buffers.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .flat_map(|l| [&l.k, &l.v])
            .flatten()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }

    /// Appends `k`, `v` (`[kv_heads, t, head_dim]`, contiguous) to `layer` and returns views of
    /// all cached keys and values, `[kv_heads, len + t, head_dim]`.
    pub(crate) fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let l = &mut self.layers[layer];
        let (heads, t, dim) = k.dims3()?;
        let need = l.len + t;
        let cap = l.k.as_ref().map_or(0, |k| k.dim(1).unwrap_or(0));
        if need > cap {
            let new_cap = need.max(cap * 2).max(64).next_multiple_of(64);
            let grow = |old: &Option<Tensor>, dev: &Device| -> candle_core::Result<Tensor> {
                let buf = Tensor::zeros((heads, new_cap, dim), DType::F32, dev)?;
                if let Some(old) = old
                    && l.len > 0
                {
                    buf.slice_set(&old.narrow(1, 0, l.len)?.contiguous()?, 1, 0)?;
                }
                Ok(buf)
            };
            let nk = grow(&l.k, k.device())?;
            let nv = grow(&l.v, v.device())?;
            l.k = Some(nk);
            l.v = Some(nv);
        }
        let (kb, vb) = (
            l.k.as_ref().expect("allocated"),
            l.v.as_ref().expect("allocated"),
        );
        kb.slice_set(k, 1, l.len)?;
        vb.slice_set(v, 1, l.len)?;
        l.len = need;
        Ok((kb.narrow(1, 0, need)?, vb.narrow(1, 0, need)?))
    }
}
