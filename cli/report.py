"""`llens report`: an HTML + PNG report of what each image patch means."""

from __future__ import annotations

import json
from typing import Any

import click
from latentlens.cli._common import (
    database_option,
    handle_errors,
    parse_int_list,
)


@click.command()
@click.argument("model", required=False)
@click.option("--image", type=click.Path(exists=True, dir_okay=False),
              help="The image to read (any format Pillow opens).")
@click.option("--analysis", "analysis_id", type=int,
              help="Render a saved image analysis instead (no model is loaded; see `llens analyses`).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Directory for report.html and report.png (created if missing).")
@click.option("--visual-layers", metavar="L[,L...]",
              help="LLM layers of the visual tokens, 0 = projector output (default: the stored layers).")
@click.option("--layers", metavar="L[,L...]", help="Stored (contextual) layers to search (default: all).")
@click.option("-k", "--top-k", "k", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--patches", default="all", show_default=True,
              help='Patches to query: all, center, or "r,c;r,c".')
@click.option("--sample", type=click.IntRange(min=1), help="Query N random patches of those.")
@click.option("--seed", type=int, default=0, show_default=True, help="With --sample: random seed.")
@click.option("--prompt", help='Text around the image (default: "Describe this image in detail.").')
@click.option("--resolution", help="Fix the input size, e.g. 448 (Qwen2-VL: 16x16 tokens) or 448x336.")
@click.option("--method", "method", default="latentlens", show_default=True, metavar="M[,M...]",
              help="latentlens (contextual neighbours from the store), logitlens (final norm + LM head: "
                   "top tokens with probability), embeddinglens (cosine with the input embeddings), "
                   "or all; the page has a tab per method. The baselines need only the model: "
                   "without latentlens no database is used.")
@click.option("--png-layer", type=int, help="Visual layer drawn in report.png (default: the first).")
@click.option("--png-method", metavar="M",
              help="Method whose top-1 words label report.png (default: the first of --method).")
@click.option("--exact", is_flag=True, help="Always exact search (the default already is for visual tokens).")
@click.option("--device", help="torch device for the VLM (default: cuda if available, else cpu).")
@click.option("--dtype", default="float32", show_default=True,
              type=click.Choice(["float32", "bfloat16", "float16"]), help="VLM weights dtype.")
@click.option("--compare", "compare_model", metavar="MODEL_B",
              help="Also write compare.html: the same image through MODEL_B, side by side (per patch: both "
                   "top-k lists and the words they share). --patches/--sample choose MODEL's cells; MODEL_B reads "
                   "its whole grid and each cell is shown beside B's patch under its centre.")
@click.option("--compare-layers", metavar="A,B",
              help="compare.html: visual layer A against visual layer B (with --compare: A of MODEL, B of MODEL_B).")
