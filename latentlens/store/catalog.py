"""Models, their layers and vocabularies; corpora and their sentences."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

import numpy as np
import psycopg
from psycopg.types.json import Jsonb

from latentlens.db import one_row
from latentlens.errors import InputError, ModelMismatch, UnknownCorpus, UnknownModel
from latentlens.store.base import StoreBase
from latentlens.store.types import CorpusInfo, LayerInfo, ModelInfo, text_hash

# A model with its layers' numbers, row counts, versions and index kinds as arrays.
_MODEL_SELECT = """
SELECT m.id, m.name, m.hidden_size, m.num_layers, m.revision, m.architecture, m.dtype,
       m.tokenizer_class, m.bos_token_id, m.params,
       coalesce(array_agg(ml.layer ORDER BY ml.layer) FILTER (WHERE ml.layer IS NOT NULL), '{}'),
       coalesce(array_agg(ml.row_count ORDER BY ml.layer) FILTER (WHERE ml.layer IS NOT NULL), '{}'),
       coalesce(array_agg(ml.version ORDER BY ml.layer) FILTER (WHERE ml.layer IS NOT NULL), '{}'),
       coalesce(array_agg(ml.index_kind ORDER BY ml.layer) FILTER (WHERE ml.layer IS NOT NULL), '{}'),
       coalesce(array_agg(ml.index_params ORDER BY ml.layer) FILTER (WHERE ml.layer IS NOT NULL), '{}')
  FROM model m LEFT JOIN model_layer ml ON ml.model_id = m.id
