"""The checkpoint an index was built from (``--source``): what queries of the model load,
and the tokenizer that places imported tokens in their captions."""

from __future__ import annotations

from dataclasses import dataclass

from latentlens.errors import InputError
from latentlens.interop.reference import require


@dataclass
class SourceModel:
    """A loadable checkpoint, as ``llens ingest`` records it (params source, gguf_file)."""

    given: str
    source: str
    gguf_file: str | None = None
    hidden_size: int | None = None  # from its config (None: not read)
    num_layers: int | None = None

    def params(self) -> dict:
        out = {"source": self.source}
        if self.gguf_file:
            out["gguf_file"] = self.gguf_file
        return out

    @property
    def default_name(self) -> str:
        """The store name ``llens ingest`` gives this checkpoint."""
        from latentlens.models.loading import default_name

        return default_name(self.source, self.gguf_file)


def resolve_source(source: str, *, read_config: bool = True) -> SourceModel:
    """A hub id, local model dir or ``.gguf`` file; with ``read_config``, its hidden size and
    number of layers (of the language model, for a VLM) from its config."""
    from latentlens.models.loading import _split_source

    src, gguf = _split_source(source, None)
    out = SourceModel(given=source, source=src, gguf_file=gguf)
    if not read_config:
        return out
    require("transformers", "reading --source's config")
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(src, **({"gguf_file": gguf} if gguf else {}))
    except Exception as e:
        msg = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise InputError(f"cannot read the config of --source {source} ({msg}): check the name, "
                         "or give --num-layers to import without reading it") from None
    text = cfg
    try:
        from latentlens.architectures import family_for

        text = family_for(cfg).text_config_of(cfg)
    except Exception:  # an architecture without an adapter yet: transformers' own answer
        text = cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg
    hidden, n = getattr(text, "hidden_size", None), getattr(text, "num_hidden_layers", None)
    if not isinstance(n, int) or n < 1:
        raise InputError(f"the config of --source {source} gives no number of layers: give --num-layers")
    out.hidden_size = int(hidden) if isinstance(hidden, int) else None
    out.num_layers = n
    return out

