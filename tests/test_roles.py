"""Team roles: `llens db grant-reader | grant-writer | revoke | users`, enforced by PostgreSQL.

The embedded server acts as a team server here: LLENS_DATABASE_URL points at a
fresh migrated database as the server's superuser (the owner), the tests create
reader and writer login roles through the CLI and then connect *as* them, with
their passwords: the embedded server trusts its owner only and checks every other
role's password (SCRAM), so a wrong one is refused.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import uuid
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg
import pytest
from click.testing import CliRunner
from latentlens.cli.main import cli
from psycopg import sql

from latentlens.errors import PermissionDenied
from latentlens.store import Store
from tests._query_data import fill

TAG = uuid.uuid4().hex[:6]
READER, WRITER, WRITER2 = f"ana_{TAG}", f"bo_{TAG}", f"cy_{TAG}"
PASSWORDS = {READER: "r-secret-1 'x\"", WRITER: "w-secret-2;--", WRITER2: "w-secret-3 ünï"}
HOSTILE_USERS = [
    f"o'brien\"; DROP TABLE model; --{TAG}",
    f"Ünïcødé 用户 {TAG}",
    f'"{TAG}"',
    f"a;b {TAG}",
    "x" * 57 + TAG,  # 63 bytes: the longest name PostgreSQL keeps
]
HOSTILE_MODELS = [
    "x'); DROP TABLE model; --",
    'модель "q" ; 模型 \\ %s',
    "m" * 500,
]


@pytest.fixture(scope="module")
def runner():
    return CliRunner()


def url_as(db_url: str, name: str, password: str | None = None) -> str:
    parts = urlsplit(db_url)
    host = parts.netloc.rpartition("@")[2]
    auth = quote(name, safe="") + (":" + quote(password, safe="") if password else "")
    return urlunsplit(parts._replace(netloc=f"{auth}@{host}"))


def connect_as(db_url: str, name: str) -> psycopg.Connection:
    return psycopg.connect(url_as(db_url, name, PASSWORDS.get(name)), autocommit=True)


def scram_matches(verifier: str, password: str) -> bool:
    """Whether a SCRAM-SHA-256 verifier from pg_authid is the one for PASSWORD (ASCII-safe SASLprep)."""
    method, rest = verifier.split("$", 1)
    iters_salt, keys = rest.split("$")
    iterations, salt = iters_salt.split(":")
    stored_key, server_key = keys.split(":")
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(salt), int(iterations))
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    return (method == "SCRAM-SHA-256"
            and base64.b64encode(hashlib.sha256(client_key).digest()).decode() == stored_key
            and base64.b64encode(hmac.new(salted, b"Server Key", "sha256").digest()).decode() == server_key)


def stored_verifier(db_url: str, name: str) -> str | None:
    with psycopg.connect(db_url) as conn:
        return conn.execute("SELECT rolpassword FROM pg_authid WHERE rolname = %s", (name,)).fetchone()[0]


def tables_intact(db_url: str) -> bool:
    with psycopg.connect(db_url) as conn:
        return conn.execute(
            "SELECT bool_and(to_regclass(t) IS NOT NULL) FROM unnest(ARRAY['model', 'model_layer', 'corpus', "
            "'sentence', 'token', 'token_embedding', 'analysis', 'llens_meta']) t").fetchone()[0]


@pytest.fixture(scope="module")
def team(db_url, runner):
    """A reader and two writers, created through the CLI with --password-env; dropped afterwards."""
    made = [READER, WRITER, WRITER2]
    env = {f"PW_{i}": PASSWORDS[n] for i, n in enumerate(made)}
    for i, (name, cmd) in enumerate(zip(made, ["grant-reader", "grant-writer", "grant-writer"], strict=True)):
        result = runner.invoke(cli, ["db", cmd, name, "--password-env", f"PW_{i}"], env=env)
        assert result.exit_code == 0, result.output
        assert PASSWORDS[name] not in result.output
    yield made
    # roles are server-wide: leave nothing behind (members, then this database's groups)
    with psycopg.connect(db_url, autocommit=True) as conn:
        groups = list(conn.execute("SELECT llens_team_role('reader'), llens_team_role('writer')").fetchone())
        left = [r[0] for r in conn.execute(
            "SELECT u.rolname FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid "
            "JOIN pg_roles u ON u.oid = m.member WHERE g.rolname = ANY(%s) AND NOT u.rolname = ANY(%s)",
            (groups, groups)).fetchall()]
        for name in [*dict.fromkeys(made + HOSTILE_USERS + left), *groups]:
            if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone():
                conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(name)))
                conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


@pytest.fixture(scope="module")
def filled(db_url, team):
    """A model filled by a writer (so a writer can ingest)."""
    with Store.open(url_as(db_url, WRITER, PASSWORDS[WRITER])) as store:
        data = fill(store, f"team-model-{TAG}", dim=16, layers=(0, 2), n_sentences=12)
        data["corpus_id"] = store.get_corpus(f"corpus-team-model-{TAG}").id
    return data


# ---------------------------------------------------------------------------
# granting, listing, passwords


def test_users_lists_owner_writers_readers(runner, team):
    result = runner.invoke(cli, ["db", "users", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.output)}
    assert rows["postgres"]["kind"] == "owner"
    assert rows[READER] == {"name": READER, "kind": "reader", "can_login": True}
    assert rows[WRITER]["kind"] == rows[WRITER2]["kind"] == "writer"
    assert not any(n.startswith("llens_") for n in rows), "the group roles are not members"


def test_passwords_are_stored_hashed_and_right(db_url, team):
    for name in team:
        verifier = stored_verifier(db_url, name)
        assert verifier.startswith("SCRAM-SHA-256$") and PASSWORDS[name] not in verifier
        assert scram_matches(verifier, PASSWORDS[name]), f"{name}'s password is the one given"


def test_password_file_and_prompt_and_none(runner, db_url, team, tmp_path, monkeypatch):
    name = f"pf_{TAG}"
    pw_file = tmp_path / "pw"
    pw_file.write_text("from-a-file\n")
    result = runner.invoke(cli, ["db", "grant-reader", name, "--password-file", str(pw_file)])
    assert result.exit_code == 0, result.output
    assert scram_matches(stored_verifier(db_url, name), "from-a-file")
    # no source and no terminal: an existing role keeps its password
    result = runner.invoke(cli, ["db", "grant-reader", name])
    assert result.exit_code == 0 and "already a reader" in result.output
    assert scram_matches(stored_verifier(db_url, name), "from-a-file")
    # on a terminal: a hidden prompt with confirmation
    monkeypatch.setattr("latentlens.cli.db._interactive", lambda: True)
    result = runner.invoke(cli, ["db", "grant-reader", name], input="typed-in\ntyped-in\n")
    assert result.exit_code == 0, result.output
    assert "typed-in" not in result.output and "Changed the password" in result.output
    assert scram_matches(stored_verifier(db_url, name), "typed-in")
    monkeypatch.setattr("latentlens.cli.db._interactive", lambda: False)
    # a new role with no source in a script: created without one, and told so
    result = runner.invoke(cli, ["db", "grant-reader", f"np_{TAG}"])
    assert result.exit_code == 0 and "without a password" in result.output
    assert stored_verifier(db_url, f"np_{TAG}") is None
    for n in (name, f"np_{TAG}"):
        assert runner.invoke(cli, ["db", "revoke", n, "--drop"]).exit_code == 0


def test_password_sources_are_checked(runner, team):
    result = runner.invoke(cli, ["db", "grant-reader", READER, "--password-env", "LLENS_NO_SUCH_VAR"])
    assert result.exit_code == 2 and "LLENS_NO_SUCH_VAR" in result.output
    result = runner.invoke(cli, ["db", "grant-reader", READER, "--password-file", "/nonexistent/pw"])
    assert result.exit_code == 2 and "cannot read the password file" in result.output
    result = runner.invoke(cli, ["db", "grant-reader", "--help"])
    assert "--password-env" in result.output and "--password " not in result.output


def test_switching_reader_and_writer_keeps_one_group(runner, db_url, team):
    result = runner.invoke(cli, ["db", "grant-writer", READER])
    assert result.exit_code == 0 and "was a reader" in result.output, result.output
    rows = json.loads(runner.invoke(cli, ["db", "users", "--json"]).output)
    assert [r["kind"] for r in rows if r["name"] == READER] == ["writer"]
    result = runner.invoke(cli, ["db", "grant-reader", READER])
    assert result.exit_code == 0 and "was a writer" in result.output, result.output
    with psycopg.connect(db_url) as conn:
        groups = conn.execute(
            "SELECT array_agg(g.rolname ORDER BY g.rolname) FROM pg_auth_members m "
            "JOIN pg_roles g ON g.oid = m.roleid WHERE m.member = %s::regrole",
            (sql.Identifier(READER).as_string(conn),)).fetchone()[0]
    assert len(groups) == 1 and groups[0].endswith("_r"), "a reader again: the writer group is revoked"
    assert scram_matches(stored_verifier(db_url, READER), PASSWORDS[READER]), "no password given: kept"


def test_granting_needs_privileges_one_line(runner, db_url, team):
    result = runner.invoke(cli, ["db", "grant-reader", f"zz_{TAG}", "--database-url",
                                 url_as(db_url, WRITER, PASSWORDS[WRITER])])
    assert result.exit_code == 5
    assert result.output.startswith("Error: cannot grant reader") and "permission denied" in result.output
    assert result.output.count("\n") == 1 and "Traceback" not in result.output
    assert PASSWORDS[WRITER] not in result.output


# ---------------------------------------------------------------------------
# what a reader and a writer may do


def test_reader_queries(db_url, team, filled):
    with connect_as(db_url, READER) as conn:
        q = "[" + ",".join(str(x) for x in filled["vectors"][2][0]) + "]"
        rows = conn.execute("SELECT token, sentence FROM llens_neighbors(%s, 2, %s::halfvec, 3)",
                            (f"team-model-{TAG}", q)).fetchall()
        assert len(rows) == 3, "a reader runs llens_neighbors"
        assert conn.execute("SELECT count(*) FROM token_context").fetchone()[0] > 0, "a reader reads token_context"
    with Store.open(url_as(db_url, READER, PASSWORDS[READER])) as store:
        assert store.list_analyses() is not None, "a reader lists analyses"
        assert store.get_model(f"team-model-{TAG}").layer_numbers == [0, 2]


def test_reader_cannot_write(db_url, team, filled):
    with connect_as(db_url, READER) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied for table model"):
            conn.execute("INSERT INTO model (name, hidden_size, num_layers) VALUES ('r', 8, 2)")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied for function llens_ensure_layer"):
            conn.execute("SELECT llens_ensure_layer(%s, 1)", (filled["info"].id,))
    with Store.open(url_as(db_url, READER, PASSWORDS[READER])) as store:
        with pytest.raises(PermissionDenied, match=f"user {READER}: permission denied for table analysis"):
            store.save_analysis("text", f"team-model-{TAG}", result={"x": 1})
        with pytest.raises(PermissionDenied, match="permission denied for table model"):
            store.register_model("reader-ingest", hidden_size=8, num_layers=2)
        with pytest.raises(PermissionDenied, match="permission denied for function llens_ensure_layer"):
            store.ensure_layers(f"team-model-{TAG}", [1])


def test_writer_saves_and_deletes_only_its_own(db_url, team, filled):
    with Store.open(url_as(db_url, WRITER, PASSWORDS[WRITER])) as w1, \
         Store.open(url_as(db_url, WRITER2, PASSWORDS[WRITER2])) as w2:
        mine = w1.save_analysis("text", f"team-model-{TAG}", result={"n": 1}, title="w1's")
        theirs = w2.save_analysis("text", f"team-model-{TAG}", result={"n": 2}, title="w2's")
        assert w1.get_analysis(mine).created_by == WRITER
        with pytest.raises(PermissionDenied, match="you can delete only your own"):
            w1.delete_analysis(theirs)
        w1.delete_analysis(mine)
        assert [a.id for a in w2.list_analyses(model=f"team-model-{TAG}")] == [theirs]


def test_writer_deleting_anothers_analysis_exits_5(runner, db_url, team, filled):
    with Store.open(url_as(db_url, WRITER2, PASSWORDS[WRITER2])) as w2:
        theirs = w2.save_analysis("text", f"team-model-{TAG}", result={"n": 3}, title="w2's, kept")
    result = runner.invoke(cli, ["analyses", "rm", str(theirs), "--database-url",
                                 url_as(db_url, WRITER, PASSWORDS[WRITER])])
    assert result.exit_code == 5, result.output
    assert f"belongs to {WRITER2}" in result.output and result.output.count("\n") == 1
    with Store.open(db_url) as owner:
        assert owner.get_analysis(theirs).created_by == WRITER2, "still there"


# ---------------------------------------------------------------------------
# writers append: no UPDATE of shared rows, even inside their own transaction

SHARED_UPDATES = {
    "token_embedding": "UPDATE token_embedding SET embedding = embedding WHERE model_id = %(m)s",
    "leaf": "UPDATE token_embedding_m%(m)s_l0 SET token_id = 0",
    "sentence": "UPDATE sentence SET text = '' WHERE corpus_id = %(c)s",
    "corpus": "UPDATE corpus SET name = 'renamed' WHERE id = %(c)s",
    "model": "UPDATE model SET name = 'renamed' WHERE id = %(m)s",
    "model_layer.index_params": "UPDATE model_layer SET index_params = '{\"ef_search\": 1}' WHERE model_id = %(m)s",
    "model_layer.row_count": "UPDATE model_layer SET row_count = 0 WHERE model_id = %(m)s",
    "token": "UPDATE token SET token = 'x' WHERE model_id = %(m)s",
    "token_quota": "UPDATE token_quota SET used = 0 WHERE model_id = %(m)s",
    "model_layer insert": "INSERT INTO model_layer (model_id, layer) VALUES (%(m)s, 1)",
    "token_quota insert": "INSERT INTO token_quota (model_id, token_id, used) VALUES (%(m)s, 999, 10000)",
}


@pytest.mark.parametrize("what", list(SHARED_UPDATES))
def test_writer_cannot_update_shared_rows(db_url, team, filled, what):
    ids = {"m": filled["info"].id, "c": filled["corpus_id"]}
    stmt = SHARED_UPDATES[what] % ids if what == "leaf" else SHARED_UPDATES[what]
    with psycopg.connect(url_as(db_url, WRITER, PASSWORDS[WRITER])) as conn:  # one transaction
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied"):
            conn.execute(stmt, ids)
        conn.rollback()
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM sentence WHERE corpus_id = %s AND text = ''",
                            (filled["corpus_id"],)).fetchone()[0] == 0
        assert conn.execute("SELECT name FROM model WHERE id = %s", (filled["info"].id,)).fetchone()[0] \
            == f"team-model-{TAG}"


def test_writer_has_no_update_privilege_on_any_shared_table(db_url, team, filled):
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p') "
            "AND has_table_privilege(%s, c.oid, 'UPDATE') ORDER BY 1", (WRITER,)).fetchall()
        rls = {r[0] for r in conn.execute(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = current_schema() AND c.relrowsecurity").fetchall()}
    updatable = {r[0] for r in rows}
    assert updatable == {"analysis", "eval_run", "eval_item", "eval_verdict", "ingest_run", "atlas_run"}, \
        "UPDATE only where row-level security limits a writer to its own rows"
    assert updatable <= rls, updatable - rls


def test_writer_cannot_record_an_index_recall(runner, db_url, team, filled):
    """model_layer.index_params sets everyone's default search: the owner's alone."""
    as_writer = ["--database-url", url_as(db_url, WRITER, PASSWORDS[WRITER])]
    result = runner.invoke(cli, ["index", "build", f"team-model-{TAG}", "--layers", "2", "--no-progress", *as_writer])
    assert result.exit_code == 0 and "recall is not measured" in result.output, result.output
    result = runner.invoke(cli, ["index", "calibrate", f"team-model-{TAG}", "--layers", "2", *as_writer])
    assert result.exit_code == 5, result.output
    assert "only the database's owner records it" in result.output and result.output.count("\n") == 1


def test_wrong_password_is_refused_on_the_embedded_server(runner, db_url, team):
    for name in (WRITER, READER):
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(url_as(db_url, name, "WRONG"))
        with pytest.raises(psycopg.OperationalError, match="no password supplied"):
            psycopg.connect(url_as(db_url, name))
        with psycopg.connect(url_as(db_url, name, PASSWORDS[name])) as conn:
            assert conn.execute("SELECT current_user").fetchone()[0] == name
    result = runner.invoke(cli, ["models", "--database-url", url_as(db_url, WRITER, "WRONG")])
    assert result.exit_code == 5 and "password authentication failed" in result.output, result.output
    assert result.output.count("\n") == 1
    assert PASSWORDS[WRITER] not in result.output and "WRONG" not in result.output


def test_serve_sign_in_refuses_wrong_passwords(db_url, team, filled):
    from fastapi.testclient import TestClient
    from serve_app import make_app

    owner = urlsplit(db_url).username
    # sign-in on (a team server's mode); TestClient's Host header is "testserver"
    with TestClient(make_app(db_url, auth=True, token=True)) as c:
        assert c.get("/api/models", auth=(WRITER, PASSWORDS[WRITER])).status_code == 200
        for creds in ((WRITER, "WRONG"), (READER, PASSWORDS[WRITER]), (owner, "x")):
            r = c.get("/api/models", auth=creds)
            assert r.status_code == 401, (creds[0], r.status_code)
        r = c.get("/api/models", auth=(owner, "x"))
        assert "did not check the password" in r.json()["error"], "the owner's trust proves nothing"


def test_writer_ingest_top_up_and_index_build(runner, db_url, team, tmp_path):
    """A writer's own ingest, a top-up of it and its index build work through the owner-run functions."""
    from latentlens.corpus import read_corpus
    from latentlens.ingest import IngestOptions, ingest
    from latentlens.models import load_language_model
    from latentlens.models.tiny import make_tiny_model, sample_corpus_path
    from tests._ingest_ref import compare, expected_rows

    lm = load_language_model(str(make_tiny_model(tmp_path / "tiny", "llama")), name=f"w-tiny-{TAG}")
    path = tmp_path / "c.txt"
    path.write_text("\n".join(sample_corpus_path().read_text(encoding="utf-8").splitlines()[:40]) + "\n")
    corpus = read_corpus(str(path))
    writer_url = url_as(db_url, WRITER, PASSWORDS[WRITER])
    layers = [0, 2]

    def run(limit, build):
        return ingest(lm, corpus, database_url=writer_url, options=IngestOptions(
            progress=False, build_index=build, layers=layers, max_contexts_per_token=3, batch_size=8,
            limit=limit))

    first = run(15, False)
    assert first.run.status == "done"
    topped = run(None, True)  # the same corpus, all of it: adds the rest
    assert topped.run.status == "done" and topped.run.id != first.run.id
    assert any("recall is not measured" in n for n in topped.notices), topped.notices
    compare(db_url, lm.name, expected_rows(lm, corpus.texts, layers, skip=2, cap=3), layers)
    with psycopg.connect(db_url) as conn:
        counts = conn.execute(
            "SELECT ml.layer, ml.row_count, (SELECT count(*) FROM token_embedding e "
            "WHERE e.model_id = m.id AND e.layer = ml.layer), ml.index_kind, ml.version FROM model m "
            "JOIN model_layer ml ON ml.model_id = m.id WHERE m.name = %s ORDER BY 1", (lm.name,)).fetchall()
        assert [c[0] for c in counts] == layers
        assert all(c[1] == c[2] > 0 and c[3] == "hnsw_halfvec" and c[4] >= 2 for c in counts), counts
        used, stored = conn.execute(
            "SELECT (SELECT sum(used) FROM token_quota q WHERE q.model_id = m.id), "
            "(SELECT count(*) FROM token_embedding e WHERE e.model_id = m.id AND e.layer = 0) "
            "FROM model m WHERE m.name = %s", (lm.name,)).fetchone()
        assert used == stored, "the quota counts every context stored, once"
        assert conn.execute("SELECT sentence_count = (SELECT count(*) FROM sentence s WHERE s.corpus_id = c.id) "
                            "FROM corpus c WHERE c.name = %s", (topped.corpus,)).fetchone()[0]
        assert {r[0] for r in conn.execute("SELECT created_by FROM ingest_run r JOIN model m ON m.id = r.model_id "
                                           "WHERE m.name = %s", (lm.name,))} == {WRITER}
    # another member cannot take over (resume) the writer's run
    with Store.open(url_as(db_url, WRITER2, PASSWORDS[WRITER2])) as other, \
         pytest.raises(PermissionDenied, match=f"was started by {WRITER}"):
        other.claim_run(topped.run, hostname="h", pid=1)
    # the owner records the recall the writer could not
    result = runner.invoke(cli, ["index", "calibrate", lm.name, "--json"])
    assert result.exit_code == 0, result.output


