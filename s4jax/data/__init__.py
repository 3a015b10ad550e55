"""Input data: datasets, host-side weak transforms and grain pipelines."""
