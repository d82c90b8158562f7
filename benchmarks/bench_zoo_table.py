"""One table: every registered method x every zoo model it supports, on held-out scenes.

For each zoo model and each method the registry says explains it (``method_names(adapter)``, as
``cv.explain`` asks), on ``--scenes`` held-out two-object scenes (``make_scenes(123456, ...)``,
the zoo's held-out seed, never drawn in training), each map is the map of one named object:

* ``similarity`` (CLIP, SigLIP): the object's prompt among the 12 colour x shape prompts;
  score = its probability over the 12 prompts (the adapter's ``to_probability``);
* ``match`` (BLIP ITM): the object's phrase ("a red circle") as the text; score = its match
  probability;
* ``caption`` (BLIP captioning): the scene's true caption, teacher-forced; the map is the sum of
  the per-token maps of the object's colour and shape words; score = the probability of those
  two tokens;
* answer tasks (BLIP VQA, ViLT, LLaVA): a question about the object, "what color is the
  <shape>?" (object 0) or "what shape is the <colour> object?" (object 1), the other kind when
  the first is ambiguous (LLaVA: through the processor's chat template); the map explains the
  model's own answer (greedy / top label); score = that answer's probability.

The maps come from the registered methods themselves (``METHODS[name].run`` on the context
``explain`` builds, :func:`captum_vlm.explain.explain_context`), with their ``explain`` defaults.
Per map:

* **pointing game** (:func:`captum_vlm.metrics.pointing_game`, default tolerance 4 px): the peak
  on the object's mask;
* **deletion AUC** (:func:`captum_vlm.metrics.deletion_curve`, patches removed to 0 in
  ``--steps`` steps, most relevant first) divided by the unperturbed score: 1 = the score does
  not move, lower is more faithful;
* **randomisation check** (:func:`captum_vlm.metrics.model_randomization_check`, cascading,
  every vision block re-initialised top-down, as ``explain`` attaches it): Spearman rank
  correlation between the map and the map after all vision blocks are re-initialised, on the
  first ``--sanity`` scenes; near 0 passes, near 1 means the map does not read the vision weights.

Baselines beside each row: a **random map** (uniform on the patch grid, scored the same way on
the trained model) and the **same method on an untrained model** (same class and config,
``torch.manual_seed(0)`` initialisation), explaining the same text and the trained model's own
answer, its deletion measured on the untrained model's own score.

Run (partial results go to ``--out`` as JSON lines, one per model x method; a rerun skips rows
already there, so a stopped run resumes)::

    OMP_NUM_THREADS=1 python benchmarks/bench_zoo_table.py                      # every model
    python benchmarks/bench_zoo_table.py --models shapes-clip --methods grad-eclip --scenes 10
    python benchmarks/bench_zoo_table.py --table-only                            # print the table

Prints the Markdown table for ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from captum_vlm import zoo  # noqa: E402
from captum_vlm.adapters import get_adapter  # noqa: E402
from captum_vlm.explain import METHODS, ExplainContext, explain_context, method_names  # noqa: E402
from captum_vlm.explain.evidence import _score_function  # noqa: E402
from captum_vlm.metrics import deletion_curve, model_randomization_check, pointing_game  # noqa: E402
from captum_vlm.targets import TokenLogProbs  # noqa: E402
from captum_vlm.zoo import scenes as sc  # noqa: E402
from captum_vlm.zoo.train import HELDOUT_SEED  # noqa: E402

DEFAULT_OUT = Path(__file__).with_name("zoo_table.jsonl")
RANDOM_MAP = "random map"

TARGET_NOTES = {
    "similarity": "the object's prompt among the 12 prompts; score: its probability ({probability})",
    "match": "the object's phrase as the text; score: its match probability",
    "caption": "the true caption, the object's colour + shape word maps summed; score: p(those 2 tokens)",
    "answer_tokens": "the model's own answer to a question about the object; score: p(answer)",
    "answer_label": "the model's own answer label to a question about the object; score: sigmoid(answer logit)",
    "generate": "the model's own generated answer to a question about the object (chat template); score: p(answer)",
}


@dataclass
class Case:
    """One map to score: text ``k`` of the scene's context, on object ``obj``.

    Args:
        k: index of the explained text.
        obj: index of the object in the scene.
        positions: caption task: the token positions of the object's words (their maps are
            summed, their log-probabilities scored); ``None``: the text's whole map.
        truth: answer tasks: the right answer.
    """

    k: int
    obj: int
    positions: tuple[int, ...] | None = None
    truth: str | None = None


def _question(scene: sc.Scene, obj: int) -> tuple[str, str] | None:
    """A question about object ``obj`` whose answer is unique, and that answer."""
    colours = [o.colour for o in scene.objects]
    shapes = [o.shape for o in scene.objects]
    target = scene.objects[obj]
    asked = [("colour", f"what color is the {target.shape}?", target.colour, shapes.count(target.shape) == 1),
             ("shape", f"what shape is the {target.colour} object?", target.shape, colours.count(target.colour) == 1)]
    if obj % 2:
        asked = asked[::-1]
    return next(((q, a) for _, q, a, unique in asked if unique), None)


def _word_positions(tokens: Sequence[str], words: Sequence[tuple[str, str]]) -> list[tuple[int, int] | None]:
    """Token positions of each object's ``(colour, shape)`` pair, in caption order."""
    found, start = [], 0
    for colour, shape in words:
        hit = None
        for j in range(start, len(tokens) - 1):
            if tokens[j] == colour and tokens[j + 1] == shape:
                hit, start = (j, j + 1), j + 2
                break
        found.append(hit)
    return found


