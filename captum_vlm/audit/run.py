"""``cv.audit(model, processor, data, texts=...)``: explain every image of a data set."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from captum_vlm._checks import check_choice, check_count
from captum_vlm.adapters import get_adapter
from captum_vlm.audit.result import Audit
from captum_vlm.audit.sources import rows_from
from captum_vlm.audit.store import RunStore
from captum_vlm.audit.worker import ANSWER_TASKS, CHECKS, AuditConfig, unknown_answer_labels

__all__ = ["audit"]

ENGINES = ("local", "ray")


def _is_ray_dataset(data: Any) -> bool:
    return type(data).__module__.startswith("ray.data")


def _check_config(model, texts, methods, checks, explain, deletion_steps, grounding_fraction) -> AuditConfig:
    from captum_vlm.explain import METHODS, method_names

    adapter = get_adapter(model)
    answers = adapter.answers_questions and adapter.task in ANSWER_TASKS
    if not adapter.two_tower and not answers:
        raise ValueError(
            f"model: cv.audit explains two-tower models (image and text towers, e.g. CLIP or SigLIP) and "
            f"models that answer questions with answer tokens (e.g. BLIP VQA) or answer labels (e.g. ViLT VQA); "
            f"{type(model).__name__} computes {adapter.task!r}"
        )
    if answers:
        texts = [texts] if isinstance(texts, str) else list(texts or ())
        if len(texts) > 1 or not all(isinstance(t, str) and t.strip() for t in texts):
            raise ValueError(f"texts: a model that answers questions is asked each row's own 'question', or the "
                             f"one question given here; expected [] or [question], got {texts!r}")
        if explain != "prediction":
            raise ValueError(f'explain: a model that answers questions is explained through its own answer; '
                             f'expected "prediction", got {explain!r}')
    elif isinstance(texts, str) or not isinstance(texts, Sequence) or len(texts) < 2:
        raise ValueError(f"texts: expected a list of at least 2 prompts (the classes), got {texts!r}")
    elif not all(isinstance(t, str) and t.strip() for t in texts) or len(set(texts)) != len(texts):
        raise ValueError(f"texts: every prompt must be a distinct non-empty string, got {list(texts)!r}")
    methods = [methods] if isinstance(methods, str) else list(methods)
    usable = method_names(model)
    bad = [m for m in methods if m not in METHODS or m not in usable]
    if bad or not methods:
        raise ValueError(f"methods: {bad or methods!r} cannot explain {type(model).__name__}; choose from {usable}")
    checks = [checks] if isinstance(checks, str) else list(checks)
    unknown = [c for c in checks if c not in CHECKS]
    if unknown:
        raise ValueError(f"checks: unknown {unknown}; choose from {list(CHECKS)}")
    check_choice(explain, ("prediction", "label"), "explain")
    check_count(deletion_steps, "deletion_steps")
    if isinstance(grounding_fraction, bool) or not isinstance(grounding_fraction, (int, float)) \
            or not 0 < grounding_fraction < 1:
        raise ValueError(f"grounding_fraction: expected a number in (0, 1), got {grounding_fraction!r}")
    return AuditConfig(texts=tuple(texts), methods=tuple(methods), checks=tuple(checks), explain=explain,
                       deletion_steps=deletion_steps, grounding_fraction=float(grounding_fraction))


def audit(
    model: Any,
    processor: Any,
    data: Any,
    texts: Sequence[str] | None,
    methods: Sequence[str] = ("grad-eclip",),
    checks: Sequence[str] = CHECKS,
    *,
    labels: Any = None,
    masks: Any = None,
    boxes: Any = None,
    engine: str = "local",
    batch_size: int = 16,
    output: str | Path = "audit",
    explain: str = "prediction",
    keep_maps: bool = False,
    deletion_steps: int = 16,
    grounding_fraction: float = 0.2,
    seed: int = 0,
    model_name: str | None = None,
    concurrency: int = 1,
    num_cpus: float = 1,
    num_gpus: float = 0,
    address: str | None = None,
    show_progress: bool = False,
) -> Audit:
    """Explain every image of ``data`` and write one record per image to ``output``.

    Each record holds the image's id and label, the model's prediction over ``texts`` (or its
    answer to the question) and its confidence, and per method the map's summary (peak cell,
    entropy, share of the positive mass on the object when a mask or box is given), its deletion
    AUC beside a random order's, and the grounding-test verdict (and, with a mask or box, the
    verdict of masking the object itself: ``object_grounded``); an unreadable image gives a
    record with ``error`` set. Records are Parquet shards in ``output/records/``, written as the
    run goes; a run started again with the same ``output`` (and arguments) skips the recorded
    images.

    The engines write bit-identical records when the model's weights live in memory of their
    own, as :func:`captum_vlm.zoo.load` gives them: Ray actors hold an unpickled (fresh,
    64-byte aligned) copy, while ``from_pretrained`` can leave weights as views into the
    memory-mapped checkpoint at misaligned addresses, where MKL's matrix-vector product rounds
    differently (the last float32 bits, ~1e-7 relative). For such a model, audit
    ``copy.deepcopy(model)`` to get the actors' bits locally.

    Args:
        model: a two-tower model (``CLIPModel``, ``SiglipModel``...) or a model that answers
            questions with answer tokens (``BlipForQuestionAnswering``) or answer labels
            (``ViltForQuestionAnswering``): each image is asked its row's ``question`` (or
            ``texts[0]``), and its answer is explained and checked (the answer's log-probability,
            or its label's logit).
        processor: its processor.
        data: a folder of images (with ``labels.csv``/``labels.jsonl``: ``file``, ``label`` and
            optionally ``mask``, ``box``), a list of paths / PIL images / arrays / dicts, a Hugging
            Face ``datasets.Dataset``, or a ``ray.data.Dataset`` (``engine="ray"``).
        texts: the prompts; labels that are one of them are checked against the prediction.
            Answer models: ``[question]`` for rows without their own, or ``[]``; a label is the
            expected answer (label-answer models: one of ``model.config.label2id``, else a
            ``ValueError`` naming it).
        methods: registry names of the image methods (see :func:`captum_vlm.method_names`).
        checks: ``"deletion"`` and/or ``"grounding"`` per map (``()`` for summaries only).
        labels, masks, boxes: per image, for list inputs (or the labels file of a folder).
        engine: ``"local"`` (in process) or ``"ray"`` (Ray Data, ``pip install captum-vlm[ray]``).
        batch_size: images per batch (and per local shard).
        output: the output folder (records, manifest; resumable).
        explain: explain the ``"prediction"`` or the ``"label"``.
        keep_maps: store every map's grid in the records (``{method}.map``).
        deletion_steps: deletion steps per map.
        grounding_fraction: share of the patches the grounding test masks.
        seed: seed of the random orders and maskings.
        model_name: the model's name in the report.
        concurrency, num_cpus, num_gpus: Ray: actors, and CPUs/GPUs per actor.
        address: Ray: the cluster to attach to; default a running one or a local one on 127.0.0.1.
        show_progress: a progress bar (tqdm locally, Ray's own with Ray).

    Returns:
        An :class:`~captum_vlm.audit.Audit` over ``output``.

    Example:
        >>> model, processor = cv.zoo.load("shapes-clip")                                # doctest: +SKIP
        >>> result = cv.audit(model, processor, "scenes/", texts=cv.zoo.scenes.zero_shot_prompts(),
        ...                   methods=["grad-eclip"], output="audit/")                    # doctest: +SKIP
        >>> result.to_html("audit/report.html"); result.patterns()                      # doctest: +SKIP
    """
    check_choice(engine, ENGINES, "engine")
    check_count(batch_size, "batch_size")
    if isinstance(num_cpus, bool) or not isinstance(num_cpus, (int, float)) or not num_cpus > 0:
        raise ValueError(f"num_cpus: expected a number > 0 (CPUs per Ray actor), got {num_cpus!r}")
    if isinstance(num_gpus, bool) or not isinstance(num_gpus, (int, float)) or not num_gpus >= 0:
        raise ValueError(f"num_gpus: expected a number >= 0 (GPUs per Ray actor), got {num_gpus!r}")
    config = _check_config(model, texts, methods, checks, explain, deletion_steps, grounding_fraction)
    name = model_name or Path(str(getattr(model, "name_or_path", "") or type(model).__name__)).name
    config = replace(config, keep_maps=bool(keep_maps), seed=int(seed), model_name=name)
    ray_data = _is_ray_dataset(data)
    if ray_data and engine != "ray":
        raise ValueError('data: a ray.data.Dataset needs engine="ray"')
    rows = data if ray_data else rows_from(data, labels=labels, masks=masks, boxes=boxes)
    if not ray_data and get_adapter(model).answers_questions and not config.texts:
        missing = [r["id"] for r in rows if not r.get("question")]
        if missing:
            raise ValueError(f"texts: no question to ask images {missing[:5]} (they carry no 'question'); "
                             "pass texts=[question] or a question per row")
    unknown = [] if ray_data else unknown_answer_labels(model, [r.get("label") for r in rows])
    if unknown:
        raise ValueError(f"labels: {unknown[:5]} are not answers of {type(model).__name__} (its config.label2id); "
                         f"the label of an image is its expected answer, one of {sorted(model.config.label2id)[:12]}")
    store = RunStore(output, config)
    if engine == "local":
        from captum_vlm.audit.engines import run_local

        run_local(model, processor, config, rows, store, batch_size, show_progress)
    else:
        from captum_vlm.audit.engines import run_ray

        check_count(concurrency, "concurrency")
        run_ray(model, processor, config, rows, store, batch_size, concurrency, num_cpus, num_gpus, address,
                show_progress)
    return Audit(store.root)