def test_writer_cannot_drop_models(db_url, team, filled):
    with Store.open(url_as(db_url, WRITER, PASSWORDS[WRITER])) as store, \
         pytest.raises(PermissionDenied, match="permission denied for function llens_drop_model"):
        store.delete_model(f"team-model-{TAG}")
    with connect_as(db_url, WRITER) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied for function llens_drop_model"):
            conn.execute("SELECT llens_drop_model(%s)", (filled["info"].id,))
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="must be owner"):
            conn.execute("DROP TABLE sentence CASCADE")


def test_hostile_model_and_corpus_names_round_trip(db_url, team):
    with Store.open(url_as(db_url, WRITER, PASSWORDS[WRITER])) as store:
        for i, name in enumerate(HOSTILE_MODELS):
            fill(store, name, dim=8, layers=(0, 1), n_sentences=4, seed=10 + i, corpus=name + "'; --")
            assert store.get_model(name).name == name
            assert store.get_corpus(name + "'; --").name == name + "'; --"
            corpora = store._fetch("SELECT DISTINCT c.name FROM token_context t JOIN corpus c ON c.id = t.corpus_id "
                                   "WHERE t.model = %s", (name,))
            assert corpora == [(name + "'; --",)], "rows read back by the model's name, joined to the corpus"
        assert {m.name for m in store.list_models()} >= set(HOSTILE_MODELS)
    assert tables_intact(db_url)


