"""Evaluation, one module per task (docs/methods.md section 10; CLIP_benchmark's metric names and JSON records).

- `zeroshot`: zero-shot classification with template ensembling (`acc1`, `acc5`, `mean_per_class_recall`).
- `retrieval`: image -> text and text -> image recall@k.
- `base2novel`: base-to-novel generalisation (`base_acc1`, `novel_acc1`, `hm`) and the `classes=base` data filter.
- `linear_probe`: logistic regression on frozen image embeddings.
- `runner`: `evaluate(model, dataset, split, task, ...)` -> record, with caches; `report`: markdown tables.
"""

from clipdistill.eval.base2novel import base2novel_metrics, parse_data_filter, split_classes
from clipdistill.eval.linear_probe import ProbeConfig, linear_probe
from clipdistill.eval.report import compare, format_record
from clipdistill.eval.retrieval import retrieval_metrics
from clipdistill.eval.runner import TASKS, evaluate, load_records, write_record
from clipdistill.eval.zeroshot import class_embeddings, classification_metrics, zeroshot_logits

__all__ = [
    "TASKS",
    "ProbeConfig",
    "base2novel_metrics",
    "class_embeddings",
    "classification_metrics",
    "compare",
    "evaluate",
    "format_record",
    "linear_probe",
    "load_records",
    "parse_data_filter",
    "retrieval_metrics",
    "split_classes",
    "write_record",
    "zeroshot_logits",
]
