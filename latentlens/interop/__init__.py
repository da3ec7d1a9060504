"""Import and export the reference LatentLens index layout.

One module per job:

- :mod:`~latentlens.interop.reference`: the layout itself (``metadata.json``,
  ``layer_N/embeddings_cache.pt``), read safely (no arbitrary unpickling) and lazily;
- :mod:`~latentlens.interop.hub`: where an index comes from, a directory or a
  Hugging Face Hub repository (download, cache, resume, offline, errors);
- :mod:`~latentlens.interop.source`: the checkpoint an index was built from (``--source``);
- :mod:`~latentlens.interop.placement`: each imported token's span in its caption and
  its prefix hash (by the model's tokenizer, as ingest, or by text where unambiguous);
- :mod:`~latentlens.interop.importer`: the import, recorded as a run of kind 'import';
- :mod:`~latentlens.interop.export`: writing a stored model in the layout.

The names below stay importable from ``latentlens.interop`` as before the split.
"""

from __future__ import annotations

from latentlens.interop.export import export_index
from latentlens.interop.hub import (
    HUB_ID,
    HubIndex,
    fetch_hub_index,
    hub_layer_pattern,
    locate_index,
)
from latentlens.interop.importer import ImportReport, Progress, import_hub_index, import_index
from latentlens.interop.placement import find_span, place_by_text, prefix_hash, text_prefix_hash
from latentlens.interop.reference import (
    CACHE_FILE,
    LAYER_DIR,
    check_layer_file,
    layer_files,
    load_layer_file,
    read_metadata,
)
from latentlens.interop.source import SourceModel, resolve_source

__all__ = [
    "CACHE_FILE", "HUB_ID", "LAYER_DIR", "HubIndex", "ImportReport", "Progress", "SourceModel", "check_layer_file",
    "export_index", "fetch_hub_index", "find_span", "hub_layer_pattern", "import_hub_index", "import_index",
    "layer_files", "load_layer_file", "locate_index", "place_by_text", "prefix_hash", "read_metadata",
    "resolve_source", "text_prefix_hash",
]
