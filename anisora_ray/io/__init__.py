"""File formats and storage: fsspec URLs, mp4 video, images, parquet tables."""
