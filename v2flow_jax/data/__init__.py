"""Data: config settings, image decoding, sources and the cached-latent format; the grain pipeline over them is
`v2flow_jax.input_pipeline`."""
