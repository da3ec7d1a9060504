"""Judges: does any of a method's words describe what is in a patch?

A judge is a class with a ``name``, the ``settings()`` it records with the
run (never a secret) and ``judge(task) -> Judgement``. Adding one is a few
lines::

    from latentlens.eval import Judge, Judgement, register

    @register
    class AlwaysYes(Judge):
        name = "always-yes"

        def judge(self, task):
            return Judgement(True, "concrete", answer={"why": "it says yes"})

and ``llens eval ... --judge always-yes`` (or, without registering,
``--judge mypkg.judges:AlwaysYes``). A judge never sees which method the
words come from.

Two ship with latentlens:

* ``openai-compatible``: any OpenAI-compatible chat endpoint (a local vLLM
  or llama.cpp server, or a hosted one) sees the image with the patch's
  region outlined, a crop of that region, and the words, and answers in JSON
  which words are concrete / abstract / global (in the spirit of the
  LatentLens paper's judge).
* ``labels``: offline, from region annotations (Visual-Genome style JSON
  lines ``{"image", "x", "y", "w", "h", "names"}``).
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from latentlens.errors import InputError, LatentLensError

if TYPE_CHECKING:
    from openai.types.chat import ChatCompletionMessageParam

CATEGORIES = ("concrete", "abstract", "global")


class JudgeError(LatentLensError):
    """The judge could not give a verdict (endpoint down, answers it cannot parse)."""


@dataclass
class JudgeTask:
    """What a judge is asked about: one patch of one image and one list of words."""

    image: Any  # PIL RGB image, original size
    image_name: str
    box: tuple[float, float, float, float]  # the patch, original pixels (x0, y0, x1, y1)
    region: tuple[float, float, float, float]  # the patch and its 8 neighbours, clipped to the image
    words: list[str]


@dataclass
class Judgement:
    interpretable: bool
    category: str | None = None  # concrete / abstract / global; None when not interpretable
    shown: dict = field(default_factory=dict)  # what the judge saw beyond the words and box
    answer: dict = field(default_factory=dict)  # what it answered


class Judge:
    """Base class: subclasses set ``name`` and implement ``judge``."""

    name: ClassVar[str] = ""

    def settings(self) -> dict:
        """What decides this judge's verdicts, recorded with the run (no secrets)."""
        return {}

    def prepare(self, image_names: list[str]) -> list[str]:
        """Check the chosen images before any is judged: raise InputError, or return warnings."""
        return []

    def judge(self, task: JudgeTask) -> Judgement:
        raise NotImplementedError


JUDGES: dict[str, type[Judge]] = {}


