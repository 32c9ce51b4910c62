//! The one place that chooses where tensors live and compute. Every loader (the decoder's
//! default, adapters through the decoder they attach to, the router, the embedder, the
//! trainers) takes its device from here or from the model it works with, so a GPU build changes
//! this function and nothing else: today the CPU (with our own SIMD kernels chosen at run time).

use candle_core::Device;

/// The device new models, encoders and trainable weights are put on.
pub fn compute() -> Device {
    Device::Cpu
}