# ---------------------------------------------------------------------------
# hostile user names, revoking, dropping


def test_hostile_user_names_neither_break_nor_inject(runner, db_url, team):
    for name in HOSTILE_USERS:
        result = runner.invoke(cli, ["db", "grant-reader", name, "--password-env", "PW"], env={"PW": "h-pw"})
        assert result.exit_code == 0, (name, result.output)
        with psycopg.connect(url_as(db_url, name, "h-pw")) as conn:
            assert conn.execute("SELECT current_user").fetchone()[0] == name
            assert conn.execute("SELECT count(*) FROM model").fetchone()[0] >= 1
    listed = {r["name"]: r["kind"] for r in json.loads(runner.invoke(cli, ["db", "users", "--json"]).output)}
    assert all(listed.get(n) == "reader" for n in HOSTILE_USERS)
    assert runner.invoke(cli, ["db", "users"]).exit_code == 0
    for name in HOSTILE_USERS:
        result = runner.invoke(cli, ["db", "revoke", name, "--drop"])
        assert result.exit_code == 0 and "Dropped" in result.output, (name, result.output)
    assert tables_intact(db_url)


def test_too_long_and_empty_names_are_refused(runner, team):
    for name in ("y" * 500, "é" * 32):  # 500 bytes, 64 bytes
        result = runner.invoke(cli, ["db", "grant-writer", name])
        assert result.exit_code == 2 and "at most 63 bytes" in result.output, result.output
        assert result.output.count("\n") == 1 and len(result.output) < 300
    result = runner.invoke(cli, ["db", "revoke", ""])
    assert result.exit_code == 2 and "cannot be empty" in result.output


