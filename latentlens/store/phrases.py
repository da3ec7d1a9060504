"""Phrase search over stored sentences: where a word or phrase occurs, with its stored tokens.

The SQL behind the web app's context search (``/search``, ``/api/search``):
sentences of a model's corpora that contain the phrase (``ILIKE``, ranked by
BM25 where the server has pg_textsearch and a bm25 index on
``sentence(text)``), joined to their tokens at one layer from
``llens_contexts`` (the ``token_context`` view). Whole-word matching and
grouping happen in the caller (latentlens.serve.work.context_search).
"""

from __future__ import annotations

import psycopg

from latentlens.store.base import StoreBase
from latentlens.store.types import ModelInfo

_SEARCH_SQL = """
WITH s AS (
    SELECT s.id, row_number() OVER (ORDER BY {order}) AS rank
      FROM sentence s
     WHERE s.text ILIKE %(pat)s
       AND s.corpus_id IN (SELECT corpus_id FROM ingest_run WHERE model_id = %(mid)s)
     ORDER BY {order}
     LIMIT %(cand)s
)
SELECT c.sentence_id, c.sentence, c.position, c.token, c.char_start, c.char_end
  FROM s JOIN {contexts} c ON c.sentence_id = s.id AND c.layer = %(layer)s
 ORDER BY s.rank, c.position
"""

_ORDERS = {"bm25": "s.text <@> %(q)s", "sentence order": "s.id"}
# On Citus llens_contexts is PL/pgSQL (it cannot be inlined there) and would read every
# layer of the model: the view, filtered by the model's id, is sent to the shards instead.
_CONTEXTS = "llens_contexts(%(model)s)"
_CONTEXTS_CITUS = "(SELECT * FROM token_context WHERE model_id = %(mid)s)"


class PhrasesMixin(StoreBase):
    """Sentences containing a phrase, and their stored tokens (for the web app's context search)."""

    def has_bm25(self) -> bool:
        """pg_textsearch installed, with a bm25 index on sentence(text) to rank by."""
        return bool(self._fetch(
            "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_textsearch') AND EXISTS ("
            "SELECT 1 FROM pg_indexes WHERE tablename = 'sentence' AND indexdef ILIKE '%%using bm25%%')"
        )[0][0])

    def phrase_tokens(self, info: ModelInfo, phrase: str, *, layer: int, candidates: int,
                      ranking: str = "sentence order") -> tuple[list[tuple], str]:
        """(sentence_id, sentence, position, token, char_start, char_end) of up to ``candidates``
        sentences containing ``phrase`` (any case, as a substring), best first, and the ranking
        used: 'bm25' when asked for and it works here, else 'sentence order'."""
        escaped = phrase.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        args = {"pat": f"%{escaped}%", "mid": info.id, "cand": int(candidates), "model": info.name,
                "layer": int(layer), "q": phrase}
        contexts = _CONTEXTS_CITUS if self.citus() else _CONTEXTS
        if ranking == "bm25":
            try:
                return self._fetch(_SEARCH_SQL.format(order=_ORDERS["bm25"], contexts=contexts), args), "bm25"
            except psycopg.Error:
                pass  # the extension is there but cannot rank this: fall back to sentence order
        return (self._fetch(_SEARCH_SQL.format(order=_ORDERS["sentence order"], contexts=contexts), args),
                "sentence order")
