"""The ``captum-vlm`` command.

    captum-vlm explain IMAGE --text "a red circle" --text "a blue square" \\
        [--model zoo:shapes-clip|PATH] [--method grad-eclip ...] --out report.html [--png DIR]
    captum-vlm zoo list
    captum-vlm demo [--out DIR]
    captum-vlm lens IMAGES... --text "a red circle" [--captions captions.tsv] --model zoo:shapes-clip \\
        --out lens.html [--projector LOGDIR]
    captum-vlm lens-inside logit-lens IMAGE... --model zoo:shapes-blip-vqa --text "what color is the circle?"
    captum-vlm lens-inside probe --scenes 100 --label colour [--where patches] [--model zoo:shapes-clip]
    captum-vlm lens-inside heads IMAGE [--model zoo:shapes-clip] [--stream vision] [--out heads.html]
    captum-vlm lens-inside ablate --scenes 50 | --data FOLDER [--model zoo:shapes-clip] [--mode mean]
    captum-vlm audit FOLDER --text "a red circle" --text "a blue square" [--engine ray] --out audit/
    captum-vlm audit FOLDER --model zoo:shapes-blip-vqa [--question "what color is the circle?"] --out audit/

Bad input (image path, unreadable image, unknown method or model) prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

DEFAULT_MODEL = "zoo:shapes-clip"
DEMO_TEXTS = ("a red circle", "a blue square", "a yellow triangle", "a green circle")


class UsageError(Exception):
    """A problem with what the user asked for: one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    from captum_vlm.explain import METHODS

    methods = "\n".join(f"  {name:<22} {spec.summary}" for name, spec in METHODS.items())
    parser = argparse.ArgumentParser(
        prog="captum-vlm",
        description="Explain vision-language models (CLIP, SigLIP, BLIP, ViLT, LLaVA) with Captum.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        '  captum-vlm explain photo.png --text "a red circle" --text "a blue square" --out report.html\n'
        "  captum-vlm zoo list\n  captum-vlm demo --out demo-output",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{explain,zoo,demo,lens,lens-inside,audit}")

    explain = sub.add_parser(
        "explain",
        help="explain an image against texts; writes an HTML report",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run one or more attribution methods and write a self-contained HTML report.",
        epilog=f"methods:\n{methods}",
    )
    explain.add_argument("image", help="path of the image (PNG, JPEG, ...)")
    explain.add_argument("--text", action="append", required=True, metavar="TEXT",
                         help="a prompt, caption or (VQA models) question; repeat for several")
    explain.add_argument("--model", default=DEFAULT_MODEL,
                         help=f"zoo:NAME for a bundled model or a local checkpoint folder (default {DEFAULT_MODEL})")
    explain.add_argument("--method", action="append", metavar="NAME",
                         help="attribution method; repeat for several (default: the zoo benchmark's most faithful "
                         "for the model's family: relevancy for CLIP, grad-eclip for SigLIP, bimodal-relevancy for "
                         "BLIP/ViLT/LLaVA)")
    explain.add_argument("--target", type=int, action="append", metavar="K",
                         help="index of a text to explain; repeat for several (default: all)")
    explain.add_argument("--out", default="report.html", help="HTML report to write (default report.html)")
    explain.add_argument("--png", metavar="DIR", help="also save one PNG per map and explanation.json here")
    explain.add_argument("--logit-lens", action="store_true", help="models with a language decoder: add the logit "
                         "lens of each explained caption or answer to the report")
    explain.add_argument("--processor-option", action="append", default=[], metavar="NAME=VALUE",
                         help="an option of the processor call, VALUE read as JSON where it parses (e.g. "
                              "do_pan_and_scan=true for Gemma 3); repeat for several")
    explain.add_argument("--quiet", action="store_true", help="no progress bar")

    zoo = sub.add_parser("zoo", help="the bundled models")
    zoo.add_argument("action", choices=["list"], help="list: name and description of each bundled model")

    demo = sub.add_parser("demo", help="explain the bundled zoo model on a bundled scene")
    demo.add_argument("--out", default="demo-output", help="folder for the report and PNGs (default demo-output)")
    add_lens_parser(sub)
    add_lens_inside_parser(sub)
    add_audit_parser(sub)
    return parser


def add_audit_parser(sub) -> None:
    """``captum-vlm audit``: every image of a folder, records in Parquet, an HTML report."""
    audit = sub.add_parser("audit", help="audit a folder of images; writes Parquet records and a report",
                           description="Explain every image of a folder (labels from its labels.csv or "
                           "labels.jsonl: file, label, optionally mask, box, question) against the prompts "
                           "(two-tower models, --text) or through the model's answer to each image's question "
                           "(VQA models: the labels file's question column, else --question; a label is the "
                           "expected answer), write one record per image to OUT/records/*.parquet and "
                           "OUT/report.html. Run it again with the same --out to resume.")
    audit.add_argument("data", help="folder of images")
    audit.add_argument("--text", action="append", metavar="TEXT",
                       help="two-tower models: a prompt (class); repeat for several (at least 2)")
    audit.add_argument("--question", metavar="TEXT",
                       help="VQA models: the question asked of images whose labels-file row has none")
    audit.add_argument("--model", default=DEFAULT_MODEL, help=f"zoo:NAME or a local checkpoint (default {DEFAULT_MODEL})")
    audit.add_argument("--method", action="append", metavar="NAME",
                       help="attribution method; repeat (default grad-eclip; VQA models: the family's default, "
                       "bimodal-relevancy for BLIP and ViLT)")
    audit.add_argument("--check", action="append", choices=["deletion", "grounding"],
                       help="per-map check; repeat (default both)")
    audit.add_argument("--no-checks", action="store_true", help="map summaries only")
    audit.add_argument("--engine", choices=["local", "ray"], default="local", help="local (default) or ray")
    audit.add_argument("--batch-size", type=int, default=16, help="images per batch (default 16)")
    audit.add_argument("--concurrency", type=int, default=1, help="ray: number of actors (default 1)")
    audit.add_argument("--num-cpus", type=float, default=1, help="ray: CPUs per actor (default 1)")
    audit.add_argument("--num-gpus", type=float, default=0, help="ray: GPUs per actor (default 0)")
    audit.add_argument("--address", help="ray: address of a running cluster (default: start a local one)")
    audit.add_argument("--keep-maps", action="store_true", help="store every map's grid in the records")
    audit.add_argument("--out", default="audit", help="output folder (default audit)")
    audit.add_argument("--quiet", action="store_true", help="no progress bar")


def run_audit(args) -> str:
    from captum_vlm.audit import audit
    from captum_vlm.explain import METHODS

    if not Path(args.data).is_dir():
        raise UsageError(f"data folder not found: {args.data}")
    if args.text and args.question is not None:
        raise UsageError("--text and --question: give prompts (--text, two-tower models) or a question "
                         "(--question, VQA models), not both")
    unknown = [m for m in args.method or [] if m not in METHODS]
    if unknown:
        raise UsageError(f"methods: unknown {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if args.question is None and len(args.text or []) == 1:
        raise UsageError(f"texts: expected at least 2 prompts (repeat --text), got {args.text}")
    model, processor = load_model(args.model)
    texts, default_methods = _audit_texts(args, model)
    checks = () if args.no_checks else tuple(args.check or ("deletion", "grounding"))
    try:
        result = audit(model, processor, args.data, texts, methods=args.method or default_methods, checks=checks,
                       engine=args.engine, batch_size=args.batch_size, output=args.out, keep_maps=args.keep_maps,
                       concurrency=args.concurrency, num_cpus=args.num_cpus, num_gpus=args.num_gpus,
                       address=args.address,
                       model_name=args.model.removeprefix("zoo:"), show_progress=not args.quiet)
    except (ValueError, TypeError, ImportError) as err:
        raise UsageError(str(err).splitlines()[0]) from err
    report = Path(args.out) / "report.html"
    result.to_html(report)
    errors = len(result.errors())
    return f"audited {len(result)} images ({errors} errors): records in {Path(args.out) / 'records'}, report {report}"


def _audit_texts(args, model) -> tuple[list[str], list[str]]:
    """What ``cv.audit`` is given as ``texts`` from ``--text``/``--question``, and the default
    methods: two-tower models their prompts (grad-eclip); VQA models ``[question]`` or ``[]``
    (each row's own question from the labels file), the family's default method."""
    from captum_vlm.adapters import get_adapter
    from captum_vlm.audit.sources import rows_from

    try:
        adapter = get_adapter(model)
    except TypeError as err:
        raise UsageError(str(err).splitlines()[0]) from err
    if not adapter.answers_questions:
        if args.question is not None:
            raise UsageError(f"--question: {type(model).__name__} does not answer questions; give its prompts "
                             "with --text")
        if len(args.text or []) < 2:
            raise UsageError(f"texts: expected at least 2 prompts (repeat --text), got {args.text or []}")
        return list(args.text), ["grad-eclip"]
    if args.text:
        raise UsageError(f"--text: {type(model).__name__} answers questions; ask with --question or a question "
                         "column in the labels file")
    if args.question is None:
        try:
            rows = rows_from(args.data)
        except (ValueError, TypeError) as err:
            raise UsageError(str(err).splitlines()[0]) from err
        missing = [r["id"] for r in rows if not r["question"]]
        if missing:
            raise UsageError(f"--question: no question to ask {', '.join(missing[:3])} (no 'question' in the "
                             "labels file); pass --question")
    return ([] if args.question is None else [args.question]), list(adapter.default_methods[:1]) or ["grad-eclip"]


def load_model(spec: str):
    """``zoo:NAME`` or a local folder -> ``(model, processor)``."""
    from captum_vlm import zoo

    if spec.startswith("zoo:"):
        name = spec[4:]
        if name not in zoo.list_models():
            raise UsageError(f"unknown zoo model {name!r}; available: {', '.join(zoo.list_models()) or 'none'}")
        return _quietly(zoo.load, name)
    path = Path(spec)
    if not path.is_dir():
        raise UsageError(f"model {spec!r} is neither zoo:NAME nor a local checkpoint folder")
    try:
        return _quietly(zoo.load, path)
    except Exception as err:  # noqa: BLE001 - any loader failure is the user's model, one line
        raise UsageError(f"cannot load model from {spec}: {err}") from err


def _quietly(load, *args):
    """Load without transformers' progress bars, so errors stay one line (restored after)."""
    from transformers.utils import logging

    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        return load(*args)
    finally:
        if was_enabled:
            logging.enable_progress_bar()


def open_image(path: str):
    from PIL import Image, UnidentifiedImageError

    if not Path(path).is_file():
        raise UsageError(f"image not found: {path}")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise UsageError(f"cannot read image {path}: {err}") from err


def check_outputs(out: str, png_dir: str | None) -> None:
    """Refuse output paths that cannot be written, before any work is done."""
    out_path = Path(out)
    if out_path.is_dir():
        raise UsageError(f"--out {out} is a directory; give a file name, e.g. {out_path / 'report.html'}")
    if out_path.parent.exists() and not out_path.parent.is_dir():
        raise UsageError(f"--out {out}: {out_path.parent} is a file, not a folder")
    if png_dir is not None and Path(png_dir).exists() and not Path(png_dir).is_dir():
        raise UsageError(f"--png {png_dir} is a file; give a folder for the PNGs")


def check_request(texts: list[str], targets: list[int] | None) -> None:
    """Texts and target indices that cannot work, refused before the model is loaded."""
    from captum_vlm._checks import check_texts

    try:
        check_texts(texts, name="--text")
    except ValueError as err:
        raise UsageError(str(err)) from err
    bad = [t for t in targets or [] if not 0 <= t < len(texts)]
    if bad:
        raise UsageError(f"--target {bad} out of range for {len(texts)} texts (0..{len(texts) - 1})")


def processor_options(items: list[str]) -> dict:
    """``["do_pan_and_scan=true", "size=..."]`` as ``{"do_pan_and_scan": True, ...}``: each
    value read as JSON where it parses, else kept as the string."""
    found = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise UsageError(f"--processor-option {item!r}: expected NAME=VALUE, such as do_pan_and_scan=true")
        try:
            found[name.strip()] = json.loads(value)
        except json.JSONDecodeError:
            found[name.strip()] = value
    return found


def run_explain(image_path: str, texts: list[str], model_spec: str, methods: list[str] | None,
                targets: list[int] | None, out: str, png_dir: str | None, quiet: bool,
                logit_lens: bool = False, options: list[str] = ()) -> Path:
    from captum_vlm.adapters import get_adapter
    from captum_vlm.explain import METHODS, explain

    unknown = [m for m in methods or [] if m not in METHODS]
    if unknown:
        raise UsageError(f"unknown method {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    check_outputs(out, png_dir)
    check_request(texts, targets)
    processor_kwargs = processor_options(list(options))
    image = open_image(image_path)
    model, processor = load_model(model_spec)
    try:
        get_adapter(model)
    except TypeError as err:
        raise UsageError(str(err)) from err
    try:
        explanation = explain(model, processor, image, texts, methods=methods or None, target=targets,
                              model_name=model_spec.removeprefix("zoo:"), show_progress=not quiet,
                              logit_lens=logit_lens, processor_kwargs=processor_kwargs)
    except (ValueError, TypeError) as err:
        raise UsageError(str(err)) from err
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    explanation.to_html(out_path)
    if png_dir:
        explanation.save(png_dir)
    return out_path, explanation


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    try:
        if args.command == "zoo":
            from captum_vlm import zoo

            for name, description in zoo.list_models().items():
                print(f"{name:<20} {description}")
            return 0
        if args.command == "demo":
            return run_demo(args.out)
        if args.command == "audit":
            print(run_audit(args))
            return 0
        if args.command == "lens":
            return run_lens(args)
        if args.command == "lens-inside":
            out = run_lens_inside(args)
            print(f"wrote {out}")
            return 0
        out, _ = run_explain(args.image, args.text, args.model, args.method, args.target, args.out, args.png,
                             args.quiet, args.logit_lens, args.processor_option)
        print(f"wrote {out}" + (f" and PNGs in {args.png}" if args.png else ""))
        return 0
    except UsageError as err:
        print(f"captum-vlm: error: {err}", file=sys.stderr)
        return 2


def run_demo(out_dir: str) -> int:
    """Explain the bundled ``shapes-clip`` on the bundled scene with every two-tower method."""
    from importlib.resources import files

    from captum_vlm.explain import method_names

    scene = files("captum_vlm.zoo") / "assets" / "demo-scene.png"
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out_dir} is a file; give a folder for the demo's report and PNGs")
    report, explanation = run_explain(str(scene), list(DEMO_TEXTS), DEFAULT_MODEL, method_names("clip"), None,
                                      str(out / "report.html"), str(out), quiet=False)
    print(f"demo: shapes-clip explained on {scene.name} against {len(DEMO_TEXTS)} prompts")
    for line in demo_summary(explanation):
        print(f"demo: {line}")
    print(f"demo: open {report.resolve()} in a browser; PNGs and explanation.json are in {out.resolve()}")
    return 0


# ----- captum-vlm lens: image-text alignment report ------------------------------------------


def add_lens_parser(sub) -> None:
    """The ``lens`` subcommand: embed images and texts, write the alignment report."""
    lens = sub.add_parser(
        "lens",
        help="how images and texts align: similarity matrix, retrieval, projections (HTML report)",
        description="Embed images and texts in the model's joint space and write a self-contained HTML "
        "report: similarity matrix, retrieval lists, modality gap and projections.",
        epilog="captions.tsv: one line per image, IMAGE<TAB>CAPTION (IMAGE as given or its file name);\n"
        "images listed only there are read relative to the TSV's folder.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    lens.add_argument("images", nargs="*", metavar="IMAGES", help="image files or folders of images")
    lens.add_argument("--text", action="append", default=[], metavar="TEXT", help="a text; repeat for several")
    lens.add_argument("--captions", metavar="TSV", help="IMAGE<TAB>CAPTION lines: the true pairs")
    lens.add_argument("--model", default=DEFAULT_MODEL, help=f"zoo:NAME or a local checkpoint (default {DEFAULT_MODEL})")
    lens.add_argument("--out", default="lens.html", help="HTML report to write (default lens.html)")
    lens.add_argument("--projector", metavar="LOGDIR", help="also write a TensorBoard Projector export here")
    lens.add_argument("--projection", action="append", choices=["pca", "tsne", "umap"],
                      help="projection to draw; repeat for several (default pca and tsne)")
    lens.add_argument("--scale", default="cosine", choices=["cosine", "logits", "softmax", "sigmoid"],
                      help="similarity scale of the matrix and retrieval lists (default cosine)")
    lens.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    lens.add_argument("--quiet", action="store_true", help="no progress bar")


def _lens_images(paths: list[str]) -> list[Path]:
    from captum_vlm.lens.embed import IMAGE_SUFFIXES

    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise UsageError(f"folder {path} holds no images")
            found += files
        elif path.is_file():
            found.append(path)
        else:
            raise UsageError(f"image not found: {path}")
    return found


def _lens_captions(tsv: str, images: list[Path]) -> tuple[list[Path], list[str]]:
    """Images (those given, plus any listed only in the TSV) and the caption of each."""
    path = Path(tsv)
    if not path.is_file():
        raise UsageError(f"captions file not found: {tsv}")
    table: dict[str, str] = {}
    listed: list[Path] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if line.count("\t") != 1 or not all(part.strip() for part in line.split("\t")):
            raise UsageError(f"{tsv} line {number}: expected IMAGE<TAB>CAPTION, got {line[:60]!r}")
        name, caption = (part.strip() for part in line.split("\t"))
        table[name] = caption
        listed.append(Path(name) if Path(name).is_absolute() else path.parent / name)
    if not images:
        missing = [str(p) for p in listed if not p.is_file()]
        if missing:
            raise UsageError(f"image not found: {missing[0]} (listed in {tsv})")
        images = listed
    captions = []
    for image in images:
        caption = table.get(str(image), table.get(image.name))
        if caption is None:
            for name, text in table.items():
                if Path(name).name == image.name:
                    caption = text
        if caption is None:
            raise UsageError(f"{tsv} has no caption for image {image}")
        captions.append(caption)
    return images, captions


def run_lens(args) -> int:
    """``captum-vlm lens``: embed, write the HTML report (and the Projector export)."""
    from captum_vlm import lens

    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    images = _lens_images(args.images)
    texts = list(args.text)
    pairs = None
    if args.captions:
        images, captions = _lens_captions(args.captions, images)
        texts += [c for c in dict.fromkeys(captions) if c not in texts]
        pairs = [texts.index(c) for c in captions]
    if not images:
        raise UsageError("no images: give image files or folders, or --captions with image paths")
    if not texts:
        raise UsageError("no texts: give --text (repeat for several) or --captions")
    model, processor = load_model(args.model)
    try:
        embeddings = lens.embed(model, processor, images=images, texts=texts, pairs=pairs,
                                batch_size=args.batch_size, model_name=args.model.removeprefix("zoo:"),
                                show_progress=not args.quiet)
        out = Path(args.out)
        lens.report(embeddings, out, scale=args.scale, methods=args.projection or ("pca", "tsne"))
        if args.projector:
            embeddings.to_projector(args.projector)
    except (TypeError, ValueError, ImportError) as err:
        raise UsageError(str(err)) from err
    print(f"wrote {out}" + (f" and a Projector export in {args.projector}" if args.projector else ""))
    return 0


def demo_summary(explanation) -> list[str]:
    """What a first-time user should read first: absent prompts, each method's evidence, agreement."""
    lines = []
    absent = sorted({r.target for r in explanation.records if r.evidence_values.get("absent")})
    if absent:
        lines.append(f"the model does not see {', '.join(map(repr, absent))}: its maps are marked in the report")
    for method in explanation.methods:
        records = [r for r in explanation.records if r.method == method]
        found = [list(r.evidence_values["per_prompt"].values()) if "per_prompt" in r.evidence_values
                 else [r.evidence_values] for r in records]
        per_prompt = [v for group in found for v in group if "beats_random" in v]
        better = sum(bool(v["beats_random"]) for v in per_prompt)
        shared = " (prompt-independent: one map)" if any(r.evidence_values.get("prompt_independent") for r in records) else ""
        check = records[0].evidence.get("randomisation check", "not run").split(":")[0]
        lines.append(f"{method}{shared}: beats a random order on {better}/{len(per_prompt)} prompts; "
                     f"randomisation check {check}")
    agreement = explanation.agreement()
    if agreement:
        (a, b), best = max(agreement.items(), key=lambda kv: kv[1])
        lines.append(f"methods agree at most {best:.2f} (Spearman, {a} vs {b}); mean pairwise "
                     f"{sum(agreement.values()) / len(agreement):.2f}: read no single map alone")
    return lines


# ----- lens-inside: logit lens, probes, attention heads and their ablation ----------------------
LABEL_KINDS = ("colour", "shape", "object")


def _add_data_args(parser, what: str) -> None:
    """Where the images and labels come from: zoo scenes or a folder with a labels file."""
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--scenes", type=int, metavar="N", help="N scenes drawn from the zoo's scene grammar")
    data.add_argument("--data", metavar="FOLDER", help="a folder of images with labels.csv or labels.jsonl "
                      f"(file, label{', mask' if what == 'probe' else ''}), as for captum-vlm audit")
    parser.add_argument("--seed", type=int, default=123_456, help="scene seed (default 123456, the zoo's held-out seed)")
    parser.add_argument("--objects", type=int, default=1, choices=[1, 2, 3], help="objects per scene (default 1)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"zoo:NAME or a local folder (default {DEFAULT_MODEL})")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward (default 32)")
    parser.add_argument("--out", default=f"{what}.html", help=f"HTML report to write (default {what}.html)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def add_lens_inside_parser(sub) -> None:
    lens = sub.add_parser("lens-inside", help="inside the model: logit lens, probes, attention heads, head ablation",
                          description="Views inside the model, each written as a self-contained HTML report.")
    views = lens.add_subparsers(dest="view", required=True, metavar="{logit-lens,probe,heads,ablate}")
    logit = views.add_parser("logit-lens", help="what each decoder layer predicts (BLIP captioning/VQA, LLaVA)")
    logit.add_argument("images", nargs="+", metavar="IMAGE", help="image file(s); one --text for all or one each")
    logit.add_argument("--model", required=True, help="zoo:NAME or a local checkpoint folder with a decoder")
    logit.add_argument("--text", action="append", required=True, help="the prompt or question (LLaVA: with the "
                       "image token); repeat for one per image")
    logit.add_argument("--answer", action="append", help="continuation to lens (default: the model's greedy "
                       "answer); repeat for one per row")
    logit.add_argument("--word", action="append", default=[], help="LLaVA: map this word's probability over "
                       "the image tokens; repeat for several")
    logit.add_argument("--k", type=int, default=5, help="top tokens per layer (default 5)")
    logit.add_argument("--batch-size", type=int, default=8, help="rows per forward (default 8)")
    logit.add_argument("--out", default="logit-lens.html", help="HTML report to write")
    probe = views.add_parser("probe", help="linear probes per vision layer with a shuffled-label control",
                             description="Fit a logistic-regression probe at every vision layer (5-fold CV) with "
                             "a label-shuffled control. Scenes: --label colour|shape of the (first) object, or for "
                             "--where patches the colour/shape of the object under each patch ('background' "
                             "elsewhere) or 'object' (on an object or not). A folder: its labels file's label "
                             "(image probes) or mask (patch probes: on the mask or not).")
    _add_data_args(probe, "probe")
    probe.add_argument("--label", choices=LABEL_KINDS, default="colour", help="scenes: what to probe (default colour)")
    probe.add_argument("--where", choices=["image", "patches"], default="image", help="pooled token or each patch")
    probe.add_argument("--layer", type=int, action="append", help="layer to probe (0 = embeddings); repeat; default all")
    probe.add_argument("--cv", type=int, default=5, help="cross-validation folds (default 5)")
    heads = views.add_parser("heads", help="entropy, sink mass and attention distance per layer x head")
    heads.add_argument("image", help="path of the image")
    heads.add_argument("--model", default=DEFAULT_MODEL, help=f"zoo:NAME or a local folder (default {DEFAULT_MODEL})")
    heads.add_argument("--stream", default="vision", choices=["vision", "text", "cross"])
    heads.add_argument("--text", help="text for the text and cross streams")
    heads.add_argument("--out", default="heads.html", help="HTML report to write")
    ablate = views.add_parser("ablate", help="ablate each attention head alone: the target's drop, heads ranked",
                              description="Zero (or mean-replace) each head of a stream on its own and measure the "
                              "drop of the model's target for each image's label: two-tower models the zero-shot "
                              "logit of the label's prompt among --text (scenes: the zoo's 12 prompts), matching "
                              "models the match logit of the label text, captioning models the caption's "
                              "log-probability, VQA models the log-probability of the label as the answer to "
                              "--text.")
    _add_data_args(ablate, "ablate")
    ablate.add_argument("--text", action="append", help="two-tower: the prompts (repeat); VQA: the question")
    ablate.add_argument("--stream", default="vision", choices=["vision", "text", "cross"])
    ablate.add_argument("--mode", default="zero", choices=["zero", "mean"])
    ablate.add_argument("--top", type=int, default=10, help="heads listed in the ranking (default 10)")


def _check_out(out: str) -> Path:
    check_outputs(out, None)
    return Path(out)


def _scene_data(args):
    """Images, per-image labels and per-image masks of ``--scenes`` scenes (all at the scene size)."""
    from captum_vlm import zoo

    if args.scenes < 2:
        raise UsageError(f"--scenes: expected at least 2 scenes, got {args.scenes}")
    scenes = zoo.scenes.make_scenes(args.seed, args.scenes, size=64, n_objects=args.objects)
    return [s.pil() for s in scenes], scenes


def _folder_data(folder: str, need_masks: bool):
    """Images, labels and (where asked) masks of a folder with a labels file (as ``audit`` reads it)."""
    from captum_vlm.audit.sources import LABEL_FILES, rows_from

    if not Path(folder).is_dir():
        raise UsageError(f"data folder not found: {folder}")
    if not any((Path(folder) / name).is_file() for name in LABEL_FILES):
        raise UsageError(f"{folder} has no labels file; add {' or '.join(LABEL_FILES)} (columns file, label"
                         f"{', mask' if need_masks else ''})")
    try:
        rows = rows_from(folder)
    except (ValueError, TypeError) as err:
        raise UsageError(str(err).splitlines()[0]) from err
    images = [open_image(r["path"]) for r in rows]
    missing = [r["id"] for r in rows if (r["mask_path"] if need_masks else r["label"]) is None]
    if missing:
        raise UsageError(f"{folder}: no {'mask' if need_masks else 'label'} for {', '.join(missing[:3])} "
                         "in its labels file")
    masks = [_read_mask(r["mask_path"]) for r in rows] if need_masks else None
    return images, [r["label"] for r in rows], masks


def _read_mask(path: str):
    import numpy as np

    try:
        if path.endswith(".npy"):
            return np.load(path).astype(bool)
        from PIL import Image

        with Image.open(path) as mask:
            return np.asarray(mask.convert("L")) > 127
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot read mask {path}: {err}") from err


def _patch_grid_labels(masks, names, size, grid):
    """Per-patch labels ``[N, rows, cols]``: the name of the mask a patch lies on, else 'background'."""
    import numpy as np
    from PIL import Image

    from captum_vlm.lens import patch_labels

    rows, cols = grid
    labels = np.full((len(masks), rows, cols), "background", dtype=object)
    for i, (image_masks, image_names) in enumerate(zip(masks, names)):
        for mask, name in zip(image_masks, image_names):
            resized = np.asarray(Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255).resize(
                (size[1], size[0]), Image.NEAREST)) > 127
            labels[i][patch_labels(resized, grid)] = name
    return labels.astype(str)


def probe_data(args, model, processor):
    """``(pixel_values, labels)`` for ``lens-inside probe`` (see its help)."""
    from captum_vlm.adapters import get_adapter

    if args.data:
        images, labels, masks = _folder_data(args.data, args.where == "patches")
        names = [[True] for _ in images]
        masks = [[m] for m in masks] if masks is not None else None
    else:
        images, scenes = _scene_data(args)
        index = {"colour": 0, "shape": 1}.get(args.label)
        if args.where == "image":
            if index is None:
                raise UsageError("--label object: every scene holds an object; for image probes use colour or shape")
            labels = [s.labels[0][index] for s in scenes]
        masks = [[o.mask for o in s.objects] for s in scenes]
        names = [[True if index is None else o[index] for o in s.objects] for s in scenes]
    try:
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    except Exception as err:  # noqa: BLE001 - the processor refusing an image is the user's data, one line
        raise UsageError(f"cannot process the images: {err}") from err
    if args.where == "patches":
        grid = get_adapter(model).patch_grid(pixels)
        labels = _patch_grid_labels(masks, names, tuple(pixels.shape[-2:]), grid)
        if args.data or args.label == "object":
            labels = labels != "background"
    return pixels, labels


def ablation_problem(args, model, processor, labels: list[str], images):
    """``(forward, inputs, additional_forward_args, target, what)`` for ``lens-inside ablate``."""
    import torch

    from captum_vlm.adapters import get_adapter
    from captum_vlm.targets import AnswerLogits, ImageTextSimilarity, MatchLogit, TokenLogProbs

    adapter = get_adapter(model)
    task = adapter.task
    tokenizer = getattr(processor, "tokenizer", processor)
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    if task == "similarity":
        texts = list(args.text or [])
        missing = sorted({label for label in labels if label not in texts})
        if missing:
            raise UsageError(f"labels {missing[:3]} are not among the prompts; give them with --text")
        text = processor(text=texts, return_tensors="pt", padding=adapter.text_padding)
        target = torch.tensor([texts.index(label) for label in labels])
        return (ImageTextSimilarity(model), pixels, (text["input_ids"], text["attention_mask"]), target,
                f"zero-shot logit of the label's prompt among {len(texts)}")
    if task in ("match", "caption"):
        text = tokenizer(labels, return_tensors="pt", padding=True)
        forward = MatchLogit(model) if task == "match" else TokenLogProbs(model, reduction="sum")
        what = "match logit of the label text" if task == "match" else "log-probability of the label as the caption"
        return forward, pixels, (text["input_ids"], text["attention_mask"]), None, what
    if task == "answer_tokens":
        if not args.text or len(args.text) != 1:
            raise UsageError("--text: a VQA model needs one question (the labels are its answers)")
        question = tokenizer([args.text[0]] * len(labels), return_tensors="pt", padding=True)
        answer = tokenizer(labels, return_tensors="pt", padding=True)
        return (TokenLogProbs(model, reduction="sum"), pixels,
                (question["input_ids"], question["attention_mask"], answer["input_ids"], answer["attention_mask"]),
                None, f"log-probability of the label as the answer to {args.text[0]!r}")
    if task == "answer_label":
        known = getattr(model.config, "label2id", {}) or {}
        missing = sorted({label for label in labels if label not in known})
        if missing:
            raise UsageError(f"labels {missing[:3]} are not answers of this model")
        if not args.text or len(args.text) != 1:
            raise UsageError("--text: a VQA model needs one question (the labels are its answers)")
        inputs = processor(images=images, text=[args.text[0]] * len(labels), return_tensors="pt", padding=True)
        return (AnswerLogits(model), inputs["pixel_values"], (inputs["input_ids"], inputs["attention_mask"]),
                torch.tensor([known[label] for label in labels]), "logit of the label as the answer")
    raise UsageError(f"ablate: no command-line target for {type(model).__name__} (task {task!r}); use "
                     "cv.lens.head_importance with a target from captum_vlm.targets in Python")


def ablation_data(args, model, processor):
    """Images and per-image label texts for ``lens-inside ablate``; scenes fill in --text."""
    from captum_vlm import zoo
    from captum_vlm.adapters import get_adapter

    if args.data:
        images, labels, _ = _folder_data(args.data, need_masks=False)
        return images, labels
    images, scenes = _scene_data(args)
    task = get_adapter(model).task
    if task in ("answer_tokens", "answer_label"):
        question = (args.text or ["what color is the object?"])[0]
        args.text = [question]
        shape = question.removeprefix("what color is the ").removesuffix("?")
        answers = []
        for scene in scenes:
            found = dict(scene.vqa).get(question)
            if found is None:
                colours = [c for c, s in scene.labels if s == shape or shape == "object"]
                found = colours[0] if len(colours) == 1 else None
            if found is None:
                raise UsageError(f"--text: scene {scene.seed} has no answer to {question!r}; ask "
                                 "'what color is the object?' with --objects 1")
            answers.append(found)
        return images, answers
    if task == "similarity" and not args.text:
        args.text = zoo.scenes.zero_shot_prompts()
    return images, [zoo.scenes.caption_for(s.labels) if task != "similarity" else zoo.scenes.phrase(*s.labels[0])
                    for s in scenes]


def run_lens_inside(args) -> Path:
    """Run one lens-inside view and write its HTML report."""
    from captum_vlm import lens

    out = _check_out(args.out)
    title = f"{args.model.removeprefix('zoo:')}: inside the model"
    if getattr(args, "batch_size", 1) < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    try:
        if args.view == "logit-lens":
            images = [open_image(path) for path in args.images]
            model, processor = load_model(args.model)
            image = images if len(images) > 1 or len(args.text) > 1 else images[0]
            text = args.text if len(args.text) > 1 or len(images) > 1 else args.text[0]
            answer = args.answer if args.answer is None or len(args.answer) > 1 or isinstance(text, list) else args.answer[0]
            result = lens.logit_lens(model, processor, image, text, answer=answer, k=args.k, words=args.word,
                                     batch_size=args.batch_size)
            views = result if isinstance(result, list) else [result]
            meta = f"model {args.model} · images {', '.join(args.images)}"
        elif args.view == "heads":
            image = open_image(args.image)
            if args.stream != "vision" and not args.text:
                raise UsageError(f"--text: the {args.stream} stream needs a text")
            model, processor = load_model(args.model)
            inputs = dict(processor(images=image, text=args.text, return_tensors="pt", padding=True)
                          if args.text else processor(images=image, return_tensors="pt"))
            views = [lens.head_statistics(model, inputs, stream=args.stream)]
            meta = f"model {args.model} · image {args.image}"
        elif args.view == "probe":
            model, processor = load_model(args.model)
            pixels, labels = probe_data(args, model, processor)
            views = [lens.probe(model, None, pixels, labels, where=args.where, layers=args.layer, cv=args.cv,
                                batch_size=args.batch_size, show_progress=not args.quiet)]
            meta = f"model {args.model} · {_data_line(args)} · {len(pixels)} images"
        else:
            if args.top < 1:
                raise UsageError(f"--top must be at least 1, got {args.top}")
            model, processor = load_model(args.model)
            images, labels = ablation_data(args, model, processor)
            forward, pixels, extra, target, what = ablation_problem(args, model, processor, labels, images)
            views = [lens.head_importance(model, forward, pixels, extra, target=target, stream=args.stream,
                                          mode=args.mode, show_progress=not args.quiet, target_label=what)]
            meta = f"model {args.model} · {_data_line(args)} · {len(images)} images"
        sections = [v.html_section(top=args.top) if args.view == "ablate" else v.html_section() for v in views]
    except (TypeError, ValueError, KeyError) as err:
        raise UsageError(str(err).splitlines()[0].strip('"')) from err
    from captum_vlm.viz.lens_inside import lens_page

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(lens_page(sections, title=title, meta=meta), encoding="utf-8")
    return out


def _data_line(args) -> str:
    return f"data {args.data}" if args.data else f"{args.scenes} zoo scenes (seed {args.seed}, {args.objects} object(s))"


if __name__ == "__main__":
    sys.exit(main())