def test_revoked_user_can_no_longer_read(runner, db_url, team, filled):
    name = f"gone_{TAG}"
    gone_url = url_as(db_url, name, "g-pw")
    assert runner.invoke(cli, ["db", "grant-reader", name, "--password-env", "PW"], env={"PW": "g-pw"}).exit_code == 0
    with psycopg.connect(gone_url) as conn:
        assert conn.execute("SELECT count(*) FROM token_context").fetchone()[0] > 0
    result = runner.invoke(cli, ["db", "revoke", name])
    assert result.exit_code == 0 and "no longer a reader" in result.output, result.output
    with psycopg.connect(gone_url) as conn, \
         pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied"):
        conn.execute("SELECT count(*) FROM token_context")
    # through latentlens: what happened, not which table the schema check read first
    with pytest.raises(PermissionDenied, match=f"role {name} has no access to this database"):
        Store.open(gone_url)
    result = runner.invoke(cli, ["models", "--database-url", gone_url])
    assert result.exit_code == 5, result.output
    assert f"role {name} has no access to this database" in result.output
    assert "alembic_version" not in result.output and result.output.count("\n") == 1
    result = runner.invoke(cli, ["db", "revoke", name])
    assert result.exit_code == 0 and "was not a member" in result.output
    assert runner.invoke(cli, ["db", "revoke", name, "--drop"]).exit_code == 0
    result = runner.invoke(cli, ["db", "revoke", name])
    assert result.exit_code == 2 and "no role" in result.output


