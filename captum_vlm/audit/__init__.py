"""Audit a whole data set: ``cv.audit(model, processor, data, texts=...) -> Audit``.

Every image is explained (:func:`captum_vlm.explain` and its method registry), its map
summarised and checked (deletion AUC against a random order, the grounding test), and one record
per image is written to Parquet shards as the run goes, in process (``engine="local"``) or on
Ray Data actors (``engine="ray"``). Runs resume; the :class:`Audit` result aggregates per label,
finds labels whose maps look like shortcuts, and writes an HTML report.

Example:
    >>> import captum_vlm as cv                                                           # doctest: +SKIP
    >>> model, processor = cv.zoo.load("shapes-clip")                                     # doctest: +SKIP
    >>> result = cv.audit(model, processor, "scenes/", texts=cv.zoo.scenes.zero_shot_prompts(),
    ...                   output="audit/", engine="ray", concurrency=2)                    # doctest: +SKIP
    >>> result.patterns(); result.to_html("audit/report.html")                           # doctest: +SKIP
"""

from captum_vlm.audit.patterns import (
           Finding,
           empty_map_labels,
           fixed_peak_labels,
           ungrounded_labels,
)
from captum_vlm.audit.result import Audit, group_of
from captum_vlm.audit.run import audit
from captum_vlm.audit.sources import rows_from
from captum_vlm.audit.worker import AuditConfig, AuditWorker

__all__ = ["Audit", "AuditConfig", "AuditWorker", "Finding", "audit", "empty_map_labels", "fixed_peak_labels",
           "group_of", "rows_from", "ungrounded_labels"]
