"""Reading and writing cases: where a dataset's files are (layouts, manifests), the volumes, label conventions, resampling, synthetic phantoms."""