def scene_context(model, processor, scene: sc.Scene) -> tuple[ExplainContext, list[Case]] | None:
    """The texts one scene is explained with (by the adapter's task) and the maps to score.

    Returns ``None`` when the scene offers no case for this task (answer tasks: no unique question).
    """
    adapter = get_adapter(model)
    task = adapter.task
    labels = scene.labels
    if task == "similarity":
        texts = sc.zero_shot_prompts()
        cases = [Case(sc.all_labels().index(label), obj) for obj, label in enumerate(labels)]
    elif task == "match":
        texts = [sc.phrase(*label) for label in labels]
        cases = [Case(obj, obj) for obj in range(len(labels))]
    elif task == "caption":
        texts = [scene.caption]
        cases = []
    else:  # a question about each object, answered by the model itself
        asked = [(obj, _question(scene, obj)) for obj in range(len(labels))]
        asked = [(obj, qa) for obj, qa in asked if qa is not None]
        if not asked:
            return None
        texts = [qa[0] for _, qa in asked]
        if adapter.image_tokens_in_input_ids:  # the prompt holds the image: the processor's chat template
            texts = [processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
                add_generation_prompt=True) for q in texts]
        cases = [Case(i, obj, truth=qa[1]) for i, (obj, qa) in enumerate(asked)]
    context = explain_context(model, processor, scene.pil(), texts, sorted({c.k for c in cases} or {0}),
                              max_new_tokens=4)
    if task == "caption":
        for obj, hit in enumerate(_word_positions(context.tokens[0], labels)):
            if hit is not None:
                cases.append(Case(0, obj, hit))
    return context, cases


def case_map(records: list, case: Case, shape: tuple[int, int]) -> np.ndarray:
    """The map a case scores, from one method's records: the text's whole map, or the sum of
    its word tokens' maps (a token whose map is all zero has no record)."""
    if case.positions is None:
        return next(np.asarray(r.grid, np.float64) for r in records if r.text_index == case.k)
    total = np.zeros(shape)
    for r in records:
        if r.token is not None and r.token[0] == case.k and r.token[1] in case.positions:
            total = total + np.asarray(r.grid, np.float64)
    return total


def score_function(context: ExplainContext, case: Case) -> Callable[[torch.Tensor], torch.Tensor]:
    """``f(images) -> [N]``: the probability the case's map explains (see the module docstring)."""
    adapter = context.adapter
    if case.positions is not None:
        ids, mask = (context.inputs[key][case.k : case.k + 1] for key in ("input_ids", "attention_mask"))
        per_token = TokenLogProbs(context.model)
        columns = list(case.positions)

        def words(images):
            n = len(images)
            return adapter.to_probability(per_token(images, ids.expand(n, -1), mask.expand(n, -1))[:, columns].sum(1))

        return words
    found = _score_function(context, case.k)
    if found is None:
        raise ValueError(f"no score for task {adapter.task!r}")
    _, forward, column, _ = found

    def probability(images):
        p = adapter.to_probability(forward(images))
        return p if column is None else p[:, column]

    return probability


def deletion_relative(context: ExplainContext, case: Case, maps: torch.Tensor, steps: int) -> list[float]:
    """Deletion AUC / unperturbed score of each map ``[M, h, w]`` of the case's image."""
    pixels = context.inputs["pixel_values"]
    row = pixels[case.k : case.k + 1] if pixels.shape[0] > 1 else pixels[:1]
    patch = row.shape[-1] // maps.shape[-1]
    curve = deletion_curve(score_function(context, case), row.expand(len(maps), -1, -1, -1), maps,
                           patch_size=patch, steps=steps, baseline=0.0, batch_size=steps + 1)
    return (curve.auc / curve.scores[:, 0]).tolist()


