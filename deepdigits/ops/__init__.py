"""Alternative implementations of the network's convolution and pooling ops (same
functions, other speeds): shifted-view matmuls, strided-view pooling, oneDNN through XLA FFI."""
