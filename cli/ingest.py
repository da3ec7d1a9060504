"""`llens ingest` and `llens runs`: thin wrappers over latentlens.ingest."""

from __future__ import annotations

import json

import click
from latentlens.cli._common import (
    database_option,
    emit,
    handle_errors,
    output_format,
    output_options,
)

DTYPE_CHOICES = ("auto", "float32", "bf16-mixed", "bfloat16", "float16")


class _IngestCommand(click.Command):
    """`llens ingest --help` ends with the vision-language families, read from the adapter registry
    (imported only when help is shown: the registry imports torch)."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        from latentlens.architectures import supported_vlms

        with formatter.section("Vision-language families (model types)"):
            formatter.write_text(supported_vlms())
        super().format_epilog(ctx, formatter)


@click.command(cls=_IngestCommand)
@click.argument("model", required=False)
@click.argument("corpus", required=False)
@click.option("--gguf-file", default=None, metavar="FILE",
              help="GGUF file inside MODEL (a dir or hub id); or pass the .gguf path as MODEL.")
@click.option("--revision", default=None, help="Model revision (branch, tag or commit) to load.")
@click.option("--name", default=None, help="Store the model under this name (default: the id, dir name or GGUF stem).")
@click.option("--corpus-name", default=None, help="Register the corpus under this name (default: its file name).")
@click.option("--column", default=None, help="CSV/TSV column holding the text (name or index).")
@click.option("--field", "field_name", default=None, help="JSONL field holding the text (default: text).")
@click.option("--format", "fmt", type=click.Choice(["txt", "csv", "tsv", "jsonl"]), default=None,
              help="Corpus format (default: from the file extension; stdin is txt).")
@click.option("--layers", default=None, metavar="LIST",
              help="Layers to store: 'all' or e.g. 0,3,7 (0 = input embeddings). Default: 1,2,4,8,16,24,n-2,n-1.")
@click.option("--skip-positions", default=2, show_default=True, type=int,
              help="Skip tokens at positions below this (position 0 = first token fed, the BOS if any).")
@click.option("--max-contexts-per-token", default=50, show_default=True, type=int,
              help="Keep at most this many contexts per token id (first come, first served).")
@click.option("--batch-size", default=32, show_default=True, type=int, help="Sentences per forward pass.")
@click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default="auto", show_default=True,
              help="Forward dtype, recorded with the run (hidden states are normalised in float32). auto: "
                   "the dtype of the model's stored rows if it has some, else bf16-mixed (float32 weights "
                   "and residual stream, later blocks' matmuls in bfloat16) on a CPU with bfloat16 units "
                   "(AVX512-BF16/AMX), float32 elsewhere.")
@click.option("--device", default=None, help="torch device (default: cuda if available, else cpu).")
@click.option("--max-length", default=None, type=int, help="Truncate sentences to this many tokens (counted).")
@click.option("--limit", default=None, type=int, help="Only the first N sentences of the corpus.")
@click.option("--no-index", is_flag=True, help="Don't build ANN indexes at the end.")
@click.option("--index-jobs", default=2, show_default=True, type=int,
              help="ANN indexes built at once at the end (one layer each, own connection).")
@click.option("--ef-construction", "index_ef_construction", type=click.IntRange(4, 1000), default=None,
              help="HNSW ef_construction of the indexes built at the end [default: 64]; lower builds "
                   "faster and needs a higher ef_search for the same recall (measured per layer).")
@click.option("--shard", default=None, metavar="I/N", help="Process shard I of N (run N of these at once).")
@click.option("--resume", "resume_id", default=None, type=int, metavar="RUN_ID",
              help="Continue an unfinished run (MODEL and CORPUS are then not needed).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the run summary as JSON.")
@database_option
@handle_errors
def ingest(model, corpus, gguf_file, revision, name, corpus_name, column, field_name, fmt, layers,
           skip_positions, max_contexts_per_token, batch_size, dtype, device, max_length, limit,
           no_index, index_jobs, index_ef_construction, shard, resume_id, no_progress, as_json, database_url):
    """Run MODEL over CORPUS and store its contextual token embeddings.

    MODEL is a transformers id, a local model dir or a .gguf file; for a
    vision-language model (any family listed below) only its language
    model runs. CORPUS is a .txt (a sentence a line), .csv/.tsv (--column),
    .jsonl (--field) file, or - for stdin. Re-running the same command
    continues an interrupted run exactly; see docs/ingest.md.

    \b
    Examples:
        llens ingest HuggingFaceTB/SmolLM2-135M corpus.txt
        llens ingest ./SmolLM2-135M-Instruct.Q4_1.gguf corpus.txt --layers 1,8,16
        llens ingest ./SmolLM2-135M-Instruct.Q4_1.gguf corpus.txt --dtype float32
        llens ingest llava-hf/llava-1.5-7b-hf captions.csv --column caption --dtype bfloat16
        llens ingest my-model corpus.txt --shard 0/2 &  llens ingest my-model corpus.txt --shard 1/2
        llens ingest --resume 7
    """
    from latentlens import ingest as ing

    if batch_size < 1:
        raise click.BadParameter("must be >= 1", param_hint="--batch-size")
    if index_jobs < 1:
        raise click.BadParameter("must be >= 1", param_hint="--index-jobs")
    if resume_id is not None:  # the run's recorded dtype, whatever --dtype says
        result = ing.resume(resume_id, database_url=database_url, batch_size=batch_size, device=device,
                            build_index=not no_index, progress=not no_progress, echo=_err,
                            index_jobs=index_jobs, index_ef_construction=index_ef_construction)
    else:
        if not model or not corpus:
            raise click.UsageError("give MODEL and CORPUS, or --resume RUN_ID")
        from latentlens.corpus import read_corpus
        from latentlens.models import load_language_model

        texts = read_corpus(corpus, column=column, field_name=field_name, fmt=fmt)
        opts = ing.IngestOptions(
            layers=layers, skip_positions=skip_positions, max_contexts_per_token=max_contexts_per_token,
            batch_size=batch_size, max_length=max_length, limit=limit, shard=ing.parse_shard(shard),
            build_index=not no_index, progress=not no_progress, index_jobs=index_jobs,
            index_ef_construction=index_ef_construction,
        )
        if limit is not None and limit < 1:
            raise click.BadParameter("must be >= 1", param_hint="--limit")
        from latentlens.models.loading import store_name

        dtype = ing.dtype_for(database_url, store_name(model, gguf_file, name), dtype, device)
        lm = load_language_model(model, gguf_file=gguf_file, dtype=dtype, device=device,
                                 revision=revision, name=name, lens_heads=False)
        ing.resolve_layers(layers, lm.num_layers, lm.name)  # fail before touching the store
        result = ing.ingest(lm, texts, database_url=database_url, corpus_name=corpus_name,
                            options=opts, echo=_err)
    s = result.summary()
    if as_json:
        click.echo(json.dumps(s, indent=2, default=str))
    elif result.already_done:
        click.echo(f"Run {s['run']} already ingested {s['model']} over {s['corpus']} "
                   f"({s['rows_written']:,} rows); nothing to do.")
    else:
        c = s["counters"]
        click.echo(
            f"Run {s['run']} done: {s['model']} over {s['corpus']} shard {s['shard']}: "
            f"{s['sentences_done']:,} sentences, {s['tokens_seen']:,} tokens, {s['rows_written']:,} "
            f"contexts x {len(s['layers'])} layers in {s['duration_s']}s "
            f"(skipped: {c.get('prefix_duplicates', 0):,} repeated prefixes, {c.get('over_cap', 0):,} over cap, "
            f"{c.get('duplicate_lines', 0):,} duplicate and {c.get('blank_lines', 0):,} blank lines, "
            f"{c.get('truncated', 0):,} truncated)."
        )


def _err(msg: str) -> None:
    click.echo(msg, err=True)


RUN_COLUMNS = ["id", "kind", "model", "corpus", "status", "shard", "sentences", "rows", "duration_s", "error"]


@click.command()
@click.option("--model", default=None, help="Only runs of this model.")
@click.option("--status", type=click.Choice(["running", "interrupted", "failed", "done"]), default=None)
@output_options
@database_option
@handle_errors
def runs(model, status, as_json, as_csv, database_url):
    """List runs: ingests and imports (kind), status, shard, progress, rows, duration, error.

    \b
    Examples:
        llens runs
        llens runs --status failed --json
    """
    from latentlens.cli._common import open_store

    fmt = output_format(as_json, as_csv)
    with open_store(database_url) as store:
        rows = []
        for r in store.list_runs(model, status):
            rows.append({
                "id": r.id, "kind": r.kind, "model": r.model, "corpus": r.corpus, "status": r.status,
                "shard": f"{r.shard}/{r.num_shards}",
                "sentences": f"{r.sentences_done}/{r.sentences_total if r.sentences_total is not None else '?'}",
                "sentences_done": r.sentences_done, "sentences_total": r.sentences_total,
                "rows": r.rows_written, "tokens": r.tokens_seen, "layers": r.layers,
                "duration_s": round(r.duration_s, 1), "error": r.error, "params": r.params,
                "counters": r.counters, "started_at": r.started_at, "pid": r.pid, "hostname": r.hostname,
            })
    emit(rows, fmt, None if fmt == "json" else RUN_COLUMNS)