def register(cls: type[Judge]) -> type[Judge]:
    """Class decorator: make a judge available by its ``name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a name")
    JUDGES[cls.name] = cls
    return cls


def judge_class(name: str) -> type[Judge]:
    """A registered judge, or ``module:Class`` imported."""
    if name in JUDGES:
        return JUDGES[name]
    if ":" in name:
        mod, _, attr = name.partition(":")
        try:
            cls = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as e:
            raise InputError(f"cannot import judge '{name}': {e}") from None
        if not (isinstance(cls, type) and issubclass(cls, Judge)):
            raise InputError(f"'{name}' is not a latentlens.eval.Judge subclass")
        return cls
    raise InputError(f"unknown judge '{name}' (choose from {', '.join(sorted(JUDGES))}, or module:Class)")


def make_judge(name: str, **options: Any) -> Judge:
    """Build a judge from the options given (None values are left out)."""
    import inspect

    cls = judge_class(name)
    given = {k: v for k, v in options.items() if v is not None}
    params = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    extra = [k for k in given if k not in params and not takes_any]
    if extra:
        raise InputError(f"judge '{name}' takes no {', '.join('--' + k.replace('_', '-') for k in extra)}")
    missing = [k for k, p in params.items() if k != "self" and p.default is p.empty
               and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and k not in given]
    if missing:
        flags = {"model": "--judge-model", "annotations": "--annotations FILE", "url": "--url URL"}
        raise InputError(f"judge '{name}' needs {', '.join(flags.get(k, '--' + k.replace('_', '-')) for k in missing)}")
    try:
        return cls(**given)
    except TypeError as e:
        raise InputError(f"judge '{name}' cannot be built from these options: {e}") from None


# ---------------------------------------------------------------------------
# labels: offline, from region annotations


def _lemmatizer():
    try:
        import simplemma
    except ImportError:
        raise InputError("the labels judge lemmatises with simplemma: pip install 'latentlens-db[eval]'") from None
    return simplemma


def normalise_words(text: str, simplemma: Any) -> list[str]:
    """Case-folded, lemmatised word tokens of ``text`` (``Dogs`` -> ``dog``)."""
    return [simplemma.lemmatize(w, lang="en").casefold() for w in re.findall(r"[^\W_]+", text.casefold())]


@register
class LabelsJudge(Judge):
    """A patch's words are right when one matches a label of a region covering the patch.

    A region covers the patch when it holds at least ``cover`` (default half)
    of the patch's area. A word matches a label when, case-folded and
    lemmatised (simplemma, English), it equals the whole label or the
    label's last word (its head: "parked car" is matched by "car").
    """

    name = "labels"

    def __init__(self, annotations: str | Path, cover: float = 0.5):
        path = Path(annotations).expanduser()
        if not path.is_file():
            raise InputError(f"annotations file not found: {annotations}")
        path = path.resolve()
        self.path = path
        self.cover = float(cover)
        self._lemma = _lemmatizer()
        self.regions: dict[str, list[tuple[float, float, float, float, list[str]]]] = {}
        data = path.read_bytes()  # read once: parsed, and hashed for the run's settings
        self._sha = hashlib.sha256(data).hexdigest()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                box = (float(r["x"]), float(r["y"]), float(r["x"]) + float(r["w"]), float(r["y"]) + float(r["h"]))
                names = r["names"] if isinstance(r["names"], list) else [r["names"]]
                key = str(r["image"])
            except (ValueError, KeyError, TypeError) as e:
                raise InputError(f"{path}:{n}: not an annotation {{image, x, y, w, h, names}}: {e}") from None
            self.regions.setdefault(key, []).append((*box, [str(x) for x in names]))

    def settings(self) -> dict:
        return {"annotations": str(self.path), "annotations_sha256": self._sha, "cover": self.cover,
                "match": "lemma (simplemma en) equals the label or its last word"}

    def prepare(self, image_names: list[str]) -> list[str]:
        missing = [n for n in image_names if not self._regions_for(n)]
        if missing and len(missing) == len(image_names):
            raise InputError(
                f"none of the {len(image_names)} images has a region in {self.path.name} (first image: "
                f"{image_names[0]}; annotation images are matched by the listed path or the file name)")
        if missing:
            return [f"{len(missing)} of {len(image_names)} images have no region in {self.path.name} "
                    f"(e.g. {missing[0]}): their patches will count as not interpretable"]
        return []

    def _regions_for(self, image_name: str) -> list:
        if image_name in self.regions:
            return self.regions[image_name]
        return self.regions.get(Path(image_name).name, [])

    def judge(self, task: JudgeTask) -> Judgement:
        x0, y0, x1, y1 = task.box
        area = max(0.0, x1 - x0) * max(0.0, y1 - y0)
        labels: list[str] = []
        for rx0, ry0, rx1, ry1, names in self._regions_for(task.image_name):
            iw = max(0.0, min(x1, rx1) - max(x0, rx0))
            ih = max(0.0, min(y1, ry1) - max(y0, ry0))
            if area > 0 and iw * ih >= self.cover * area:
                labels.extend(names)
        targets: dict[str, str] = {}
        for label in labels:
            toks = normalise_words(label, self._lemma)
            if toks:
                targets.setdefault(" ".join(toks), label)
                targets.setdefault(toks[-1], label)
        matched = {}
        for w in task.words:
            toks = normalise_words(w, self._lemma)
            key = " ".join(toks)
            if key in targets:
                matched[w] = targets[key]
        return Judgement(
            interpretable=bool(matched), category="concrete" if matched else None,
            shown={"labels": sorted(set(labels))},
            answer={"matched": matched},
        )


# ---------------------------------------------------------------------------
# openai-compatible: a vision LLM as the judge

PROMPT = """You see an image with one region outlined in red, and (second image) a close-up crop of that region. Use the crop only if the region is hard to make out in the full image.

