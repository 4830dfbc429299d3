"""Every byte in or out: stores (local folder, S3), layouts, image decoding, the Parquet manifest.

Import from the submodules (`storage.store`, `storage.images`, ...); this package file stays empty so
importing one part does not pull in the others' dependencies.
"""