def test_drop_refuses_a_role_that_owns_things(runner, db_url, team):
    name = f"owns_{TAG}"
    assert runner.invoke(cli, ["db", "grant-writer", name]).exit_code == 0
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE TABLE {} (x int)").format(sql.Identifier(f"t_{TAG}")))
        conn.execute(sql.SQL("ALTER TABLE {} OWNER TO {}").format(sql.Identifier(f"t_{TAG}"), sql.Identifier(name)))
    result = runner.invoke(cli, ["db", "revoke", name, "--drop"])
    assert result.exit_code == 1 and "owns objects" in result.output and result.output.count("\n") == 1
    rows = json.loads(runner.invoke(cli, ["db", "users", "--json"]).output)
    assert name not in {r["name"] for r in rows}, "the membership is revoked all the same"
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(f"t_{TAG}")))
    assert runner.invoke(cli, ["db", "revoke", name, "--drop"]).exit_code == 0


def test_superuser_sets_up_the_team_of_a_database_another_role_owns(pg_base_url, monkeypatch):
    """The owner migrates without CREATEROLE (no groups yet); a superuser's first grant creates them,
    and the leaves the owner's functions create later are readable by readers all the same."""
    from latentlens import migrate, roles
    from latentlens.db import _with_database

    owner, dbname, reader, writer = f"own_{TAG}", f"t_roles_owned_{TAG}", f"rd_{TAG}", f"wr_{TAG}"
    with psycopg.connect(pg_base_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'o-pw'").format(sql.Identifier(owner)))
        conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(dbname), sql.Identifier(owner)))
    url = _with_database(pg_base_url, dbname)
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector")  # docker/init.sql's job on a server
        migrate.upgrade(url_as(url, owner, "o-pw"))
        with psycopg.connect(url) as conn:
            assert not conn.execute("SELECT count(*) FROM pg_roles WHERE rolname = llens_team_role('reader')"
                                    ).fetchone()[0], "no CREATEROLE: the migration leaves the groups to later"
        monkeypatch.setenv("LLENS_DATABASE_URL", url)
        assert roles.grant(None, reader, "reader", "r-pw")["groups_created"]
        roles.grant(None, writer, "writer", "w-pw")
        assert [r["kind"] for r in roles.users(None)] == ["owner", "writer", "reader"]
        assert roles.users(None)[0]["name"] == owner
        with Store.open(url_as(url, writer, "w-pw")) as store:
            data = fill(store, "m", dim=8, layers=(0, 1), n_sentences=4)
        with psycopg.connect(url_as(url, reader, "r-pw")) as conn:
            q = "[" + ",".join(str(x) for x in data["vectors"][1][0]) + "]"
            assert conn.execute("SELECT count(*) FROM llens_neighbors('m', 1, %s::halfvec, 3)", (q,)
                                ).fetchone()[0] == 3, "a reader scans a leaf created after the groups"
        with Store.open(url_as(url, reader, "r-pw")) as rs:  # the cold query's copy, as a reader
            rows = sum(len(k) for k, _ in rs._iter_layer_ranges(rs.get_model("m"), 1, 2))
            assert rows == len(data["vectors"][1])
    finally:
        with psycopg.connect(pg_base_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname)))
            groups = [r[0] for r in conn.execute(
                "SELECT rolname FROM pg_roles WHERE rolname LIKE %s", (f"llens_t_roles_owned_{TAG}%",))]
            for name in [reader, writer, owner, *groups]:
                conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))


