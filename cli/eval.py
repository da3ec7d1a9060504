"""`llens eval`: how interpretable are a VLM's visual tokens, per method and layer?"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from latentlens.cli._common import database_option, emit, handle_errors, open_store, parse_int_list


@click.command("eval")
@click.argument("vlm", required=False)
@click.option("--images", metavar="DIR|LIST|IMAGE",
              help="A directory of images, a text file listing one path per line, or one image.")
@click.option("--num-images", type=click.IntRange(min=1), help="Judge N images drawn at random (default: all).")
@click.option("--patches-per-image", type=click.IntRange(min=1), default=4, show_default=True,
              help="Patches drawn per image, never padding.")
@click.option("--visual-layers", metavar="L[,L...]", help="LLM layers of the visual tokens (default: the stored layers).")
@click.option("--layers", metavar="L[,L...]", help="Stored layers LatentLens searches (default: all).")
@click.option("--methods", default="all", show_default=True, metavar="M[,M...]",
              help="latentlens, logitlens, embeddinglens, or all.")
@click.option("--words", type=click.IntRange(min=1, max=50), default=5, show_default=True,
              help="Top words per method shown to the judge.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the image and patch draws.")
@click.option("--prompt", help="Text prompt around the image (default: the query default).")
@click.option("--resolution", help="Resize images to this (e.g. 336 or 448x448), as for `llens query`.")
@click.option("--judge", "judge_name", metavar="NAME",
              help="openai-compatible, labels, or module:Class (a latentlens.eval.Judge subclass).")
@click.option("--url", help="openai-compatible: the endpoint's base URL (e.g. http://127.0.0.1:8000/v1).")
@click.option("--judge-model", "judge_model", help="openai-compatible: the judge model's name.")
@click.option("--model", "judge_model_alias", hidden=True)  # the old spelling of --judge-model
@click.option("--api-key-env", metavar="VAR", help="openai-compatible: environment variable holding the API key.")
@click.option("--annotations", type=click.Path(dir_okay=False),
              help="labels: JSON lines {image, x, y, w, h, names} of labelled regions.")
@click.option("--run", "run_name", metavar="NAME",
              help="Name of the run (default: derived from the settings, so rerunning resumes).")
@click.option("--summary", "summary_run", metavar="RUN", help="Summarise a recorded run (name or id) instead.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help="Where to write RUN-summary.png and RUN-summary.csv (with --summary default: .).")
@click.option("--format", "fig_format", type=click.Choice(["png", "pdf", "svg"]), default="png", show_default=True,
              help="The summary figure's format (pdf, svg: vector, for a paper).")
@click.option("--export", "export_path", type=click.Path(dir_okay=False), help="Write the run's verdicts as JSON lines.")
@click.option("--list", "list_runs", is_flag=True,
              help="List recorded eval runs (status 'stopped': its process died; rerun to resume).")
@click.option("--dtype", default="float32", show_default=True, help="VLM dtype: float32, bfloat16, float16.")
@click.option("--device", help="torch device (default: cuda if available).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="JSON output.")
@database_option
@handle_errors
def eval_(vlm, images, num_images, patches_per_image, visual_layers, layers, methods, words, seed, prompt,
          resolution, judge_name, url, judge_model, judge_model_alias, api_key_env, annotations, run_name,
          summary_run, out_dir, fig_format, export_path, list_runs, dtype, device, no_progress, as_json,
          database_url) -> None:
    """Measure how many visual tokens each method makes interpretable.

    Samples patches of VLM's visual tokens (never padding), takes each
    method's top words per visual layer, and asks a judge whether any of
    them describes what is in the patch. Every verdict is stored in the
    database as one evaluation run, with what the judge saw and answered:
    the team shares it, and the same command run again resumes it,
    skipping judged patches (Ctrl-C or a failing judge lose at most the
    patch in flight). See docs/eval.md.

    \b
    Examples:
        llens eval llava-hf/llava-1.5-7b-hf --images val2017/ --num-images 100 \\
            --judge openai-compatible --url http://127.0.0.1:8000/v1 --judge-model Qwen2.5-VL-72B
        llens eval tiny-llava --images imgs/ --judge labels --annotations regions.jsonl
        llens eval ./llava-dir --images imgs/ --methods logitlens,embeddinglens \\
            --visual-layers 0,8 --judge labels --annotations regions.jsonl   # baselines: no index needed
        llens eval --summary eval-3f2a9c01d4e5 --out results/   # % per method x layer, PNG, CSV
        llens eval --summary eval-3f2a9c01d4e5 --out paper/ --format pdf
        llens eval --summary eval-3f2a9c01d4e5 --export verdicts.jsonl
        llens eval --list
    """
    if list_runs:
        _list(database_url, as_json)
        return
    if judge_model_alias is not None:
        if judge_model is not None and judge_model != judge_model_alias:
            raise click.UsageError("--model is the old spelling of --judge-model: give one of them")
        judge_model = judge_model_alias
    if summary_run:
        _summary(database_url, summary_run, out_dir, export_path, as_json, files=True, fmt=fig_format)
        return
    if not vlm or not images or not judge_name:
        raise click.UsageError("give VLM, --images and --judge (or --summary RUN, or --list)")
    from latentlens.eval import EvalOptions, JudgeError, make_judge, run_eval
    from latentlens.lenses import parse_methods

    judge = make_judge(judge_name, url=url, model=judge_model, api_key_env=api_key_env, annotations=annotations)
    opts = EvalOptions(
        images=images, num_images=num_images, patches_per_image=patches_per_image,
        visual_layers=parse_int_list(visual_layers, "--visual-layers"), layers=parse_int_list(layers, "--layers"),
        methods=parse_methods(methods), seed=seed, words=words, prompt=prompt, resolution=resolution,
        dtype=dtype, device=device, progress=not no_progress,
    )
    try:
        result = run_eval(vlm, judge, opts, database_url=database_url, run_name=run_name,
                          echo=lambda m: click.echo(m, err=True))
    except JudgeError as e:
        raise JudgeError(f"{e} (judged patches are kept: run the same command again to resume)") from e
    except KeyboardInterrupt:  # whatever it interrupted, the database included: one line, 130
        click.echo("interrupted; run the same command to resume", err=True)
        sys.exit(130)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2, default=str))
    else:
        run = result.run
        state = "was already complete" if result.already_done else f"judged {result.judged} patches"
        click.echo(f"eval run '{run.name}' {state} ({run.items_done} in all)", err=True)
        _summary(database_url, run.name, out_dir, export_path, False, files=out_dir is not None, fmt=fig_format)


def _list(database_url, as_json) -> None:
    with open_store(database_url) as store:
        runs = store.list_eval_runs()  # a run whose process died shows as "stopped"
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in runs], indent=2, default=str))
        return
    emit([{"id": r.id, "name": r.name, "model": r.model, "judge": r.judge, "methods": ",".join(r.methods),
           "layers": ",".join(map(str, r.visual_layers)), "status": r.status, "items": r.items_done,
           "by": r.created_by, "started": r.started_at.strftime("%Y-%m-%d %H:%M")} for r in runs], "table")


def _summary(database_url, run_ref, out_dir, export_path, as_json, *, files: bool, fmt: str = "png") -> None:
    from latentlens.eval import summarize, write_csv, write_jsonl, write_plot
    from latentlens.eval.summary import figure_text

    with open_store(database_url) as store:
        run = store.get_eval_run(run_ref)
        rows = summarize(store.eval_counts(run), run.methods)
        n_images, n_patches = store.eval_extent(run)
        records = store.eval_verdicts(run) if export_path else None
    if records is not None:  # export_path was given
        write_jsonl(records, export_path)
        click.echo(f"wrote {len(records)} verdicts to {export_path}", err=True)
    paths = {}
    if rows and files:
        out = Path(out_dir or ".")
        out.mkdir(parents=True, exist_ok=True)
        stem = _file_stem(run.name)
        paths["csv"] = str(write_csv(rows, out / f"{stem}-summary.csv"))
        title, caption = figure_text(run.model, run.judge, run.judge_settings, n_images, n_patches, run.name)
        paths[fmt] = str(write_plot(rows, out / f"{stem}-summary.{fmt}", title=title, caption=caption, fmt=fmt))
    if as_json:
        click.echo(json.dumps({"run": run.to_dict(), "summary": [r.to_dict() for r in rows], "files": paths},
                              indent=2, default=str))
        return
    emit([{"method": r.method, "visual_layer": r.visual_layer, "judged": r.judged,
           "interpretable": r.interpretable, "%": f"{r.pct:.1f}", "95% CI": f"{r.ci_low:.1f}-{r.ci_high:.1f}"}
          for r in rows], "table")
    if paths:
        click.echo(f"wrote {paths[fmt]} and {paths['csv']}", err=True)
    elif not rows:
        click.echo(f"run '{run.name}' has no verdicts yet", err=True)


def _file_stem(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "eval"