Here are candidate words that a method produced for this region: {words}

Sort the candidate words that fit into three kinds:
- concrete: names something visible in the region (an object or part, a colour, a texture or material, text or symbols, a shape or pattern);
- abstract: not visible but clearly related to what is in the region (an activity, a function, a quality, an emotion, an association);
- global: names something visible elsewhere in the image but not in the region.
Words that fit none of these are left out. Think about all three kinds before you answer.

Answer with one JSON object and nothing else:
{{"reasoning": "<one or two sentences>", "concrete_words": [...], "abstract_words": [...], "global_words": [...]}}"""

PROMPT_ID = "latentlens-judge-v1"
MAX_SIDE = 512  # the full image is sent at most this large
MIN_CROP_SIDE = 128  # a small crop is enlarged to at least this


class MalformedAnswer(ValueError):
    pass


def parse_answer(text: str, words: list[str]) -> dict:
    """The judge's JSON, validated: the three lists keep only candidate words (case-insensitive)."""
    if not isinstance(text, str):
        raise MalformedAnswer("empty answer")
    obj = _answer_object(text)
    allowed = {w.casefold(): w for w in words}
    out: dict[str, Any] = {"reasoning": str(obj.get("reasoning", ""))[:2000]}
    for c in CATEGORIES:
        got = obj.get(f"{c}_words", [])
        if got is None:
            got = []
        if not isinstance(got, list) or not all(isinstance(w, str) for w in got):
            raise MalformedAnswer(f"{c}_words is not a list of strings")
        out[f"{c}_words"] = [allowed[w.strip().casefold()] for w in got if w.strip().casefold() in allowed]
        dropped = [w for w in got if w.strip().casefold() not in allowed]
        if dropped:
            out.setdefault("ignored_words", []).extend(dropped)
    return out


def _answer_object(text: str) -> dict:
    """The first JSON object in the text that has a *_words key (reasoning models may think in braces first)."""
    decoder = json.JSONDecoder()
    found_json = False
    at = text.find("{")
    while at >= 0:
        try:
            obj, _end = decoder.raw_decode(text, at)
        except json.JSONDecodeError:
            obj = None
        if isinstance(obj, dict):
            found_json = True
            if any(f"{c}_words" in obj for c in CATEGORIES):
                return obj
        at = text.find("{", at + 1)
    if found_json:
        raise MalformedAnswer("the answer has none of concrete_words, abstract_words, global_words")
    raise MalformedAnswer("no JSON object in the answer")


def draw_region(image: Any, region: tuple[float, float, float, float]) -> Any:
    """The image (at most MAX_SIDE) with the region outlined in red over a light red tint."""
    from PIL import Image, ImageDraw

    img = image.convert("RGB")
    scale = min(1.0, MAX_SIDE / max(img.size))
    if scale < 1.0:
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                         Image.Resampling.LANCZOS)
    x0, y0, x1, y1 = (v * scale for v in region)
    overlay = Image.new("RGBA", img.size, (0, 0, 0, 0))
    ImageDraw.Draw(overlay).rectangle([x0, y0, x1 - 1, y1 - 1], fill=(255, 0, 0, 30))
    img = Image.alpha_composite(img.convert("RGBA"), overlay).convert("RGB")
    ImageDraw.Draw(img).rectangle([x0, y0, x1 - 1, y1 - 1], outline=(255, 0, 0), width=3)
    return img


