"""The schema stays Citus-ready: the rules Citus enforces, read from the catalog.

latentlens runs on one PostgreSQL. Past one machine the plan is Citus (distributed
PostgreSQL, with pgvector); docs/scaling.md explains it. No Citus runs here: these tests
read the catalog of a freshly migrated database (plus one leaf made by
``llens_ensure_layer``) and check that ``create_reference_table`` and
``create_distributed_table`` would accept it as planned, so a lab can distribute it
unchanged.

The plan (why: docs/scaling.md):

* distributed (hash): ``token_embedding`` by ``sentence_id``. It is partitioned at one
  level, RANGE (model_id, layer), a leaf per (model, layer); Citus distributes every leaf
  with its parent, co-located, so each shard of a leaf gets its own HNSW index.
* reference (a copy on every node): ``model``, ``model_layer``, ``token``, ``token_quota``,
  ``corpus``, ``sentence``.
* local, on the coordinator: ``llens_meta``, ``alembic_version``, ``ingest_run`` (its
  foreign keys to model and corpus make Citus turn it into a "Citus local table"),
  ``eval_run``, ``eval_item``, ``eval_verdict``, ``analysis``, ``atlas_run`` (a Citus local
  table too, by its foreign key to atlas).
* the atlas: ``atlas_token``, ``atlas_patch``, ``atlas_neighbour`` distributed by ``image_id``
  with token_embedding (by ``atlas_id`` in the alternative); ``atlas``, ``atlas_layer``,
  ``atlas_image`` reference tables.

The alternative (``token_embedding``, ``token``, ``token_quota`` and ``model_layer``
distributed by ``model_id``, co-located; ``model``, ``corpus``, ``sentence`` reference) is
checked as well, so the schema keeps both open.

The rules, each failure naming the table, constraint or function:

1. every table is in the plan, once;
2. distributed tables: the distribution column exists, is NOT NULL and hashable, has one
   type across the co-location group, and every PRIMARY KEY, UNIQUE, EXCLUDE constraint and
   unique index of the table and of each of its partitions includes it;
3. a distributed table is partitioned at one level at most (Citus refuses multi-level
   partitioning); a reference table is not partitioned;
4. foreign keys: none from a reference to a distributed table, none between distributed and
   local tables (either way), distributed to distributed only inside the co-location group
   on the distribution column at the same position, no SET NULL / SET DEFAULT on delete or
   SET NULL / SET DEFAULT / CASCADE on update through a distribution column, reference to
   local only NO ACTION / RESTRICT;
5. no row-level security policy with a subquery on any table Citus will manage (distributed,
   reference, and local tables that foreign keys tie to a reference table, which Citus
   converts to Citus local tables), and no user triggers on distributed or reference tables;
6. no identity column or sequence default on a distributed table (its ids come from the
   coordinator-side tables), and no sequence shared by two columns;
7. every ``llens_*`` function is classified: "coordinator" (runs on the coordinator only: DDL,
   GUCs, or distributed queries inside; never used by a view, default, constraint, index,
   policy or trigger, where a worker could evaluate it) or "pushdown" (may be evaluated
   inside a query over distributed tables: IMMUTABLE or STABLE, not SECURITY DEFINER);
8. a view that reads a distributed table reads only co-located distributed tables and
   reference tables.

What these tests cannot verify (a real cluster: shard placement, the distributed planner,
DDL propagation from llens' functions) is listed in docs/scaling.md.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

import psycopg
import pytest

# ---------------------------------------------------------------------------
# the plan (mirrored in docs/scaling.md)

LOCAL = frozenset({
    "llens_meta", "alembic_version", "ingest_run", "eval_run", "eval_item", "eval_verdict", "analysis",
    "atlas_run", "llens_function_access",
})
# the atlas (revision 0010): its catalog as reference tables, its rows distributed
ATLAS_REFERENCE = frozenset({"atlas", "atlas_layer", "atlas_image"})

# Functions that run on the coordinator only. llens_knn and llens_neighbors run their
# k-NN query on the coordinator, which Citus fans out to the leaf's shards (ORDER BY
# distance LIMIT k per shard, merged on the coordinator); the others run DDL that Citus
# propagates, read coordinator settings, or manage roles.
COORDINATOR_FUNCTIONS = frozenset({
    "llens_ensure_layer", "llens_build_index", "llens_drop_index", "llens_analyze", "llens_drop_model",
    "llens_knn", "llens_neighbors", "llens_ann_enabled",
    "llens_team_role", "llens_setup_team_roles", "llens_secure_functions", "llens_writer_grants",
    "llens_add_rows", "llens_take_quota", "llens_add_sentences", "llens_count_quota",
    "llens_atlas_ensure_layer", "llens_atlas_build_index", "llens_atlas_drop", "llens_atlas_knn",
    "llens_atlas_nearest", "llens_atlas_find", "llens_atlas_add_rows",
    # revision 0009: is this a Citus coordinator, is a table Citus', run the distribution
    "llens_citus", "llens_distributed", "llens_distribute",
})
# Functions a query over distributed tables may evaluate (on a worker, too): pure
# naming helpers, the model-name lookup (reads the reference table model), and
# llens_contexts (inlined SQL over token_context: the distributed table joined to
# reference tables, which Citus pushes down).
PUSHDOWN_FUNCTIONS = frozenset({"llens_leaf_name", "llens_model_id", "llens_contexts", "llens_atlas_leaf_name",
                                "llens_atlas_id"})


@dataclass(frozen=True)
class Plan:
    name: str
    distributed: dict[str, str]  # table -> distribution column; one co-location group
    reference: frozenset[str]
    local: frozenset[str]
    coordinator_functions: frozenset[str] = COORDINATOR_FUNCTIONS
    pushdown_functions: frozenset[str] = PUSHDOWN_FUNCTIONS

    def kind(self, table: str) -> str | None:
        if table in self.distributed:
            return "distributed"
        if table in self.reference:
            return "reference"
        if table in self.local:
            return "local"
        return None


PLANS = {
    # chosen: a model's leaves spread over every worker; queries fan out per shard
    "by_sentence_id": Plan(
        "by_sentence_id",
        distributed={"token_embedding": "sentence_id", "atlas_token": "image_id", "atlas_patch": "image_id",
                     "atlas_neighbour": "image_id"},
        reference=frozenset({"model", "model_layer", "token", "token_quota", "corpus", "sentence"})
        | ATLAS_REFERENCE,
        local=LOCAL,
    ),
    # alternative: each model on one worker, its vocabulary and quotas beside it
    "by_model_id": Plan(
        "by_model_id",
        distributed={"token_embedding": "model_id", "token": "model_id", "token_quota": "model_id",
                     "model_layer": "model_id", "atlas_token": "atlas_id", "atlas_patch": "atlas_id",
                     "atlas_neighbour": "atlas_id"},
        reference=frozenset({"model", "corpus", "sentence"}) | ATLAS_REFERENCE,
        local=LOCAL,
    ),
}

# ---------------------------------------------------------------------------
# a snapshot of the catalog


@dataclass
class Column:
    type: str
    not_null: bool
    hashable: bool
    identity: bool


@dataclass
class Table:
    name: str
    partitioned: bool
    columns: dict[str, Column]
    # (relation, constraint or index name, key columns; None for an expression)
    unique_keys: list[tuple[str, str, list[str | None]]]
    # (partition, is itself partitioned, depth below this table)
    partitions: list[tuple[str, bool, int]]
    triggers: list[str]
    policies: list[tuple[str, str]]  # (name, USING and WITH CHECK expressions)


@dataclass
class ForeignKey:
    name: str
    table: str
    columns: list[str]
    ref_table: str
    ref_columns: list[str]
    on_delete: str  # pg_constraint.confdeltype
    on_update: str


@dataclass
class Function:
    name: str
    signature: str
    volatility: str  # i, s, v
    security_definer: bool
    used_by: list[str]


@dataclass
class Catalog:
    tables: dict[str, Table] = field(default_factory=dict)
    fks: list[ForeignKey] = field(default_factory=list)
    functions: list[Function] = field(default_factory=list)
    views: dict[str, set[str]] = field(default_factory=dict)
    sequences: dict[str, list[str]] = field(default_factory=dict)  # sequence -> ["table.column"]


ACTIONS = {"a": "NO ACTION", "r": "RESTRICT", "c": "CASCADE", "n": "SET NULL", "d": "SET DEFAULT"}


def snapshot(conn: psycopg.Connection, schema: str) -> Catalog:
    """Read what the rules need from the catalog of one schema."""
    cat = Catalog()
    q = conn.execute
    tables = q(
        "SELECT c.oid, c.relname, c.relkind = 'p' FROM pg_class c "
        "WHERE c.relnamespace = %s::regnamespace AND c.relkind IN ('r', 'p') AND NOT c.relispartition "
        "ORDER BY c.relname", (schema,)).fetchall()
    for oid, name, partitioned in tables:
        columns = {
            att: Column(typ, notnull, hashable, ident != "")
            for att, typ, notnull, hashable, ident in q(
                "SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull, "
                "       EXISTS (SELECT 1 FROM pg_opclass o JOIN pg_am am ON am.oid = o.opcmethod "
                "                WHERE am.amname = 'hash' AND o.opcdefault AND o.opcintype = a.atttypid), "
                "       a.attidentity::text "
                "FROM pg_attribute a WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped",
                (oid,))
        }
        partitions = q(
            "WITH RECURSIVE tree(relid, depth) AS ("
            "  SELECT inhrelid, 1 FROM pg_inherits WHERE inhparent = %s"
            "  UNION ALL SELECT i.inhrelid, t.depth + 1 FROM pg_inherits i JOIN tree t ON i.inhparent = t.relid) "
            "SELECT c.relname, c.relkind = 'p', t.depth, c.oid FROM tree t JOIN pg_class c ON c.oid = t.relid "
            "ORDER BY t.depth, c.relname", (oid,)).fetchall()
        rels = [oid] + [p[3] for p in partitions]
        unique_keys = [
            (rel, name_, list(cols))
            for rel, name_, cols in q(
                "SELECT c.relname, coalesce(con.conname, ic.relname), "
                "       array(SELECT a.attname FROM unnest(i.indkey::int2[]) WITH ORDINALITY k(attnum, n) "
                "             LEFT JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum "
                "             WHERE k.n <= i.indnkeyatts ORDER BY k.n) "
                "FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid JOIN pg_class ic ON ic.oid = i.indexrelid "
                "LEFT JOIN pg_constraint con ON con.conindid = i.indexrelid AND con.conrelid = i.indrelid "
                "                          AND con.contype IN ('p', 'u', 'x') "
                "WHERE i.indrelid = ANY(%s) AND (i.indisunique OR con.contype = 'x') "
                "ORDER BY 1, 2", (rels,))
        ]
        triggers = [r[0] for r in q(
            "SELECT tgname FROM pg_trigger WHERE tgrelid = ANY(%s) AND NOT tgisinternal ORDER BY 1", (rels,))]
        policies = q(
            "SELECT polname, concat_ws(' / ', pg_get_expr(polqual, polrelid), pg_get_expr(polwithcheck, polrelid)) "
            "FROM pg_policy WHERE polrelid = %s ORDER BY 1", (oid,)).fetchall()
        cat.tables[name] = Table(name, partitioned, columns, unique_keys,
                                 [(p[0], p[1], p[2]) for p in partitions], triggers, policies)

    for row in q(
        "SELECT con.conname, c.relname, f.relname, "
        "       array(SELECT a.attname FROM unnest(con.conkey) WITH ORDINALITY k(attnum, n) "
        "             JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.attnum ORDER BY k.n), "
        "       array(SELECT a.attname FROM unnest(con.confkey) WITH ORDINALITY k(attnum, n) "
        "             JOIN pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k.attnum ORDER BY k.n), "
        "       con.confdeltype::text, con.confupdtype::text "
        "FROM pg_constraint con JOIN pg_class c ON c.oid = con.conrelid JOIN pg_class f ON f.oid = con.confrelid "
        "WHERE con.contype = 'f' AND con.conparentid = 0 AND NOT c.relispartition "
        "  AND c.relnamespace = %s::regnamespace ORDER BY 2, 1", (schema,)):
        cat.fks.append(ForeignKey(row[0], row[1], list(row[3]), row[2], list(row[4]), row[5], row[6]))

    for oid, name, sig, vol, secdef in q(
        "SELECT p.oid, p.proname, pg_get_function_identity_arguments(p.oid), p.provolatile::text, p.prosecdef "
        "FROM pg_proc p WHERE p.pronamespace = %s::regnamespace AND p.proname LIKE 'llens\\_%%' "
        "ORDER BY 2, 3", (schema,)):
        used_by = [r[0] for r in q(
            "SELECT pg_describe_object(d.classid, d.objid, d.objsubid) FROM pg_depend d "
            "WHERE d.refclassid = 'pg_proc'::regclass AND d.refobjid = %s AND d.deptype = 'n' "
            "  AND d.classid IN ('pg_rewrite'::regclass, 'pg_attrdef'::regclass, 'pg_constraint'::regclass, "
            "                    'pg_policy'::regclass, 'pg_class'::regclass, 'pg_trigger'::regclass) "
            "ORDER BY 1", (oid,))]
        cat.functions.append(Function(name, f"{name}({sig})", vol, secdef, used_by))

    for view, table in q(
        "SELECT DISTINCT v.relname, t.relname FROM pg_class v JOIN pg_rewrite r ON r.ev_class = v.oid "
        "JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = r.oid "
        "                AND d.refclassid = 'pg_class'::regclass "
        "JOIN pg_class t ON t.oid = d.refobjid "
        "WHERE v.relnamespace = %s::regnamespace AND v.relkind IN ('v', 'm') AND t.oid <> v.oid "
        "  AND t.relkind IN ('r', 'p') ORDER BY 1, 2", (schema,)):
        cat.views.setdefault(view, set()).add(table)

    # which columns draw from each sequence: identity and serial ownership, and nextval defaults
    for seq, table, column in q(
        "SELECT s.relname, c.relname, a.attname FROM pg_class s "
        "JOIN pg_depend d ON d.classid = 'pg_class'::regclass AND d.objid = s.oid "
        "                AND d.refclassid = 'pg_class'::regclass AND d.refobjsubid > 0 AND d.deptype IN ('a', 'i') "
        "JOIN pg_class c ON c.oid = d.refobjid JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = d.refobjsubid "
        "WHERE s.relkind = 'S' AND s.relnamespace = %(s)s::regnamespace AND NOT c.relispartition "
        "UNION "
        "SELECT s.relname, c.relname, a.attname FROM pg_attrdef ad "
        "JOIN pg_depend d ON d.classid = 'pg_attrdef'::regclass AND d.objid = ad.oid "
        "                AND d.refclassid = 'pg_class'::regclass "
        "JOIN pg_class s ON s.oid = d.refobjid AND s.relkind = 'S' "
        "JOIN pg_class c ON c.oid = ad.adrelid JOIN pg_attribute a ON a.attrelid = ad.adrelid AND a.attnum = ad.adnum "
        "WHERE c.relnamespace = %(s)s::regnamespace AND NOT c.relispartition ORDER BY 1, 2, 3", {"s": schema}):
        cat.sequences.setdefault(seq, []).append(f"{table}.{column}")
    return cat


# ---------------------------------------------------------------------------
# the rules: each returns the violations it finds, one line each


def check_tables_planned(plan: Plan, cat: Catalog) -> list[str]:
    out = []
    for name in cat.tables:
        classes = [k for k, s in (("distributed", plan.distributed), ("reference", plan.reference),
                                  ("local", plan.local)) if name in s]
        if not classes:
            out.append(f"table {name} is not in the Citus plan: add it to PLANS in tests/test_citus_ready.py "
                       "and to docs/scaling.md as distributed, reference or local")
        elif len(classes) > 1:
            out.append(f"table {name} is planned as {' and '.join(classes)}")
    for name in sorted(set(plan.distributed) | plan.reference | plan.local):
        if name not in cat.tables:
            out.append(f"the plan names table {name}, which the schema does not have")
    return out


def check_distribution_keys(plan: Plan, cat: Catalog) -> list[str]:
    out = []
    types = {}
    for name, col in plan.distributed.items():
        t = cat.tables.get(name)
        if t is None:
            continue
        c = t.columns.get(col)
        if c is None:
            out.append(f"{name}: distribution column {col} does not exist")
            continue
        types[name] = c.type
        if not c.not_null:
            out.append(f"{name}.{col}: a distribution column must be NOT NULL")
        if not c.hashable:
            out.append(f"{name}.{col}: type {c.type} has no default hash operator class")
        for rel, key, cols in t.unique_keys:
            if col not in cols:
                shown = ", ".join(c_ or "<expression>" for c_ in cols)
                out.append(f"{name} (distributed by {col}): {key} on {rel} ({shown}) does not include {col}; "
                           "Citus enforces only uniqueness that includes the distribution column")
    if len(set(types.values())) > 1:
        out.append("distribution columns of one co-location group differ in type: "
                   + ", ".join(f"{t}.{plan.distributed[t]} {ty}" for t, ty in sorted(types.items())))
    return out


def check_partitioning(plan: Plan, cat: Catalog) -> list[str]:
    out = []
    for name, t in cat.tables.items():
        kind = plan.kind(name)
        if kind == "distributed":
            for part, partitioned, depth in t.partitions:
                if partitioned:
                    out.append(f"{name}: partition {part} is partitioned itself; Citus distributes "
                               "single-level partitioned tables only ('distributing multi-level "
                               "partitioned tables is not supported')")
                elif depth > 1:
                    out.append(f"{name}: partition {part} is {depth} levels down; Citus distributes "
                               "single-level partitioned tables only")
        elif kind == "reference" and t.partitioned:
            out.append(f"{name}: a reference table cannot be partitioned")
    return out


def citus_local_tables(plan: Plan, cat: Catalog) -> set[str]:
    """Local tables that foreign keys tie, directly or through other local tables, to a
    reference table: Citus converts them to Citus local tables (coordinator-only shards)."""
    adj = defaultdict(set)
    for fk in cat.fks:
        kinds = {plan.kind(fk.table), plan.kind(fk.ref_table)}
        if kinds <= {"local", "reference"}:
            adj[fk.table].add(fk.ref_table)
            adj[fk.ref_table].add(fk.table)
    seen: set[str] = set()
    todo = [t for t in cat.tables if plan.kind(t) == "reference"]
    while todo:
        t = todo.pop()
        if t in seen:
            continue
        seen.add(t)
        todo.extend(adj[t] - seen)
    return {t for t in seen if plan.kind(t) == "local"}


def check_foreign_keys(plan: Plan, cat: Catalog) -> list[str]:
    out = []
    for fk in cat.fks:
        src, dst = plan.kind(fk.table), plan.kind(fk.ref_table)
        if src is None or dst is None:
            continue  # reported by check_tables_planned
        what = (f"foreign key {fk.name} {fk.table}({', '.join(fk.columns)}) -> "
                f"{fk.ref_table}({', '.join(fk.ref_columns)})")
        if src == "reference" and dst == "distributed":
            out.append(f"{what}: a reference table cannot reference a distributed table")
        elif src == "distributed" and dst == "local":
            out.append(f"{what}: a distributed table cannot reference a local table")
        elif src == "local" and dst == "distributed":
            out.append(f"{what}: a local table cannot reference a distributed table")
        elif src == "reference" and dst == "local" and (fk.on_delete not in "ar" or fk.on_update not in "ar"):
            out.append(f"{what}: from a reference to a local table only NO ACTION / RESTRICT is supported, "
                       f"not ON DELETE {ACTIONS[fk.on_delete]} ON UPDATE {ACTIONS[fk.on_update]}")
        if src == "distributed" and dst in ("distributed", "reference"):
            col = plan.distributed[fk.table]
            if dst == "distributed":
                ref_col = plan.distributed[fk.ref_table]
                if col not in fk.columns or ref_col not in fk.ref_columns or \
                        fk.columns.index(col) != fk.ref_columns.index(ref_col):
                    out.append(f"{what}: between distributed tables a foreign key must pair the distribution "
                               f"columns ({fk.table}.{col}, {fk.ref_table}.{ref_col}) at the same position")
            if col in fk.columns:
                if fk.on_delete in "nd":
                    out.append(f"{what}: ON DELETE {ACTIONS[fk.on_delete]} would change the distribution "
                               f"column {col}")
                if fk.on_update in "ndc":
                    out.append(f"{what}: ON UPDATE {ACTIONS[fk.on_update]} would change the distribution "
                               f"column {col}")
    return out


def check_policies_and_triggers(plan: Plan, cat: Catalog) -> list[str]:
    out = []
    citus_local = citus_local_tables(plan, cat)
    for name, t in cat.tables.items():
        kind = plan.kind(name)
        if kind is None:
            continue
        managed = kind in ("distributed", "reference") or name in citus_local
        if not managed:
            continue
        label = kind if kind != "local" else "local, but tied to a reference table by foreign keys (a Citus local table)"
        for pol, expr in t.policies:
            expr = " ".join(expr.split())
            if re.search(r"\bselect\b", expr, re.IGNORECASE):
                out.append(f"{name} ({label}): policy {pol} uses a subquery; Citus refuses subqueries in "
                           f"policies of the tables it manages: {expr}")
        if kind in ("distributed", "reference") and t.triggers:
            out.append(f"{name} ({kind}): triggers {', '.join(t.triggers)}; Citus refuses to distribute tables "
                       "with triggers")
    return out


def check_sequences(plan: Plan, cat: Catalog) -> list[str]:
    out = []
    for name in plan.distributed:
        t = cat.tables.get(name)
        if t is None:
            continue
        for col, c in t.columns.items():
            if c.identity:
                out.append(f"{name}.{col} (distributed): identity column; a distributed table takes its ids "
                           "from coordinator-side tables")
    for seq, cols in cat.sequences.items():
        if len(cols) > 1:
            out.append(f"sequence {seq} is shared by {', '.join(cols)}")
        for tc in cols:
            if tc.split(".")[0] in plan.distributed:
                out.append(f"{tc} (distributed) draws from sequence {seq}")
    return out


def check_functions(plan: Plan, cat: Catalog) -> list[str]:
    out = []
    for f in cat.functions:
        if f.name in plan.coordinator_functions:
            if f.used_by:
                out.append(f"{f.signature} runs on the coordinator only but is used by "
                           f"{'; '.join(f.used_by)}, which a worker may evaluate")
        elif f.name in plan.pushdown_functions:
            if f.volatility == "v":
                out.append(f"{f.signature} may be evaluated inside distributed queries but is VOLATILE")
            if f.security_definer:
                out.append(f"{f.signature} may be evaluated inside distributed queries but is SECURITY DEFINER")
        else:
            out.append(f"{f.signature} is not classified: add it to COORDINATOR_FUNCTIONS or PUSHDOWN_FUNCTIONS "
                       "in tests/test_citus_ready.py and to docs/scaling.md")
    return out


def check_views(plan: Plan, cat: Catalog) -> list[str]:
    out = []
    for view, tables in cat.views.items():
        kinds = {t: plan.kind(t) for t in tables}
        if "distributed" in kinds.values():
            bad = sorted(t for t, k in kinds.items() if k not in ("distributed", "reference"))
            if bad:
                out.append(f"view {view} joins distributed tables with {', '.join(bad)} "
                           "(neither co-located distributed nor reference)")
    return out


RULES = [check_tables_planned, check_distribution_keys, check_partitioning, check_foreign_keys,
         check_policies_and_triggers, check_sequences, check_functions, check_views]


# ---------------------------------------------------------------------------
# the schema as migrated


@pytest.fixture(scope="module")
def catalog(db_url) -> Catalog:
    with psycopg.connect(db_url, autocommit=True) as conn:
        # one leaf, as ingest makes it, so that partitions and their keys are checked too
        mid = conn.execute(
            "INSERT INTO model (name, hidden_size, num_layers) VALUES ('citus-probe', 8, 4) RETURNING id"
        ).fetchone()[0]
        conn.execute("SELECT llens_ensure_layer(%s, 2)", (mid,))
        schema = conn.execute("SELECT current_schema()").fetchone()[0]
        return snapshot(conn, schema)


@pytest.mark.parametrize("plan", PLANS.values(), ids=PLANS.keys())
@pytest.mark.parametrize("rule", RULES, ids=[r.__name__.removeprefix("check_") for r in RULES])
def test_schema_obeys_citus_rules(catalog, plan, rule):
    violations = rule(plan, catalog)
    assert not violations, f"plan {plan.name}:\n  " + "\n  ".join(violations)


def test_the_probe_made_a_leaf(catalog):
    # the partition rules saw a real leaf, not an empty parent
    parts = catalog.tables["token_embedding"].partitions
    assert any(p[0].startswith("token_embedding_m") and p[0].endswith("_l2") for p in parts), parts


def test_function_classes_are_disjoint():
    assert not (COORDINATOR_FUNCTIONS & PUSHDOWN_FUNCTIONS)


def test_citus_local_tables_are_what_the_docs_say(catalog):
    # ingest_run references model and corpus; the evaluation tables and analyses are
    # tied to nothing Citus manages, so they stay plain PostgreSQL tables with their policies
    # (atlas_run likewise references atlas)
    assert citus_local_tables(PLANS["by_sentence_id"], catalog) == {"ingest_run", "atlas_run"}
    assert citus_local_tables(PLANS["by_model_id"], catalog) == {"ingest_run", "atlas_run"}


# ---------------------------------------------------------------------------
# the rules find what they should (a schema built to break each one)

BAD_SCHEMA = """
CREATE TABLE r (id int PRIMARY KEY, d_k bigint);
CREATE TABLE l (id int PRIMARY KEY);
CREATE TABLE d (
    k    bigint PRIMARY KEY,
    u    int UNIQUE,
    r_id int REFERENCES r ON DELETE SET NULL,
    l_id int REFERENCES l,
    n    bigint GENERATED BY DEFAULT AS IDENTITY
);
ALTER TABLE r ADD CONSTRAINT r_d_fkey FOREIGN KEY (d_k) REFERENCES d (k);
CREATE TABLE d2 (k int NOT NULL, x bigint NOT NULL, PRIMARY KEY (k, x),
                 CONSTRAINT d2_d_fkey FOREIGN KEY (x) REFERENCES d (k) ON DELETE SET NULL);