"""


class CatalogMixin(StoreBase):
    """What is stored: models (and their partitions), vocabularies, corpora, sentences."""

    # ---- models ---------------------------------------------------------

    def register_model(
        self,
        name: str,
        *,
        hidden_size: int,
        num_layers: int,
        revision: str | None = None,
        architecture: str | None = None,
        dtype: str | None = None,
        tokenizer_class: str | None = None,
        bos_token_id: int | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> ModelInfo:
        """Register a model by name, or check an existing one has the same shape."""
        if num_layers < 1 or hidden_size < 1:
            raise InputError(f"a model needs at least one layer and a hidden size (got {num_layers}, {hidden_size})")
        if not name or len(name) > 512:
            raise InputError("a model name must have 1 to 512 characters")
        citus = self.citus()
        with self.transaction() as conn:
            self._citus_turn(conn, citus, "llens_register")
            if not (citus and _exists(conn, "SELECT 1 FROM model WHERE name = %s", (name,))):
                conn.execute(
                    """
                    INSERT INTO model (name, revision, architecture, hidden_size, num_layers,
                                       dtype, tokenizer_class, bos_token_id, params)
                    VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)
                    """ + _on_conflict_nothing(citus, "(name)"),
                    (name, revision, architecture, hidden_size, num_layers, dtype,
                     tokenizer_class, bos_token_id, Jsonb(dict(params or {}))),
                )
        info = self.get_model(name)
        if info.hidden_size != hidden_size or info.num_layers != num_layers:
            raise ModelMismatch(
                f"model '{name}' is registered with hidden size {info.hidden_size} and "
                f"{info.num_layers} layers, not {hidden_size} and {num_layers}: "
                "use another name or delete the old one"
            )
        return info

    def ensure_layers(self, model: ModelInfo | str, layers: Sequence[int]) -> ModelInfo:
        """Create the leaf partitions (and model_layer rows) of these layers."""
        info = self.get_model(model) if isinstance(model, str) else model
        info.check_layer_range(layers)
        with self.transaction() as conn:
            for layer in sorted(set(layers)):
                conn.execute("SELECT llens_ensure_layer(%s, %s)", (info.id, layer))
        return self.get_model(info.name)

    def set_vocabulary(self, model: ModelInfo | str, tokens: Sequence[str]) -> int:
        """Store the model's token texts (index = token id) once; return rows added."""
        info = self.get_model(model) if isinstance(model, str) else model
        with self.transaction() as conn:
            # concurrent ingests of one model: the second waits, then sees the rows
            conn.execute("SELECT pg_advisory_xact_lock(hashtext('llens_vocab'), %s)", (info.id,))
            have = one_row(conn.execute("SELECT count(*) FROM token WHERE model_id = %s", (info.id,)))[0]
            if have >= len(tokens):
                return 0
            if have:  # only the tokens an import without a tokenizer saw: add the rest
                return conn.execute(
                    "INSERT INTO token (model_id, token_id, token) SELECT %s, t.i - 1, t.s "
                    "FROM unnest(%s::text[]) WITH ORDINALITY AS t(s, i) ON CONFLICT DO NOTHING",
                    (info.id, [tok.replace("\x00", "") for tok in tokens]),
                ).rowcount
            with conn.cursor().copy("COPY token (model_id, token_id, token) FROM STDIN") as copy:
                for i, tok in enumerate(tokens):
                    copy.write_row((info.id, i, tok.replace("\x00", "")))
        return len(tokens)

    def get_model(self, name: str | ModelInfo) -> ModelInfo:
        if isinstance(name, ModelInfo):
            name = name.name
        rows = self._fetch(_MODEL_SELECT + " WHERE m.name = %s GROUP BY m.id", (name,))
        if not rows:
            self._unknown_model(name)
        return self._model_from_row(rows[0])

    def search_model(self, name: str | ModelInfo) -> tuple[ModelInfo, bool]:
        """get_model and ann_supported in one query: what every search reads first (its
        layers' row counts and versions decide the scan cache's validity; read fresh)."""
        if isinstance(name, ModelInfo):
            name = name.name
        rows = self._fetch("SELECT llens_ann_enabled(), m.* FROM ("
                           + _MODEL_SELECT + " WHERE m.name = %s GROUP BY m.id) AS m", (name,))
        if not rows:
            self._unknown_model(name)
        return self._model_from_row(rows[0][1:]), bool(rows[0][0])

    def _unknown_model(self, name: str) -> NoReturn:
        names = [m.name for m in self.list_models()]
        hint = ", ".join(f"'{n}'" for n in names[:10]) if names else "none yet; run `llens ingest`"
        raise UnknownModel(f"unknown model '{name}' (models in the store: {hint})")

    @staticmethod
    def _model_from_row(r: tuple) -> ModelInfo:
        layers = tuple(LayerInfo(int(a), int(b), int(c), d, e or {})
                       for a, b, c, d, e in zip(r[10], r[11], r[12], r[13], r[14]))
        return ModelInfo(
            id=r[0], name=r[1], hidden_size=r[2], num_layers=r[3], revision=r[4], architecture=r[5],
            dtype=r[6], tokenizer_class=r[7], bos_token_id=r[8], params=r[9] or {}, layers=layers,
        )

    def list_models(self) -> list[ModelInfo]:
        rows = self._fetch(_MODEL_SELECT + " GROUP BY m.id ORDER BY m.name")
        return [self._model_from_row(r) for r in rows]

    def model_corpora(self, model: ModelInfo | str) -> list[str]:
        """Names of the corpora ingested (fully or partly) into a model."""
        info = self.get_model(model)
        rows = self._fetch(
            "SELECT DISTINCT c.name FROM ingest_run r JOIN corpus c ON c.id = r.corpus_id "
            "WHERE r.model_id = %s ORDER BY 1",
            (info.id,),
        )
        return [r[0] for r in rows]

    def delete_model(self, name: str) -> None:
        """Drop a model's partitions (all layers) and every row that refers to it."""
        info = self.get_model(name)
        with self.transaction() as conn:
            conn.execute("SELECT llens_drop_model(%s)", (info.id,))

    # ---- corpora and sentences -----------------------------------------

    def register_corpus(
        self, name: str, *, content_hash: str, source: str | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> CorpusInfo:
        """Register a corpus once by name; the same name with other content is an error."""
        citus = self.citus()
        with self.transaction() as conn:
            self._citus_turn(conn, citus, "llens_register")
            if not (citus and _exists(conn, "SELECT 1 FROM corpus WHERE name = %s", (name,))):
                conn.execute(
                    "INSERT INTO corpus (name, source, content_hash, params) VALUES (%s, %s, %s, %s) "
                    + _on_conflict_nothing(citus, "(name)"),
                    (name, source, content_hash, Jsonb(dict(params or {}))),
                )
        info = self.get_corpus(name)
        if info.content_hash != content_hash:
            raise InputError(
                f"a different corpus is already registered as '{name}' "
                "(its content hash differs): give this one another name"
            )
        return info

    def find_corpus_by_hash(self, content_hash: str) -> CorpusInfo | None:
        rows = self._fetch(
            "SELECT id, name, content_hash, source, sentence_count FROM corpus WHERE content_hash = %s ORDER BY id LIMIT 1",
            (content_hash,),
        )
        return CorpusInfo(*rows[0]) if rows else None

    def get_corpus(self, name: str) -> CorpusInfo:
        rows = self._fetch(
            "SELECT id, name, content_hash, source, sentence_count FROM corpus WHERE name = %s", (name,)
        )
        if not rows:
            names = [c.name for c in self.list_corpora()]
            hint = ", ".join(f"'{n}'" for n in names[:10]) if names else "none yet"
            raise UnknownCorpus(f"unknown corpus '{name}' (corpora in the store: {hint})")
        return CorpusInfo(*rows[0])

    def list_corpora(self) -> list[CorpusInfo]:
        rows = self._fetch("SELECT id, name, content_hash, source, sentence_count FROM corpus ORDER BY name")
        return [CorpusInfo(*r) for r in rows]

    def delete_corpus(self, name: str) -> None:
        """Delete a corpus, its sentences, and every embedding row taken from them."""
        info = self.get_corpus(name)
        with self.transaction() as conn:
            conn.execute(
                """
                WITH gone AS (
                    DELETE FROM token_embedding e USING sentence s
                     WHERE s.id = e.sentence_id AND s.corpus_id = %(c)s
                    RETURNING e.model_id, e.layer, e.sentence_id, e.position, e.token_id),
                layers AS (
                    UPDATE model_layer ml SET row_count = ml.row_count - g.n, version = ml.version + 1
                      FROM (SELECT model_id, layer, count(*) AS n FROM gone GROUP BY 1, 2) g
                     WHERE ml.model_id = g.model_id AND ml.layer = g.layer)
                -- give the contexts back to the per-token quota (one context counts once,
                -- whatever the number of layers it was stored at)
                UPDATE token_quota q SET used = greatest(q.used - g.n, 0)
                  FROM (SELECT model_id, token_id, count(DISTINCT (sentence_id, position)) AS n
                          FROM gone GROUP BY 1, 2) g
                 WHERE q.model_id = g.model_id AND q.token_id = g.token_id
                """,
                {"c": info.id},
            )
            conn.execute("DELETE FROM corpus WHERE id = %s", (info.id,))

    def add_sentences(
        self, corpus: CorpusInfo | str, texts: Sequence[str], ordinals: Sequence[int] | None = None
    ) -> np.ndarray:
        """Insert sentences (exact duplicates stored once); return their ids, aligned to ``texts``."""
        info = self.get_corpus(corpus) if isinstance(corpus, str) else corpus
        if ordinals is None:
            ordinals = range(len(texts))
        hashes = [text_hash(t) for t in texts]
        citus = self.citus()
        with self.transaction() as conn:
            # two shards of one ingest insert the same sentences at once
            self._citus_turn(conn, citus, "llens_sentences", info.id)
            conn.execute(
                "CREATE TEMP TABLE IF NOT EXISTS _llens_new_sentence "
                "(ordinal integer, text text, text_hash bytea) ON COMMIT DELETE ROWS"
            )
            with conn.cursor().copy("COPY _llens_new_sentence (ordinal, text, text_hash) FROM STDIN") as copy:
                for o, t, h in zip(ordinals, texts, hashes):
                    copy.write_row((o, t, h))
            # on Citus no ON CONFLICT (see _on_conflict_nothing): under the turn taken above,
            # what is stored already is left out instead
            have = [bytes(r[0]) for r in conn.execute(
                "SELECT text_hash FROM sentence WHERE corpus_id = %s AND text_hash = ANY(%s::bytea[])",
                (info.id, hashes)).fetchall()] if citus else []
            added = conn.execute(
                """
                INSERT INTO sentence (corpus_id, ordinal, text, text_hash)
                SELECT %(c)s, ordinal, text, text_hash FROM (
                    SELECT DISTINCT ON (text_hash) ordinal, text, text_hash
                      FROM _llens_new_sentence ORDER BY text_hash, ordinal) first
                 WHERE first.text_hash <> ALL(%(have)s::bytea[])
                 ORDER BY ordinal  -- ids follow corpus order
                """ + _on_conflict_nothing(citus, "(corpus_id, text_hash)"),
                {"c": info.id, "have": have},
            )
            rows = conn.execute(
                """
                SELECT n.text_hash, s.id FROM (SELECT DISTINCT text_hash FROM _llens_new_sentence) n
                  JOIN sentence s ON s.corpus_id = %(c)s AND s.text_hash = n.text_hash
                """,
                {"c": info.id},
            ).fetchall()
            # counted by what this chunk added (recounting the corpus per chunk is quadratic),
            # through an owner-run function: a writer cannot UPDATE corpus, only add to its count
            if not citus:
                conn.execute("SELECT llens_add_sentences(%s, %s)", (info.id, added.rowcount))
        if citus and added.rowcount:
            # On Citus the owner-run UPDATE of corpus goes out on the owner's connections, and
            # in the transaction that inserted sentences (which lock corpus' shards through
            # their foreign key on the writer's connections) Citus sees a distributed deadlock:
            # the count follows in its own transaction (a crash in between leaves it short)
            with self.transaction() as conn:
                conn.execute("SELECT llens_add_sentences(%s, %s)", (info.id, added.rowcount))
        by_hash = {bytes(h): i for h, i in rows}
        return np.array([by_hash[h] for h in hashes], dtype=np.int64)

    def sentences(self, ids: Sequence[int]) -> dict[int, str]:
        rows = self._fetch("SELECT id, text FROM sentence WHERE id = ANY(%s)", (list(map(int, ids)),))
        return dict(rows)


def _exists(conn: psycopg.Connection, query: str, params: tuple) -> bool:
    return conn.execute(query, params).fetchone() is not None


def _on_conflict_nothing(citus: bool, target: str) -> str:
    """``ON CONFLICT target DO NOTHING`` on one server. On Citus nothing: it takes an
    ExclusiveLock on a reference table's shards for ON CONFLICT, granted only to roles
    that may UPDATE it (writers may not, migration 0006); there the caller has checked,
    under a turn (_citus_turn), that the row is missing."""
    return "" if citus else f"ON CONFLICT {target} DO NOTHING"
