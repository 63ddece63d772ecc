"""Linear algebra: SVD and singular value thresholding backends, proximal maps, batching rules."""