# ---------------------------------------------------------------------------
# the embedded default, URLs


@pytest.mark.parametrize("args", [["grant-reader", "bob"], ["grant-writer", "bob"], ["revoke", "bob"], ["users"]])
def test_embedded_default_is_refused(runner, monkeypatch, args):
    monkeypatch.delenv("LLENS_DATABASE_URL", raising=False)
    result = runner.invoke(cli, ["db", *args])
    assert result.exit_code == 2, "a setting that cannot be used: README's exit codes"
    assert result.output.startswith("Error: the embedded server is single-user: set LLENS_DATABASE_URL")
    assert result.output.count("\n") == 1


@pytest.mark.parametrize("url, shown", [
    ("postgresql://ann:s3cr%40t@db.lab:5432/latentlens", "postgresql://ann@db.lab:5432/latentlens"),
    ("postgresql://ann@db.lab/latentlens?password=s3cret&sslmode=require",
     "postgresql://ann@db.lab/latentlens?sslmode=require"),
    ("host=db.lab user=ann password=s3cret dbname=latentlens", None),
    ("postgresql://postgres:@/latentlens?host=/tmp/x", "postgresql://postgres:@/latentlens?host=/tmp/x"),
])
def test_db_url_never_prints_a_password(runner, url, shown):
    result = runner.invoke(cli, ["db", "url", "--database-url", url])
    assert result.exit_code == 0, result.output
    assert "s3cr" not in result.output
    if shown is not None:
        assert result.stdout.strip() == shown