CREATE TABLE p (k bigint NOT NULL, a int NOT NULL, b int NOT NULL, PRIMARY KEY (k, a, b)) PARTITION BY LIST (a);
CREATE TABLE p_1 PARTITION OF p FOR VALUES IN (1) PARTITION BY LIST (b);
CREATE TABLE p_1_1 PARTITION OF p_1 FOR VALUES IN (1);
CREATE TABLE lp (id int, r_id int REFERENCES r);
ALTER TABLE lp ENABLE ROW LEVEL SECURITY;
CREATE POLICY via_l ON lp USING (EXISTS (SELECT 1 FROM l WHERE l.id = lp.id));
CREATE SEQUENCE shared;
CREATE TABLE l2 (a bigint DEFAULT nextval('shared'), b bigint DEFAULT nextval('shared'));
CREATE TABLE stray (x int);
CREATE FUNCTION llens_probe_unclassified() RETURNS int LANGUAGE sql AS 'SELECT 1';
CREATE FUNCTION llens_probe_volatile() RETURNS int LANGUAGE sql VOLATILE AS 'SELECT 1';
CREATE FUNCTION llens_probe_coordinator(int) RETURNS int LANGUAGE sql IMMUTABLE AS 'SELECT $1';
CREATE TABLE r2 (v int CHECK (llens_probe_coordinator(v) > 0));
CREATE VIEW dl AS SELECT d.k, l.id FROM d JOIN l ON l.id = d.l_id;
"""


def test_rules_catch_violations(db_url):
    plan = Plan(
        "bad",
        distributed={"d": "k", "d2": "k", "p": "k"},
        reference=frozenset({"r", "r2"}),
        local=frozenset({"l", "lp", "l2", "ghost"}),
        coordinator_functions=frozenset({"llens_probe_coordinator"}),
        pushdown_functions=frozenset({"llens_probe_volatile"}),
    )
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("DROP SCHEMA IF EXISTS citus_probe_bad CASCADE; CREATE SCHEMA citus_probe_bad")
        try:
            conn.execute("SET search_path = citus_probe_bad")
            conn.execute(BAD_SCHEMA)
            cat = snapshot(conn, "citus_probe_bad")
        finally:
            conn.execute("RESET search_path")
            conn.execute("DROP SCHEMA citus_probe_bad CASCADE")
    found = "\n".join(v for rule in RULES for v in rule(plan, cat))
    expected = [
        "table stray is not in the Citus plan",
        "the plan names table ghost",
        "d (distributed by k): d_u_key on d (u) does not include k",
        "distribution columns of one co-location group differ in type",
        "p: partition p_1 is partitioned itself",
        "foreign key r_d_fkey r(d_k) -> d(k): a reference table cannot reference a distributed table",
        "foreign key d_l_id_fkey d(l_id) -> l(id): a distributed table cannot reference a local table",
        "foreign key d2_d_fkey d2(x) -> d(k): between distributed tables a foreign key must pair",
        "lp (local, but tied to a reference table by foreign keys (a Citus local table)): policy via_l uses a subquery",
        "d.n (distributed): identity column",
        "sequence shared is shared by l2.a, l2.b",
        "llens_probe_unclassified() is not classified",
        "llens_probe_volatile() may be evaluated inside distributed queries but is VOLATILE",
        "llens_probe_coordinator(integer) runs on the coordinator only but is used by constraint",
        "view dl joins distributed tables with l",
    ]
    for e in expected:
        assert e in found, f"expected a violation containing {e!r}; found:\n{found}"
    # allowed, and so not reported: a distributed table referencing a reference table with
    # SET NULL on a column that is not the distribution column
    assert "d_r_id_fkey" not in found