@click.option("--compare-methods", metavar="M1,M2", help="compare.html: method M1 against method M2, same layer.")
@click.option("--save", is_flag=True, help="Also save the result as an analysis the team can reopen.")
@click.option("--title", help="With --save: a title for the analysis.")
@click.option("--json", "as_json", is_flag=True, help="Print the written paths and a summary as JSON.")
@database_option
@handle_errors
def report(model: str | None, image: str | None, analysis_id: int | None, out_dir: str, visual_layers: str | None, layers: str | None,
           k: int, patches: str, sample: int | None, seed: int, prompt: str | None,
           resolution: str | None, method: str, png_layer: int | None, png_method: str | None,
           exact: bool, device: str | None, dtype: str, compare_model: str | None, compare_layers: str | None,
           compare_methods: str | None, save: bool, title: str | None, as_json: bool,
           database_url: str | None) -> None:
    """Write report.html and report.png: each image patch's nearest contextual words.

    MODEL is a vision-language model whose language model was ingested under
    this name (`llens ingest MODEL corpus.txt`). report.html is one offline
    file: the patch grid over the image, a visual-layer selector, a tab per
    method, and per patch its neighbours with their sentences (LogitLens and
    EmbeddingLens: vocabulary tokens with their probability or cosine).
    report.png labels each patch with its top-1 word (a legible subset when
    the grid is dense). Without latentlens in --method, MODEL may be any
    loadable VLM (a local dir, a hub id), no database is needed, and
    --visual-layers is required unless the store knows MODEL.

    --compare MODEL_B, --compare-layers A,B or --compare-methods M1,M2 also
    write compare.html: two views of the image side by side, per patch both
    top-k lists and the words they share (see docs/vlm.md).

    \b
    Examples:
        llens report Qwen/Qwen2-VL-7B-Instruct --image photo.jpg --out report/
        llens report Qwen/Qwen2-VL-7B-Instruct --image photo.jpg --out report/ \\
            --visual-layers 0,8,16 --resolution 448 -k 5
        llens report llava-1.5-7b-hf --image dog.jpg --out dog/ --sample 64 --seed 1
        llens report llava-1.5-7b-hf --image dog.jpg --out dog/ --method all
        llens report ./tiny-llava --image dog.jpg --out dog/ --visual-layers 0,2 \\
            --method logitlens,embeddinglens
        llens report llava-1.5-7b-hf --image dog.jpg --out dog/ --save --title "dog"
        llens report --analysis 12 --out dog/       # a saved analysis, without the model
        llens report llava-1.5-7b-hf --image dog.jpg --out dog/ --compare-layers 8,16
        llens report llava-1.5-7b-hf --image dog.jpg --out dog/ --method all \
            --visual-layers 16 --compare-methods latentlens,logitlens
        llens report llava-1.5-7b-hf --image dog.jpg --out dog/ --compare llava-v1.6-mistral-7b-hf \
            --visual-layers 16
        llens report --analysis 12 --out dog/ --compare-layers 0,8
    """
    from latentlens.compare import parse_pair
    from latentlens.images import load_image
    from latentlens.lenses import METHODS, parse_methods
    from latentlens.vlm.query import query_image

    cmp_layers = parse_int_list(",".join(parse_pair(compare_layers, "--compare-layers")),
                                "--compare-layers") if compare_layers else None
    cmp_methods = [m.lower() for m in parse_pair(compare_methods, "--compare-methods")] if compare_methods else None
    if cmp_methods is not None and (len(set(cmp_methods)) != 2 or not set(cmp_methods) <= set(METHODS)):
        raise click.BadParameter(f"give two different methods of {', '.join(METHODS)}", param_hint="--compare-methods")
    if analysis_id is not None:
        if model or image or save or compare_model:
            raise click.UsageError("--analysis renders a saved analysis: give no MODEL, --image, --save or --compare")
        result, img = _saved(analysis_id, database_url)
        cmp = _comparison(result, None, cmp_layers, cmp_methods, png_layer, png_method) \
            if (cmp_layers or cmp_methods) else None
        _write(result, img, out_dir, png_layer, png_method, as_json, cmp)
        return
    if not model or not image:
        raise click.UsageError("give MODEL and --image (or --analysis ID)")
    if title and not save:
        raise click.UsageError("--title needs --save")
    methods = parse_methods(method)
    if png_method is not None and png_method.strip().lower() not in methods:
        raise click.BadParameter(f"{png_method!r} is not one of --method ({', '.join(methods)})",
                                 param_hint="--png-method")
    if cmp_methods is not None and not set(cmp_methods) <= set(methods):
        raise click.BadParameter(f"both must be among --method ({', '.join(methods)})",
                                 param_hint="--compare-methods")
    vls = parse_int_list(visual_layers, "--visual-layers")
    vls_b = vls
    if cmp_layers is not None:  # the compared layers are computed whatever --visual-layers says
        if compare_model:
            vls, vls_b = sorted({*(vls or []), cmp_layers[0]}), sorted({*(vls or []), cmp_layers[1]})
        else:
            vls = sorted({*(vls or []), *cmp_layers})
    if png_layer is not None and vls is not None and png_layer not in vls:
        raise click.BadParameter(f"{png_layer} is not one of --visual-layers", param_hint="--png-layer")
    img = load_image(image)
    common: dict[str, Any] = dict(k=k, patches=patches, sample=sample, seed=seed, prompt=prompt, resolution=resolution,
                  device=device, dtype=dtype, methods=methods)
    # --patches / --sample name MODEL's cells; on MODEL_B's grid the same (row, col) is another place,
    # so B reads its whole grid and the comparison takes B's patch under each cell's centre
    common_b = {**common, "patches": "all", "sample": None}
    if "latentlens" not in methods:
        from latentlens.query import baseline_vlm_source

        source, vls = baseline_vlm_source(model, vls, database_url)
        if png_layer is not None and png_layer not in vls:
            raise click.BadParameter(f"{png_layer} is not one of the visual layers ({', '.join(map(str, vls))})",
                                     param_hint="--png-layer")
        result = query_image(None, source, img, visual_layers=vls, **common)
        result_b = None
        if compare_model:
            source_b, vls_b = baseline_vlm_source(compare_model, vls_b, database_url)
            result_b = query_image(None, source_b, img, visual_layers=vls_b, **common_b)
    else:
        from latentlens.query import Lens

        with Lens.connect(database_url) as lens:
            searched = parse_int_list(layers, "--layers")
            result = query_image(lens, model, img, visual_layers=vls, layers=searched, exact=exact or None, **common)
            # MODEL_B has its own stored layers: --layers (of MODEL) does not apply to it
            result_b = query_image(lens, compare_model, img, visual_layers=vls_b, exact=exact or None,
                                   **common_b) if compare_model else None
    cmp = _comparison(result, result_b, cmp_layers, cmp_methods, png_layer, png_method) \
        if (compare_model or cmp_layers or cmp_methods) else None
    if save:
        from pathlib import Path

        from latentlens.cli._common import open_store

        from latentlens import analyses

        params = {"methods": methods, "k": k, "visual_layers": result.visual_layers, "layers": layers,
                  "patches": patches, "sample": sample, "seed": seed, "prompt": prompt,
                  "resolution": resolution}
        with open_store(database_url) as store:
            aid = analyses.save_image(store, result, Path(image).read_bytes(), image_name=Path(image).name,
                                      params={k_: v for k_, v in params.items() if v is not None}, title=title)
        click.echo(f"saved as analysis {aid} (llens report --analysis {aid} --out DIR)", err=True)
    _write(result, img, out_dir, png_layer, png_method, as_json, cmp)