def test_writer_imports_an_index(db_url, team, filled, tmp_path):
    """Import appends too: a writer imports an exported index under a new name, with the same rows."""
    from latentlens.interop import export_index, import_index

    with Store.open(url_as(db_url, WRITER2, PASSWORDS[WRITER2])) as store:
        export_index(store, f"team-model-{TAG}", tmp_path / "x")
        import_index(store, tmp_path / "x", f"imported-{TAG}", corpus_name=f"imported-{TAG}")
        got, orig = store.get_model(f"imported-{TAG}"), store.get_model(f"team-model-{TAG}")
        assert [(li.layer, li.row_count) for li in got.layers] == [(li.layer, li.row_count) for li in orig.layers]
        assert store.get_corpus(f"imported-{TAG}").sentence_count == 12


def test_an_older_embedded_data_dir_gets_the_password_rules():
    """A data dir made before latentlens checked passwords (initdb's "trust") is fixed at the next start."""
    import shutil
    import time

    from conftest import server_tmpdir

    from latentlens.db import HBA_MARKER, EmbeddedServer

    base = server_tmpdir()
    srv = EmbeddedServer(base / "data")
    try:
        url = srv.start()
        hba = srv.pgdata / "pg_hba.conf"
        assert HBA_MARKER in hba.read_text(), "a new data dir has the rules from the start"
        member = url_as(url, f"old_{TAG}", "WRONG")
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'right'").format(sql.Identifier(f"old_{TAG}")))
            with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
                psycopg.connect(member)
            hba.write_text("local all all trust\nhost all all 127.0.0.1/32 trust\nhost all all ::1/128 trust\n")
            conn.execute("SELECT pg_reload_conf()")
        for _ in range(200):  # the reload is a signal: wait until the old rule is in force
            try:
                psycopg.connect(member).close()
                break
            except psycopg.OperationalError:
                time.sleep(0.05)
        else:
            pytest.fail("the trust rule never took effect")
        srv.start()  # what any llens process does first
        assert HBA_MARKER in hba.read_text()
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(member)
        with psycopg.connect(url) as conn:  # the owner still needs none
            assert conn.execute("SELECT current_user").fetchone()[0] == "postgres"
    finally:
        srv.stop()
        shutil.rmtree(base, ignore_errors=True)
