"""Pipeline stages: one module per stage, artifacts in, artifact out (see `pipelines.stage`)."""
