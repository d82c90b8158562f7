"""The convenience layer: ``explain(model, processor, image, texts, methods=[...])``.

It picks the adapter and the target, runs the methods (found by name in :data:`METHODS`), and
returns an :class:`Explanation` holding maps, token scores, model scores and metadata, which
draws (``.plot()``), writes a self-contained report (``.to_html(path)``), saves PNGs + JSON
(``.save(dir)``) and shows itself in a notebook.

Example:
    >>> import captum_vlm as cv                                                 # doctest: +SKIP
    >>> model, processor = cv.zoo.load("shapes-clip")                           # doctest: +SKIP
    >>> report = cv.explain(model, processor, image, ["a red circle", "a blue square"],
    ...                     methods=["grad-eclip", "rollout"])                  # doctest: +SKIP
    >>> report.to_html("report.html")                                          # doctest: +SKIP
"""

from captum_vlm.explain import runners  # noqa: F401  (registers the built-in methods)
from captum_vlm.explain.answering import Answers, answer_questions
from captum_vlm.explain.explanation import Explanation
from captum_vlm.explain.pipeline import explain, explain_context, processor_crop_box
from captum_vlm.explain.registry import (
    METHODS,
    ExplainContext,
    MapRecord,
    MethodSpec,
    method_names,
    register_method,
)

__all__ = [
    "Answers", "ExplainContext", "Explanation", "MapRecord", "MethodSpec", "METHODS", "answer_questions", "explain",
    "explain_context", "method_names", "processor_crop_box", "register_method",
]