def sanity_rho(context: ExplainContext, case: Case, method: str, shape: tuple[int, int]) -> float:
    """Rank correlation of the case's map before and after re-initialising every vision block."""
    run = METHODS[method].run

    def explain_fn(model, _):
        copy = replace(context, model=model, adapter=get_adapter(model), targets=[case.k])
        return torch.as_tensor(case_map(run(copy), case, shape))

    blocks = context.adapter.vision_blocks()
    return float(model_randomization_check(context.model, explain_fn, None, layers=blocks[::-1]).spearman[-1])


def untrained_copy(model):
    """The same class and config with fresh random weights (seed 0), in eval mode."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return type(model)(model.config).eval()


def _summary(values: Sequence[float]) -> dict[str, float]:
    v = np.asarray([x for x in values if x == x], np.float64)
    if not len(v):
        return {"mean": float("nan"), "se": float("nan"), "n": 0}
    return {"mean": float(v.mean()), "se": float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0,
            "n": int(len(v))}


def prepare(model, processor, n_scenes: int, seed: int = HELDOUT_SEED):
    """Trained and untrained contexts of the held-out scenes (answers: the trained model's)."""
    side = int(getattr(model.config, "vision_config", model.config).image_size)
    untrained = untrained_copy(model)
    items = []
    for scene in sc.make_scenes(seed, n_scenes, size=side, n_objects=2):
        found = scene_context(model, processor, scene)
        if found is None or not found[1]:
            continue
        context, cases = found
        items.append((scene, context, replace(context, model=untrained, adapter=get_adapter(untrained)), cases))
    return items


def random_row(items, steps: int, seed: int = 0) -> dict[str, Any]:
    """Pointing game and relative deletion AUC of uniform random maps on the patch grid."""
    generator = torch.Generator().manual_seed(seed)
    hits, aucs = [], []
    for scene, context, _, cases in items:
        shape = _grid_shape(context)
        for case in cases:
            heat = torch.rand(1, *shape, generator=generator, dtype=torch.float64)
            hits.append(float(pointing_game(heat[0], torch.from_numpy(scene.objects[case.obj].mask)).hits[0]))
            aucs += deletion_relative(context, case, heat, min(steps, shape[0] * shape[1]))
    return {"pointing": _summary(hits), "deletion": _summary(aucs)}


def _grid_shape(context: ExplainContext) -> tuple[int, int]:
    """The map grid of the context's image (the adapter's ``patch_grid``)."""
    return tuple(int(v) for v in context.adapter.patch_grid(context.inputs["pixel_values"]))


def method_row(items, method: str, steps: int, n_sanity: int) -> dict[str, Any]:
    """Every number of one model x method row, trained and untrained."""
    out: dict[str, Any] = {}
    run = METHODS[method].run
    for variant, index in (("trained", 1), ("untrained", 2)):
        hits, aucs, rhos, scores, right = [], [], [], [], []
        for i, item in enumerate(items):
            scene, context = item[0], item[index]
            cases = item[3]
            shape = _grid_shape(context)
            records = run(context)
            for case in cases:
                heat = case_map(records, case, shape)
                mask = torch.from_numpy(scene.objects[case.obj].mask)
                hits.append(float(pointing_game(torch.as_tensor(heat), mask).hits[0]))
                aucs += deletion_relative(context, case, torch.as_tensor(heat)[None], min(steps, heat.size))
                if i < n_sanity:
                    rhos.append(sanity_rho(context, case, method, shape))
                if variant == "trained":
                    with torch.no_grad():
                        scores.append(float(score_function(context, case)(_row(context, case))[0]))
                    if case.truth is not None:
                        right.append(float(context.answers.texts[case.k] == case.truth))
        out[variant] = {"pointing": _summary(hits), "deletion": _summary(aucs), "sanity": _summary(rhos),
                        "sanity_pass": _summary([abs(r) < 0.5 for r in rhos if r == r])}
        if variant == "trained":
            out["score"] = _summary(scores)
            out["answer_accuracy"] = _summary(right) if right else None
    return out


def _row(context: ExplainContext, case: Case) -> torch.Tensor:
    pixels = context.inputs["pixel_values"]
    return pixels[case.k : case.k + 1] if pixels.shape[0] > 1 else pixels[:1]


def model_rows(name: str, n_scenes: int, steps: int, n_sanity: int, methods: Sequence[str] | None,
               done: set[tuple[str, str]], write: Callable[[dict], None], seed: int = HELDOUT_SEED) -> None:
    """Compute and ``write`` every row of one zoo model not in ``done``."""
    model, processor = zoo.load(name)
    adapter = get_adapter(model)
    chosen = [m for m in method_names(adapter) if methods is None or m in methods]
    todo = [m for m in [RANDOM_MAP, *chosen] if (name, m) not in done]
    if not todo:
        return
    start = time.process_time()
    items = prepare(model, processor, n_scenes, seed)
    prep = time.process_time() - start
    base = {"model": name, "class": type(model).__name__, "task": adapter.task, "scenes": n_scenes,
            "scenes_used": len(items), "maps": sum(len(item[3]) for item in items), "steps": steps,
            "seed": seed, "target": TARGET_NOTES.get(adapter.task, adapter.task).format(probability=adapter.probability),
            "weights_sha256": _sha256(zoo.model_dir(name) / "model.safetensors")[:12]}
    for method in tqdm(todo, desc=name, file=sys.stderr):
        start = time.process_time()
        row = random_row(items, steps) if method == RANDOM_MAP else method_row(items, method, steps, n_sanity)
        write({**base, "method": method, **row, "cpu_s": time.process_time() - start + (prep if method == todo[0] else 0),
               "sanity_scenes": min(n_sanity, len(items))})


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cell(summary: dict | None, digits: int = 2) -> str:
    if not summary or not summary.get("n"):
        return "n/a"
    return f"{summary['mean']:.{digits}f} ± {summary['se']:.{digits}f}"


def _pass(variant: dict) -> str:
    """Share of maps passing the randomisation check (|ρ| < 0.5) and how many were checked."""
    passed = variant["sanity_pass"]
    return f"{passed['mean']:.2f} of {passed['n']}" if passed.get("n") else "n/a"


def markdown(rows: list[dict]) -> str:
    """The table: one line per model x method, the random-map baseline of its model beside it."""
    randoms = {r["model"]: r for r in rows if r["method"] == RANDOM_MAP}
    lines = [
        "| model | method | pointing game | PG untrained | PG random map | deletion AUC / score | "
        "del. untrained | del. random map | randomisation ρ (share passing, of n maps) | ρ untrained | CPU s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda row: row["model"]):  # stable: a model's rows in the order run
        if r["method"] == RANDOM_MAP:
            continue
        rand = randoms.get(r["model"], {})
        t, u = r["trained"], r["untrained"]
        lines.append(
            f"| {r['model']} | {r['method']} | {_cell(t['pointing'])} | {_cell(u['pointing'])} | "
            f"{_cell(rand.get('pointing'))} | {_cell(t['deletion'])} | {_cell(u['deletion'])} | "
            f"{_cell(rand.get('deletion'))} | {_cell(t['sanity'])} ({_pass(t)}) | "
            f"{_cell(u['sanity'])} | {r['cpu_s']:.0f} |"
        )
    return "\n".join(lines)


def notes(rows: list[dict]) -> str:
    """One line per model: what was explained, how many maps, the model's score and accuracy."""
    lines, seen = [], set()
    for r in rows:
        if r["method"] == RANDOM_MAP or r["model"] in seen:
            continue
        seen.add(r["model"])
        extra = f"; own answers right on {r['answer_accuracy']['mean']:.2f}" if r.get("answer_accuracy") else ""
        lines.append(f"- **{r['model']}** (`{r['class']}`, task `{r['task']}`): {r['target']}. "
                     f"{r['maps']} maps on {r['scenes_used']} of {r['scenes']} scenes; mean explained score "
                     f"{r['score']['mean']:.3f}{extra}; randomisation on the first {r['sanity_scenes']} scenes; "
                     f"weights sha256 {r['weights_sha256']}.")
    return "\n".join(lines)


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", help="zoo names (default: every zoo model)")
    parser.add_argument("--methods", nargs="*", help="registry names (default: every one the model supports)")
    parser.add_argument("--scenes", type=int, default=40, help="held-out two-object scenes per model")
    parser.add_argument("--steps", type=int, default=8, help="deletion steps")
    parser.add_argument("--sanity", type=int, default=8, help="scenes with the randomisation check")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON lines of the rows (resumable)")
    parser.add_argument("--fresh", action="store_true", help="discard the rows already in --out")
    parser.add_argument("--table-only", action="store_true", help="print the table of --out and stop")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.fresh and args.out.exists():
        args.out.unlink()
    if not args.table_only:
        done = {(r["model"], r["method"]) for r in read_rows(args.out)}

        def write(row: dict) -> None:
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")

        for name in args.models or list(zoo.list_models()):
            model_rows(name, args.scenes, args.steps, args.sanity, args.methods, done, write)
    rows = read_rows(args.out)
    print(markdown(rows))
    print()
    print(notes(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