def _comparison(result, result_b, cmp_layers, cmp_methods, png_layer, png_method):
    """The two views: layers A,B and/or methods M1,M2 of one result, or the same view of two models."""
    from latentlens.compare import Side, compare, paired_layer
    from latentlens.report import result_methods

    layer = png_layer if png_layer is not None else result.layers[0].visual_layer
    method = (png_method or result_methods(result)[0]).strip().lower()
    left_layer, right_layer = cmp_layers or (layer, layer)
    left_method, right_method = cmp_methods or (method, method)
    right = result_b if result_b is not None else result
    if result_b is not None and cmp_layers is None:
        right_layer = paired_layer(right_layer, right)
    return compare(Side(result, left_layer, left_method), Side(right, right_layer, right_method))


def _saved(analysis_id: int, database_url: str | None):
    from latentlens.cli._common import open_store

    from latentlens import analyses

    with open_store(database_url) as store:
        result, img, _ = analyses.load_image_analysis(store, analysis_id)
    return result, img


def _write(result, img, out_dir, png_layer, png_method, as_json, cmp=None) -> None:
    from latentlens.report import write_report

    paths = write_report(result, img, out_dir, png_layer=png_layer, png_method=png_method)
    if cmp is not None:
        from latentlens.compare import write_compare

        paths["compare"] = write_compare(cmp, img, out_dir)
    if as_json:
        summary = {
            "html": str(paths["html"]), "png": str(paths["png"]), "model": result.model,
            "grid": list(result.grid), "patches": len(result.layers[0].patches),
            "visual_layers": result.visual_layers, "searched_layers": result.searched_layers,
            "methods": list(result.methods),
        }
        if cmp is not None:
            summary["compare"] = {"html": str(paths["compare"]), **cmp.to_dict()}
        click.echo(json.dumps(summary, indent=2))
    else:
        rows, cols = result.grid
        click.echo(f"{rows}x{cols} visual tokens, {len(result.layers[0].patches)} queried, "
                   f"visual layers {', '.join(map(str, result.visual_layers))}, "
                   f"methods {', '.join(result.methods)}")
        click.echo(f"Wrote {paths['html']}")
        click.echo(f"Wrote {paths['png']}")
        if cmp is not None:
            click.echo(f"Wrote {paths['compare']} ({cmp.left.label} vs {cmp.right.label}: "
                       f"{cmp.mean_overlap:.2f} of {cmp.k} words shared per patch)")
            if cmp.grid_note:
                click.echo(cmp.grid_note)