def crop_region(image: Any, region: tuple[float, float, float, float]) -> Any:
    from PIL import Image

    x0, y0, x1, y1 = (round(v) for v in region)
    crop = image.convert("RGB").crop((x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)))
    short = min(crop.size)
    if short < MIN_CROP_SIDE:
        f = MIN_CROP_SIDE / short
        crop = crop.resize((round(crop.width * f), round(crop.height * f)), Image.Resampling.BICUBIC)
    return crop


def _data_url(img: Any) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


@register
class OpenAICompatibleJudge(Judge):
    """A vision chat model behind an OpenAI-compatible endpoint (the official ``openai`` client).

    Transport errors, 429 and 5xx are retried with exponential backoff by the
    client (``max_retries``); an answer that does not parse is asked again
    (``parse_retries``); after that the judge fails and the run stays resumable.
    """

    name = "openai-compatible"

    def __init__(self, url: str, model: str, api_key_env: str | None = None, timeout: float = 120.0,
                 max_retries: int = 4, parse_retries: int = 2, temperature: float | None = None,
                 max_tokens: int = 1000):
        try:
            import openai
        except ImportError:
            raise InputError("the openai-compatible judge needs the openai client: "
                             "pip install 'latentlens-db[eval]'") from None
        if not url or not model:
            raise InputError("the openai-compatible judge needs --url and --judge-model")
        key = "not-needed"
        if api_key_env:
            key = os.environ.get(api_key_env, "")
            if not key:
                raise InputError(f"the API key variable ${api_key_env} is not set")
        self.url, self.model, self.api_key_env = url, model, api_key_env
        self.temperature, self.max_tokens, self.parse_retries = temperature, int(max_tokens), int(parse_retries)
        self.max_retries = int(max_retries)
        self._openai = openai
        self.client = openai.OpenAI(base_url=url, api_key=key, max_retries=self.max_retries, timeout=timeout)

    def settings(self) -> dict:
        return {"url": self.url, "model": self.model, "api_key_env": self.api_key_env,
                "temperature": self.temperature, "max_tokens": self.max_tokens, "prompt": PROMPT_ID}

    def messages(self, task: JudgeTask) -> list[ChatCompletionMessageParam]:
        text = PROMPT.format(words=json.dumps(task.words, ensure_ascii=False))
        return [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": _data_url(draw_region(task.image, task.region))}},
            {"type": "text", "text": text},
            {"type": "image_url", "image_url": {"url": _data_url(crop_region(task.image, task.region))}},
        ]}]

    def judge(self, task: JudgeTask) -> Judgement:
        messages = self.messages(task)
        kw: dict[str, Any] = {"max_tokens": self.max_tokens}
        if self.temperature is not None:
            kw["temperature"] = self.temperature
        shown = {"prompt": PROMPT_ID, "region": [round(v, 2) for v in task.region], "images": ["full+region", "crop"]}
        problems = []
        for _attempt in range(self.parse_retries + 1):
            try:
                resp = self.client.chat.completions.create(model=self.model, messages=messages, **kw)
            except self._openai.APIError as e:
                raise JudgeError(f"judge endpoint {self.url} failed: {_one_line(e)}") from None
            text = resp.choices[0].message.content if resp.choices else None
            try:
                parsed = parse_answer(text or "", task.words)
            except MalformedAnswer as e:
                problems.append(str(e))
                continue
            category = next((c for c in CATEGORIES if parsed[f"{c}_words"]), None)
            return Judgement(interpretable=category is not None, category=category, shown=shown,
                             answer={"text": text, "parsed": parsed, "malformed_before": problems})
        raise JudgeError(f"judge {self.model} gave {len(problems)} answers that do not parse "
                         f"(last: {problems[-1]})")


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:300] if lines else type(e).__name__
